"""The command line against bad input: a table of cases, each on real files in a scratch folder.

Every case asserts the one-line message, the exit code, and that nothing in the scratch folder
was written, changed or deleted (a hash of every file and folder in it, before and after). The
data-loss cases point --out, --overlay and --force at the inputs themselves, or at files a
person made. Then: what --skip-bad-frames does instead of refusing, a disk that fills while the
overlay is written, and real signals sent to a real `xmem-label` process.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from xmem_label.model.cli import main
from xmem_label.model.masks import read_label_mask

TESTS = Path(__file__).resolve().parent.parent
CHAIR = TESTS / "data" / "vos" / "chair"
CHAIR_FRAMES = CHAIR / "frames"
CHAIR_MASK = CHAIR / "masks" / "frame_000000.png"
DEMO_FRAMES = TESTS.parent / "model" / "demo_clip" / "frames"
SCRIPT = Path(sys.executable).with_name("xmem-label")


@pytest.fixture(autouse=True)
def no_real_weights(tmp_path, monkeypatch):
    """Weights only from what a case gives; a cache inside the scratch folder, so a download
    or a recorded sha256 would show up as a change."""
    monkeypatch.delenv("XMEM_LABEL_WEIGHTS", raising=False)
    monkeypatch.setenv("XMEM_LABEL_CACHE", str(tmp_path / "cache"))


def tree_state(root: Path) -> dict[str, str]:
    """Every path under `root` -> the sha256 of its bytes, 'folder', or its link target."""
    state = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            state[name] = f"link to {os.readlink(path)}"
        elif path.is_dir():
            state[name] = "folder"
        elif not path.is_file():  # a named pipe: reading it would block
            state[name] = "special file"
        else:
            state[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def run(capsys, argv: list) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----- scenes: real files in the scratch folder d ----------------------------------------------


def frames(d: Path) -> Path:
    """A copy of the chair frames, d/clip/frames, and its first mask, d/clip/key.png."""
    clip = d / "clip"
    if not clip.exists():
        shutil.copytree(CHAIR_FRAMES, clip / "frames")
        shutil.copy(CHAIR_MASK, clip / "key.png")
    return clip / "frames"


def key(d: Path) -> Path:
    frames(d)
    return d / "clip" / "key.png"


def video(d: Path) -> Path:
    """The chair frames as an MP4 (mp4v) written with OpenCV."""
    path = d / "chair.mp4"
    stems = sorted(CHAIR_FRAMES.glob("*.jpg"))
    first = cv2.imread(str(stems[0]))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, first.shape[1::-1])
    for stem in stems:
        writer.write(cv2.imread(str(stem)))
    writer.release()
    return path


_DAMAGED: dict[str, bytes] = {}


def damaged_video(d: Path) -> Path:
    """The 30-frame demo clip as an MP4 whose index (moov, moved to the front by ffmpeg) lists
    30 frames but whose data stops half way: OpenCV decodes 13 of them."""
    if "bytes" not in _DAMAGED:
        if shutil.which("ffmpeg") is None:
            pytest.skip("ffmpeg is needed to move the MP4 index to the front")
        whole, fronted = d / "whole.mp4", d / "fronted.mp4"
        first = cv2.imread(str(DEMO_FRAMES / "00000.jpg"))
        writer = cv2.VideoWriter(
            str(whole), cv2.VideoWriter_fourcc(*"mp4v"), 10, first.shape[1::-1]
        )
        for path in sorted(DEMO_FRAMES.glob("*.jpg")):
            writer.write(cv2.imread(str(path)))
        writer.release()
        subprocess.run(
            ["ffmpeg", "-loglevel", "error", "-y", "-i", whole, "-c", "copy",
             "-movflags", "+faststart", fronted],
            check=True,
        )  # fmt: skip
        data = fronted.read_bytes()
        _DAMAGED["bytes"] = data[: len(data) // 2]
        whole.unlink()
        fronted.unlink()
    path = d / "damaged.mp4"
    path.write_bytes(_DAMAGED["bytes"])
    return path


def demo_key(d: Path) -> Path:
    path = d / "demo_key.png"
    shutil.copy(DEMO_FRAMES.parent / "keyframe_00000.png", path)
    return path


def frames_with(d: Path, change: Callable[[Path], None]) -> Path:
    """The chair frames with `change` applied to frame 5's file."""
    folder = frames(d)
    change(sorted(folder.glob("*.jpg"))[5])
    return folder


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def smaller(path: Path) -> None:
    image = cv2.imread(str(path))
    cv2.imwrite(str(path), cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2)))


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def frames_lookalikes(d: Path) -> Path:
    """A folder whose only 'frames' are a named pipe and a sub-folder with .jpg names: reading
    the pipe would block forever."""
    folder = d / "lookalikes"
    (folder / "00001.jpg").mkdir(parents=True)
    fifo(folder / "00000.jpg")
    return folder


