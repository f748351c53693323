"""The `xmem-label` command line: outputs of propagate and demo, and every bad-input case.

Runs `main([...])` in-process with the weight-free flow engine on the chair test clip, plus one
run of the installed console script in a subprocess.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from xmem_label.model import cli
from xmem_label.model.cli import main
from xmem_label.model.masks import read_label_mask, write_label_mask

CHAIR = Path(__file__).parent / "data" / "vos" / "chair"
FRAMES = CHAIR / "frames"
FIRST_MASK = CHAIR / "masks" / "frame_000000.png"
STEMS = sorted(p.stem for p in FRAMES.glob("*.jpg"))
FIXTURES = Path(__file__).parent / "fixtures" / "xmem_reference"


@pytest.fixture(autouse=True)
def no_real_weights(tmp_path, monkeypatch):
    """Weights come only from what a test puts in its own cache folder."""
    monkeypatch.delenv("XMEM_LABEL_WEIGHTS", raising=False)
    monkeypatch.setenv("XMEM_LABEL_CACHE", str(tmp_path / "weights-cache"))
    torch.set_num_threads(1)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def chair_video(tmp_path_factory) -> Path:
    """The chair test frames as an MP4 (mp4v), written with OpenCV."""
    path = tmp_path_factory.mktemp("video") / "chair.mp4"
    first = cv2.imread(str(FRAMES / f"{STEMS[0]}.jpg"))
    height, width = first.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (width, height))
    for stem in STEMS:
        writer.write(cv2.imread(str(FRAMES / f"{stem}.jpg")))
    writer.release()
    return path


# ----- propagate: outputs --------------------------------------------------------------------


def test_propagate_folder_writes_masks_summary_probs_and_gif(tmp_path, capsys):
    out = tmp_path / "out"
    overlay = tmp_path / "overlay.gif"
    code, stdout, err = run(
        capsys, "propagate", FRAMES, "--mask", f"0={FIRST_MASK}", "--out", out,
        "--engine", "flow", "--save-probs", "--overlay", overlay, "--set", "preset=fast",
    )  # fmt: skip
    assert code == 0, err
    assert f"wrote {len(STEMS)} masks" in stdout

    assert sorted(p.name for p in out.glob("*.png")) == [f"{s}.png" for s in STEMS]
    first = read_label_mask(out / f"{STEMS[0]}.png")
    np.testing.assert_array_equal(first, read_label_mask(FIRST_MASK))  # keyframe kept as given
    height, width = first.shape
    with Image.open(out / f"{STEMS[3]}.png") as image:
        assert image.mode == "P"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"]["engine"] == "flow"
    assert summary["settings"]["preset"] == "fast"
    assert summary["weights"] is None
    assert summary["frame_count"] == len(STEMS)
    assert summary["frame_size"] == [width, height]
    assert summary["object_ids"] == [1]
    assert summary["timings"]["frames_per_second"] > 0
    frames = summary["frames"]
    assert [f["name"] for f in frames] == STEMS
    assert frames[0]["keyframe"] and frames[0]["objects"]["1"]["confidence"] == 1.0
    later = frames[-1]["objects"]["1"]
    assert 0 <= later["confidence"] <= 1 and later["area"] > 0 and not later["keyframe"]
    x0, y0, x1, y1 = later["box"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert (later["source"], later["keyframes"]) == ("forward", [0])
    suggestions = summary["suggestions"]
    assert len(suggestions) == 5 and all(s["reasons"] and s["index"] != 0 for s in suggestions)
    assert "check next:" in stdout and f"frame {suggestions[0]['index']} " in stdout
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["probs"]  # no passes kept

    probs = np.load(out / "probs" / f"{STEMS[5]}.npy")
    assert probs.dtype == np.float16 and probs.shape == (2, height, width)
    assert sorted(p.stem for p in (out / "probs").glob("*.npy")) == STEMS

    with Image.open(overlay) as gif:
        assert gif.n_frames == len(STEMS) and gif.size == (width, height)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_propagate_video_names_frames_by_number_and_writes_mp4_overlay(
    tmp_path, capsys, chair_video
):
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "propagate", chair_video, "--mask", f"0={FIRST_MASK}", "--out", out,
        "--engine", "flow", "--overlay", out / "overlay.mp4",
    )  # fmt: skip
    assert code == 0, err
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:05d}.png" for i in range(len(STEMS))]
    capture = cv2.VideoCapture(str(out / "overlay.mp4"))
    decoded = 0
    while capture.read()[0]:
        decoded += 1
    capture.release()
    assert decoded == len(STEMS)


def test_later_keyframe_fills_earlier_frames_unless_forward(tmp_path, capsys):
    truth = read_label_mask(CHAIR / "masks" / f"{STEMS[4]}.png")
    for direction, filled in (("both", True), ("forward", False)):
        out = tmp_path / direction
        code, _, err = run(
            capsys, "propagate", FRAMES, "--mask", f"4={CHAIR / 'masks' / (STEMS[4] + '.png')}",
            "--out", out, "--engine", "flow", "--direction", direction,
        )  # fmt: skip
        assert code == 0, err
        np.testing.assert_array_equal(read_label_mask(out / f"{STEMS[4]}.png"), truth)
        assert (read_label_mask(out / f"{STEMS[0]}.png") > 0).any() == filled


def test_force_replaces_only_this_tools_own_output(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["propagate", FRAMES, "--mask", f"0={FIRST_MASK}", "--out", out, "--engine", "flow"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "not empty" in err and (out / "old.txt").exists()
    code, _, err = run(capsys, *args, "--force")  # a folder this tool did not write
    assert code == 2 and "not written by xmem-label" in err
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    (out / "old.txt").unlink()

    overlay = tmp_path / "overlay.gif"
    code, _, err = run(capsys, *args, "--overlay", overlay)
    assert code == 0, err
    code, _, err = run(capsys, *args, "--overlay", overlay, "--set", "preset=fast")
    assert code == 2 and "--force" in err
    code, _, err = run(capsys, *args, "--force", "--overlay", overlay, "--set", "preset=fast")
    assert code == 0, err  # its own output and overlay are replaced
    assert json.loads((out / "summary.json").read_text())["settings"]["preset"] == "fast"
    with Image.open(overlay) as gif:
        assert gif.n_frames == len(STEMS)

    other = tmp_path / "other"
    other_args = [*args[:-4], "--out", other, "--engine", "flow", "--overlay", overlay]
    code, _, err = run(capsys, *other_args)
    assert code == 2 and "exists" in err and not other.exists()
    code, _, err = run(capsys, *other_args, "--force")  # not the overlay of `other`
    assert code == 2 and "not the overlay" in err and not other.exists()
    (out / "notes.txt").write_text("mine")  # a person's file beside the output
    code, _, err = run(capsys, *args, "--force")
    assert code == 2 and "notes.txt" in err and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----- propagate: bad input --------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _empty_mask(folder: Path) -> Path:
    path = folder / "empty.png"
    write_label_mask(path, np.zeros_like(read_label_mask(FIRST_MASK)))
    return path


def _too_many_ids_mask(folder: Path) -> Path:
    labels = read_label_mask(FIRST_MASK).astype(np.uint16) * 300
    path = folder / "ids16.png"
    Image.fromarray(labels).save(path)
    return path


def _folder_with_broken_frame(folder: Path) -> Path:
    frames = folder / "frames"
    shutil.copytree(FRAMES, frames)
    (frames / f"{STEMS[5]}.jpg").write_bytes(b"not a jpeg")
    return frames


def _wrong_keys_weights(folder: Path) -> Path:
    path = folder / "wrong.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    return path


def _chair() -> list:
    """Arguments of a good run on the chair frames, to which a case adds one mistake."""
    return [FRAMES, "--mask", f"0={FIRST_MASK}", "--engine", "flow"]


def _with_mask(mask: str, source: Path = FRAMES) -> list:
    return [source, "--mask", mask, "--engine", "flow"]


# case: (propagate arguments without --out, made in a scratch folder; words the error must say)
BAD_INPUTS = {
    "missing source": (lambda d: _with_mask(f"0={FIRST_MASK}", d / "nope.mp4"), "no such file"),
    "missing mask file": (lambda d: _with_mask(f"0={d / 'none.png'}"), "not found"),
    "unreadable mask": (
        lambda d: _with_mask(f"0={_write(d / 'bad.png', b'junk')}"),
        "cannot read mask",
    ),
    "undecodable video": (
        lambda d: _with_mask(f"0={FIRST_MASK}", _write(d / "broken.mp4", b"\0" * 4096)),
        "OpenCV cannot",
    ),
    "undecodable frame mid-clip": (
        lambda d: _with_mask(f"0={FIRST_MASK}", _folder_with_broken_frame(d)),
        "cannot decode image",
    ),
    "keyframe outside the clip": (lambda d: _with_mask(f"99={FIRST_MASK}"), "outside the clip"),
    "empty keyframe mask": (lambda d: _with_mask(f"0={_empty_mask(d)}"), "no object"),
    "more than 255 objects": (lambda d: _with_mask(f"0={_too_many_ids_mask(d)}"), "above 255"),
    "mask without frame number": (lambda d: _with_mask(str(FIRST_MASK)), "FRAME=PNG"),
    "mask with a bad frame": (lambda d: _with_mask(f"x={FIRST_MASK}"), "FRAME=PNG"),
    "set without value": (lambda d: [*_chair(), "--set", "preset"], "KEY=VALUE"),
    "unknown flow setting": (lambda d: [*_chair(), "--set", "top_k=5"], "unknown flow setting"),
    "setting of the wrong type": (lambda d: [*_chair(), "--set", "work_height=tall"], "number"),
    "xmem option for flow": (lambda d: [*_chair(), "--size", "320"], "xmem engine only"),
    "no threads": (lambda d: [*_chair(), "--threads", "0"], "whole number of 1 or more"),
    "threads not a number": (lambda d: [*_chair(), "--threads", "two"], "invalid int value"),
    "threads given twice": (
        lambda d: [*_chair(), "--threads", "1", "--set", "threads=1"],
        "give threads once",
    ),
    "bad threads for xmem, before its weights": (
        lambda d: [FRAMES, "--mask", f"0={FIRST_MASK}", "--engine", "xmem", "--threads", "-1"],
        "whole number of 1 or more",
    ),
    "overlay of an unknown kind": (lambda d: [*_chair(), "--overlay", "o.avi"], ".mp4"),
    "unknown engine": (lambda d: [*_chair(), "--engine", "sam"], "invalid choice"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    make_arguments, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    code, _, err = run(capsys, "propagate", *make_arguments(tmp_path), "--out", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xmem-label: error: "), err
    assert expected.lower() in lines[0].lower()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []


@pytest.mark.parametrize("given", [["--threads", "1"], ["--set", "threads=1"]])
def test_threads_reach_the_engines_library(tmp_path, capsys, monkeypatch, given):
    calls: list[int] = []
    monkeypatch.setattr(cv2, "setNumThreads", calls.append)
    code, _, err = run(capsys, "propagate", *_chair(), *given, "--out", tmp_path / "out")
    assert code == 0, err
    assert set(calls) == {1}  # twice: the flow engine's loader is also its options' check


def test_missing_weights_file_for_xmem(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "propagate", FRAMES, "--mask", f"0={FIRST_MASK}", "--out", out,
        "--engine", "xmem", "--weights", tmp_path / "absent.pth",
    )  # fmt: skip
    assert code == 2 and "absent.pth" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_weights_with_wrong_keys_are_refused_by_verify(tmp_path, capsys):
    code, _, err = run(capsys, "weights", "verify", _wrong_keys_weights(tmp_path))
    assert code == 2
    assert "do not fit the XMem network" in err and "missing" in err
    assert len(err.strip().splitlines()) == 1


# ----- XMem through the command line ----------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_weights(tmp_path_factory) -> Path:
    """The reference fixtures' deterministic seed-1 weights (make_weights.py)."""
    spec = importlib.util.spec_from_file_location("make_weights", FIXTURES / "make_weights.py")
    make_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_weights)
    manifest = json.loads((FIXTURES / "state_dict_manifest.json").read_text())
    path = tmp_path_factory.mktemp("weights") / "synthetic.pth"
    torch.save(make_weights.make_state_dict(manifest, 1), path)
    return path


def test_propagate_with_xmem_records_weights(tmp_path, capsys, synthetic_weights):
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "propagate", FRAMES, "--mask", f"0={FIRST_MASK}", "--out", out,
        "--engine", "xmem", "--weights", synthetic_weights, "--size", "160",
        "--set", "top_k=10", "--device", "cpu", "--save-probs",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"]["engine"] == "xmem"
    assert summary["weights"]["path"] == str(synthetic_weights)
    assert len(summary["weights"]["sha256"]) == 64
    assert summary["settings"]["top_k"] == 10
    assert len(list(out.glob("*.png"))) == len(STEMS)
    assert np.load(out / "probs" / f"{STEMS[1]}.npy").dtype == np.float16


def test_xmem_weights_with_wrong_keys_are_refused_by_propagate(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "propagate", FRAMES, "--mask", f"0={FIRST_MASK}", "--out", out,
        "--engine", "xmem", "--weights", _wrong_keys_weights(tmp_path),
    )  # fmt: skip
    assert code == 2 and "do not fit" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_weights_verify_accepts_fitting_weights(capsys, synthetic_weights):
    code, stdout, err = run(capsys, "weights", "verify", synthetic_weights)
    assert code == 0, err
    assert "fits the XMem network" in stdout


# ----- other commands ----------------------------------------------------------------------------