def jpeg_mask(d: Path) -> Path:
    """The chair keyframe mask (one object, id 1) saved as a grey JPEG, ids scaled to 0/255."""
    path = d / "key.jpg"
    labels = read_label_mask(CHAIR_MASK)
    Image.fromarray((labels > 0).astype(np.uint8) * 255, mode="L").save(path, quality=90)
    return path


def tool_output(d: Path, extra: str | None = None) -> Path:
    """A finished `propagate` output at d/out (flow engine), plus a person's file if `extra`."""
    out = d / "out"
    code = main(["propagate", str(frames(d)), "--mask", f"0={key(d)}", "--out", str(out),
                 "--engine", "flow", "--set", "preset=ultrafast"])  # fmt: skip
    assert code == 0
    if extra:
        (out / extra).write_text("a person's notes")
    return out


def corrected(out: Path) -> Path:
    """A person's correction of one mask in an output: object 1 grown by a row."""
    path = sorted(out.glob("*.png"))[3]
    labels = read_label_mask(path).copy()
    labels[:-1][labels[1:] == 1] = 1
    Image.fromarray(labels, mode="L").save(path)
    return out


def foreign_folder(d: Path) -> Path:
    out = d / "mine"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}')
    (out / "0001.png").write_bytes(b"a person's own file")
    return out


def small_file(path: Path, data: bytes = b"weights of a person") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory, xmem_weights_path) -> Path:
    """The fixtures' deterministic XMem weights with one NaN, outside every scratch folder."""
    state_dict = torch.load(xmem_weights_path)
    state_dict["decoder.pred.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path_factory.mktemp("weights") / "nan.pth"
    torch.save(state_dict, path)
    return path


def propagate(d: Path, *options, source=None, mask=None, out=None) -> list:
    """A propagate command on the chair copy (flow engine), with `options` added."""
    source = frames(d) if source is None else source
    mask = key(d) if mask is None else mask
    out = d / "out" if out is None else out
    return ["propagate", source, "--mask", f"0={mask}", "--out", out, *options]


def flow(d: Path, *options, **where) -> list:
    return propagate(d, "--engine", "flow", *options, **where)


def xmem(d: Path, *options) -> list:
    """XMem with a weights file that exists, so only the option under test can be refused."""
    return propagate(d, "--engine", "xmem", "--weights", small_file(d / "w.pth"), *options)


# case -> (argv made in the scratch folder d, words the one-line error must contain)
CASES: dict[str, tuple[Callable[[Path], list], str]] = {
    # --- data loss: outputs on top of inputs, --force and demo on what the tool did not write
    "out is the source folder, --force": (
        lambda d: flow(d, "--force", out=frames(d)),
        "is the SOURCE",
    ),
    "out holds the source and the mask, --force": (
        lambda d: flow(d, "--force", out=d / "clip"),
        "holds the SOURCE",
    ),
    "out inside the source folder": (
        lambda d: flow(d, out=frames(d) / "masks"),
        "lies inside the SOURCE",
    ),
    "out holds the mask": (
        lambda d: flow(d, "--force", source=video(d), out=d / "clip"),
        "holds the keyframe mask",
    ),
    "out is the mask file": (lambda d: flow(d, "--force", out=key(d)), "is the keyframe mask"),
    "out holds the weights file": (
        lambda d: propagate(
            d,
            "--engine",
            "xmem",
            "--weights",
            small_file(d / "w" / "x.pth"),
            "--force",
            out=d / "w",
        ),  # fmt: skip
        "holds the --weights file",
    ),
    "overlay is the source video, --force": (
        lambda d: flow(d, "--overlay", video(d), "--force", source=d / "chair.mp4"),
        "--overlay",
    ),
    "overlay is the mask": (
        lambda d: flow(d, "--overlay", d / "clip" / "key.png", "--force"),
        "is the keyframe mask",
    ),
    "overlay inside the source folder": (
        lambda d: flow(d, "--overlay", frames(d) / "overlay.gif"),
        "lies inside the SOURCE",
    ),
    "force on a person's folder": (
        lambda d: flow(d, "--force", out=foreign_folder(d)),
        "not written by xmem-label",
    ),
    "force on own output with a person's file beside it": (
        lambda d: flow(d, "--force", out=tool_output(d, extra="notes.txt")),
        "notes.txt",
    ),
    "force on a person's existing overlay": (
        lambda d: flow(d, "--force", "--overlay", small_file(d / "talk.mp4", b"my video")),
        "not the overlay",
    ),
    "force on own output with a corrected mask": (
        lambda d: flow(d, "--force", out=corrected(tool_output(d))),
        "was changed",
    ),
    "no force on own output": (lambda d: flow(d, out=tool_output(d)), "add --force"),
    "demo into a folder with a summary.json": (
        lambda d: ["demo", "--engine", "flow", "--out", foreign_folder(d)],
        "not written by xmem-label",
    ),
    "demo into a propagate output": (
        lambda d: ["demo", "--engine", "flow", "--out", tool_output(d)],
        "propagate",
    ),
    "demo into a propagate output with notes": (
        lambda d: ["demo", "--engine", "flow", "--out", tool_output(d, extra="n.txt")],
        "propagate",
    ),
    # --- inputs that would change the output silently
    "video damaged mid-stream": (
        lambda d: flow(d, source=damaged_video(d), mask=demo_key(d)),
        "frame 13 cannot be decoded",
    ),
    "video damaged mid-stream, out and overlay in new folders": (
        lambda d: flow(
            d,
            "--overlay",
            d / "new" / "o.mp4",
            source=damaged_video(d),
            mask=demo_key(d),
            out=d / "made" / "for" / "out",
        ),  # fmt: skip
        "frame 13 cannot be decoded",
    ),
    "truncated JPEG mid-clip": (
        lambda d: flow(d, source=frames_with(d, truncate_half)),
        "frame_000005.jpg",
    ),
    "garbage image mid-clip": (
        lambda d: flow(d, source=frames_with(d, lambda p: p.write_bytes(b"junk"))),
        "cannot decode image",
    ),
    "frames of different sizes": (
        lambda d: flow(d, source=frames_with(d, smaller)),
        "all frames must have one size",
    ),
    "source is a named pipe": (lambda d: flow(d, source=fifo(d / "clip.mp4")), "regular file"),
    "only a pipe and a folder named like frames": (
        lambda d: flow(d, source=frames_lookalikes(d)),
        "no image files",
    ),
    "keyframe mask is a named pipe": (
        lambda d: flow(d, mask=fifo(d / "key.png")),
        "not a regular file",
    ),
    "JPEG keyframe mask": (lambda d: flow(d, mask=jpeg_mask(d)), "JPEG"),
    "XMem weights holding NaN": (None, "NaN"),  # made with the nan_weights fixture below
    "flow sharpen NaN": (lambda d: flow(d, "--set", "sharpen=.nan"), "finite"),
    # --- options that ended in a traceback or were accepted as nonsense
    "device cuda on a CPU build": (lambda d: xmem(d, "--device", "cuda"), "no CUDA device"),
    "device cuda:99": (lambda d: xmem(d, "--device", "cuda:99"), "cuda:99"),
    "device mps": (lambda d: xmem(d, "--device", "mps"), "MPS"),
    "device unknown": (lambda d: xmem(d, "--device", "tpu0"), "unknown device"),
    "size 100000": (lambda d: xmem(d, "--size", "100000"), "16..4096"),
    "size 0": (lambda d: xmem(d, "--size", "0"), "16..4096"),
    "size -5": (lambda d: xmem(d, "--size", "-5"), "-1 (native)"),
    "top_k 0": (lambda d: xmem(d, "--set", "top_k=0"), "at least 1"),
    "top_k -1": (lambda d: xmem(d, "--set", "top_k=-1"), "at least 1"),
    "top_k 2.5": (lambda d: xmem(d, "--set", "top_k=2.5"), "whole number"),
    "mem_every 0": (lambda d: xmem(d, "--set", "mem_every=0"), "at least 1"),
    "deep_update_every 0": (lambda d: xmem(d, "--set", "deep_update_every=0"), "-1"),
    "min_mid_term_frames above max": (
        lambda d: xmem(d, "--set", "min_mid_term_frames=12"),
        "must be above",
    ),
    "max_long_term_elements not above num_prototypes": (
        lambda d: xmem(d, "--set", "max_long_term_elements=128"),
        "num_prototypes",
    ),
    "enable_long_term not a flag": (
        lambda d: xmem(d, "--set", "enable_long_term=maybe"),
        "true or false",
    ),
    "same setting twice": (
        lambda d: flow(d, "--set", "preset=fast", "--set", "preset=medium"),
        "two --set",
    ),
    "flow refine_radius negative": (lambda d: flow(d, "--set", "refine_radius=-1"), "at least 0"),
    "flow search_px negative": (lambda d: flow(d, "--set", "search_px=-3"), "at least 0"),
    "flow colour_bins 2.5": (lambda d: flow(d, "--set", "colour_bins=2.5"), "whole number"),
    "flow consistency_px 0": (lambda d: flow(d, "--set", "consistency_px=0"), "above 0"),
    "mask frame superscript two": (
        lambda d: [
            "propagate",
            frames(d),
            "--mask",
            f"\u00b2={key(d)}",
            "--out",
            d / "out",
            "--engine",
            "flow",
        ],
        "FRAME=PNG",
    ),  # fmt: skip
    "mask frame Arabic-Indic digit": (
        lambda d: [
            "propagate",
            frames(d),
            "--mask",
            f"\u0663={key(d)}",
            "--out",
            d / "out",
            "--engine",
            "flow",
        ],
        "FRAME=PNG",
    ),  # fmt: skip
    "mask frame negative": (
        lambda d: [
            "propagate",
            frames(d),
            f"--mask=-1={key(d)}",
            "--out",
            d / "out",
            "--engine",
            "flow",
        ],
        "FRAME=PNG",
    ),  # fmt: skip
    "same keyframe twice": (
        lambda d: [
            "propagate",
            frames(d),
            "--mask",
            f"0={key(d)}",
            "--mask",
            f"00={key(d)}",
            "--out",
            d / "out",
            "--engine",
            "flow",
        ],
        "two --mask",
    ),  # fmt: skip
    "eval out inside the data": (
        lambda d: ["eval", "--data", frames(d).parent.parent, "--out", d / "clip" / "scores"],
        "lies inside the --data folder",
    ),
    "eval force on a person's folder": (
        lambda d: [
            "eval",
            "--data",
            CHAIR.parent,
            "--sequences",
            "chair",
            "--force",
            "--out",
            foreign_folder(d),
        ],
        "not written by xmem-label",
    ),  # fmt: skip
    "weights download of a path": (
        lambda d: ["weights", "download", "/etc/passwd"],
        "unknown checkpoint",
    ),
    "weights verify of a missing file": (
        lambda d: ["weights", "verify", d / "missing.pth"],
        "no such file",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_with_one_line_and_nothing_changes(
    case, tmp_path, capsys, nan_weights
):
    make, expected = CASES[case]
    if make is None:  # "XMem weights holding NaN"
        make = lambda d: propagate(d, "--engine", "xmem", "--weights", nan_weights)  # noqa: E731
    argv = make(tmp_path)
    capsys.readouterr()  # what building the scene printed
    before = tree_state(tmp_path)
    code, stdout, err = run(capsys, argv)
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xmem-label: error: "), err
    assert expected.lower() in lines[0].lower(), lines[0]
    assert tree_state(tmp_path) == before


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 35


# ----- --skip-bad-frames: the run goes on, and says which frames were replaced ----------------


def test_skip_bad_frames_names_every_replaced_frame(tmp_path, capsys):
    source = damaged_video(tmp_path)
    out = tmp_path / "out"
    code, _, err = run(capsys, flow(tmp_path, "--skip-bad-frames", source=source,
                                    mask=demo_key(tmp_path)))  # fmt: skip
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("xmem-label: warning: ")]
    assert len(warned) == 17 and "frame 13 cannot be decoded" in warned[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frame_count"] == 30 and len(list(out.glob("*.png"))) == 30
    assert [entry["index"] for entry in summary["skipped_frames"]] == list(range(13, 30))

    folder = frames_with(tmp_path, truncate_half)
    out = tmp_path / "out-folder"
    code, _, err = run(capsys, flow(tmp_path, "--skip-bad-frames", source=folder, out=out))
    assert code == 0, err
    assert "frame_000005.jpg" in err and "frame 4 used instead" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_frames"][0]["name"] == "frame_000005"
    assert "truncated" in summary["skipped_frames"][0]["problem"]


def test_good_mkv_and_avi_are_not_taken_for_damaged(tmp_path, capsys):
    """Containers whose frame count OpenCV estimates from the duration still pass the check."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is needed to write MKV")
    mp4 = video(tmp_path)
    for suffix in (".mkv", ".avi"):
        path = tmp_path / f"chair{suffix}"
        subprocess.run(
            ["ffmpeg", "-loglevel", "error", "-y", "-i", mp4, "-c:v", "mjpeg", path], check=True
        )
        code, _, err = run(capsys, flow(tmp_path, source=path, out=tmp_path / suffix[1:]))
        assert code == 0, err
        assert json.loads((tmp_path / suffix[1:] / "summary.json").read_text())["frame_count"] == 8


# ----- a disk that fills while the overlay is written -------------------------------------------


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_overlay_that_cannot_be_written_is_an_error_and_leaves_nothing(tmp_path):
    out, overlay = tmp_path / "out", tmp_path / "overlay.mp4"
    done = subprocess.run(
        [SCRIPT, "propagate", DEMO_FRAMES, "--mask", f"0={demo_key(tmp_path)}", "--out", out,
         "--engine", "flow", "--set", "preset=ultrafast", "--overlay", overlay],
        preexec_fn=_file_size_limit(48_000),  # masks and summary fit, the overlay does not
        capture_output=True, text=True, timeout=300, env=_env(tmp_path), check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "overlay" in done.stderr and "not written completely" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and not overlay.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_key.png", "tmp"]


# ----- signals: real processes, real signals ---------------------------------------------------


def _env(tmp_path: Path) -> dict[str, str]:
    """The child's temporary folder inside the scratch folder, to see any spill left there."""
    temporary = tmp_path / "tmp"
    temporary.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(temporary), "OMP_NUM_THREADS": "1",
           "XMEM_LABEL_CACHE": str(tmp_path / "cache")}  # fmt: skip
    env.pop("XMEM_LABEL_WEIGHTS", None)
    return env


def _long_clip(tmp_path: Path, repeats: int = 4) -> tuple[Path, Path]:
    """The demo clip's frames repeated (120 frames) and a keyframe on the last frame, so the
    run starts with a long backward pass that keeps its probabilities on disk."""
    folder = tmp_path / "long"
    folder.mkdir()
    paths = sorted(DEMO_FRAMES.glob("*.jpg"))
    for repeat in range(repeats):
        for index, path in enumerate(paths):
            shutil.copy(path, folder / f"{repeat * len(paths) + index:05d}.jpg")
    return folder, demo_key(tmp_path)


def _start_and_wait_for_spill(tmp_path: Path, out: Path) -> subprocess.Popen:
    folder, mask = _long_clip(tmp_path)
    last = len(list(folder.glob("*.jpg"))) - 1
    process = subprocess.Popen(
        [SCRIPT, "propagate", folder, "--mask", f"{last}={mask}", "--out", out,
         "--engine", "flow", "--set", "preset=medium", "--overlay", tmp_path / "overlay.mp4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".{out.name}.partial-*/xmem-label-passes-*/*/*.u8z")):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no spill appeared: {process.communicate()}")
        time.sleep(0.02)
    return process


def _inputs_only(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_during_backward_pass_leaves_nothing(tmp_path, signum):
    out = tmp_path / "out"
    process = _start_and_wait_for_spill(tmp_path, out)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and f"interrupted ({signal.Signals(signum).name})" in err
    assert _inputs_only(tmp_path) == ["demo_key.png", "long", "tmp"]
    assert list((tmp_path / "tmp").iterdir()) == []  # no spill in the temporary folder


def test_output_left_by_sigkill_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    process = _start_and_wait_for_spill(tmp_path, out)
    process.kill()
    process.communicate(timeout=60)
    left = list(tmp_path.glob(f".{out.name}.partial-*"))
    assert len(left) == 1 and list(left[0].glob("xmem-label-passes-*"))
    staged_overlays = list(tmp_path.glob(".overlay.partial-*.mp4"))

    done = subprocess.run(
        [SCRIPT, "propagate", DEMO_FRAMES, "--mask", f"0={tmp_path / 'demo_key.png'}",
         "--out", out, "--engine", "flow", "--set", "preset=ultrafast"],
        capture_output=True, text=True, timeout=300, env=_env(tmp_path), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"removed {left[0]}, left by an interrupted run" in done.stderr
    assert not left[0].exists() and not any(p.exists() for p in staged_overlays)
    assert _inputs_only(tmp_path) == ["demo_key.png", "long", "out", "tmp"]


def test_eval_out_is_written_whole_and_replaced_only_with_force(tmp_path, capsys):
    out = tmp_path / "scores"
    argv = ["eval", "--data", CHAIR.parent, "--sequences", "chair", "--out", out]
    code, _, err = run(capsys, argv)
    assert code == 0, err
    assert len(list((out / "chair").glob("*.png"))) == 8 and (out / ".xmem-label.json").exists()
    before = tree_state(tmp_path)
    code, _, err = run(capsys, argv)
    assert code == 2 and "add --force" in err and tree_state(tmp_path) == before
    code, _, err = run(capsys, [*argv, "--force"])
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]


def test_video_longer_than_its_header_says_is_named_in_a_warning(tmp_path, capsys):
    """MPEG program streams carry no frame count; OpenCV's estimate can fall one short."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is needed to write MPEG-2")
    path = tmp_path / "clip.mpg"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-framerate", "25", "-i",
         DEMO_FRAMES / "%05d.jpg", "-c:v", "mpeg2video", path],
        check=True,
    )  # fmt: skip
    capture = cv2.VideoCapture(str(path))
    listed = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    if listed >= 30:
        pytest.skip("this ffmpeg build writes a stream whose length OpenCV estimates right")
    code, _, err = run(capsys, flow(tmp_path, source=path, mask=demo_key(tmp_path)))
    assert code == 0, err
    assert f"{path} holds more frames than the {listed} its header lists" in err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["frame_count"] == listed