def test_weights_list_names_the_official_checkpoints(capsys):
    code, stdout, _ = run(capsys, "weights", "list")
    assert code == 0
    assert "XMem.pth (default): not downloaded" in stdout
    assert "https://github.com/hkchengrex/XMem/releases/download/v1.0/XMem-s012.pth" in stdout


def test_weights_verify_with_empty_cache(capsys):
    code, _, err = run(capsys, "weights", "verify")
    assert code == 2 and "weights download" in err


def test_eval_command_scores_the_chair_clip(capsys):
    code, stdout, err = run(capsys, "eval", "--data", CHAIR.parent, "--sequences", "chair")
    assert code == 0, err
    assert "chair" in stdout and "mean" in stdout


def test_extra_command_with_missing_dependency_explains_itself(capsys, monkeypatch):
    missing = importlib.metadata.EntryPoint(
        name="fancy", value="surely_not_installed_module.cli:add", group=cli.PLUGIN_COMMANDS
    )
    monkeypatch.setattr(cli, "entry_points", lambda group: [missing])
    code, _, err = run(capsys, "fancy", "--port", "1")
    assert code == 2
    assert "surely_not_installed_module" in err and "pip install" in err


def test_no_command_prints_help(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "propagate" in err


def test_demo_through_the_installed_console_script(tmp_path):
    script = Path(sys.executable).with_name("xmem-label")
    assert script.exists(), "install the package (pip install -e .) to get the console script"
    env = {
        **os.environ,
        "XMEM_LABEL_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("XMEM_LABEL_WEIGHTS", None)
    out = tmp_path / "demo"
    done = subprocess.run(
        [str(script), "demo", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "weight-free flow engine" in done.stdout
    assert "xmem-label weights download" in done.stdout
    assert "engine: flow" in done.stdout
    assert f"overlay: {out / 'overlay.mp4'}" in done.stdout
    assert "frames/s" in done.stdout
    assert len(list(out.glob("*.png"))) == 30
    assert json.loads((out / "summary.json").read_text())["frame_count"] == 30
    capture = cv2.VideoCapture(str(out / "overlay.mp4"))
    assert capture.read()[0]
    capture.release()


def test_demo_replaces_its_previous_output_but_nothing_else(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "demo", "--out", out)
    assert code == 2 and "not empty" in err
    (out / "notes.txt").unlink()
    (out / "summary.json").write_text("{}")  # looks like a demo's output, but is not one
    code, _, err = run(capsys, "demo", "--out", out, "--engine", "flow")
    assert code == 2 and "not written by xmem-label" in err
    assert (out / "summary.json").read_text() == "{}"
    (out / "summary.json").unlink()
    code, stdout, err = run(capsys, "demo", "--out", out, "--engine", "flow")
    assert code == 0, err
    code, stdout, err = run(capsys, "demo", "--out", out, "--engine", "flow")
    assert code == 0, err  # its own earlier output is replaced
    assert json.loads((out / "summary.json").read_text())["frame_count"] == 30
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "demo", "--out", out, "--engine", "flow")
    assert code == 2 and "notes.txt" in err and (out / "notes.txt").exists()

    propagated = tmp_path / "propagated"
    code, _, err = run(
        capsys, "propagate", FRAMES, "--mask", f"0={FIRST_MASK}", "--out", propagated,
        "--engine", "flow",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "demo", "--out", propagated, "--engine", "flow")
    assert code == 2 and "propagate" in err
    assert json.loads((propagated / "summary.json").read_text())["source"] == str(FRAMES)
