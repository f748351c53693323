"""Label Studio backend figures (issue 4).

    python -m benchmarks.label_studio [--clip ../shared/data/vos/blackswan] [--frames 50]
                                      [--ls-bin PATH | --ls-url URL --document-root DIR]

Label Studio comes from `--ls-bin` (default `$LABEL_STUDIO_BIN`, else `.venv-ls` in the
repository). The backend runs with credentials (BASIC_AUTH_USER/PASS) and is connected to the
project by `xmem-label connect`, as backend/README.md tells an admin.

1. Brush RLE encoding time of one mask at 854x480 and 1920x1080: this backend's numpy encoder
   against label_studio_sdk.converter.brush.mask2rle (bytes checked equal).
2. "Retrieve predictions" to stored prediction for one image-sequence task (the clip's first
   `--frames` frames, keyframe = its ground-truth mask on frame 0, engine "flow"), against a
   real Label Studio 1.23.2 and a real `xmem-label serve` process (with credentials, connected
   by `xmem-label connect`), split into media download /
   decode / propagate / encode (measured inside the backend, from /metrics) and HTTP (the rest:
   Label Studio's /health + /setup + /predict round trip, the JSON transfer, and storing).
   Decoding runs in the engine's prefetch thread, so its time overlaps propagation.
3. Prompt masks (model/prompts.py) on the first frame of the test clip and seven DAVIS clips:
   IoU with the ground truth of GrabCut from a box (tight + 3 px), of the filled box itself, and
   of GrabCut from one point (the object pixel farthest from its border).
The machine is shared (2 cores, other jobs running): figures are noisy, run it twice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from label_studio_sdk.converter.brush import mask2rle

from xmem_label.backend import devserver
from xmem_label.backend.rle import mask_to_rle
from xmem_label.model import read_label_mask

from .common import painted_region

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLIP = ROOT.parent / "shared" / "data" / "vos" / "blackswan"
TOKEN = "benchmark0123456789abcdef0123456789abcd"
BACKEND_AUTH = ("label-studio", "benchmark-backend-secret-5e1c")
DEFAULT_LS_BIN = os.environ.get("LABEL_STUDIO_BIN") or str(
    ROOT / ".venv-ls" / "bin" / "label-studio"
)
CONFIG = """<View>
  <Image name="image" valueList="$frames"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
</View>"""


def time_call(function, repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def rle_figures(mask: np.ndarray, repeat: int) -> None:
    print("Brush RLE encoding of one mask (median of runs):")
    print(f"  {'size':>10} {'xmem-label':>12} {'SDK mask2rle':>14} {'speed-up':>9} {'bytes':>7}")
    import cv2

    for width, height in ((854, 480), (1920, 1080)):
        scaled = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        ours = mask_to_rle(scaled)
        assert ours == mask2rle(scaled * 255), "encoders disagree"
        fast = time_call(lambda m=scaled: mask_to_rle(m), repeat)
        slow = time_call(lambda m=scaled: mask2rle(m * 255), max(1, repeat // 4))
        print(
            f"  {width}x{height:<5} {fast * 1000:10.2f} ms {slow * 1000:12.2f} ms "
            f"{slow / fast:8.1f}x {len(ours):7d}"
        )


PROMPT_CLIPS = (
    "blackswan",
    "dog",
    "car-shadow",
    "bmx-trees",
    "horsejump-high",
    "libby",
    "dance-twirl",
)


def prompt_figures(data: Path) -> None:
    import cv2

    from xmem_label.model.prompts import mask_from_box, mask_from_points

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    clips = [ROOT / "tests" / "data" / "vos" / "chair"] + [data / name for name in PROMPT_CLIPS]
    print("\nPrompt -> mask on the first frame, IoU with the ground truth:")
    print(f"  {'clip':<16} {'box GrabCut':>11} {'filled box':>10} {'point GrabCut':>13}")
    rows = []
    for clip in clips:
        if not clip.exists():
            continue
        frame = cv2.cvtColor(
            cv2.imread(str(sorted((clip / "frames").iterdir())[0])), cv2.COLOR_BGR2RGB
        )
        truth = read_label_mask(sorted((clip / "masks").iterdir())[0]) == 1
        ys, xs = np.nonzero(truth)
        height, width = truth.shape
        box = (
            max(0, xs.min() - 3),
            max(0, ys.min() - 3),
            min(width, xs.max() + 4),
            min(height, ys.max() + 4),
        )
        filled = np.zeros_like(truth)
        filled[box[1] : box[3], box[0] : box[2]] = True
        inside = cv2.distanceTransform(truth.astype(np.uint8), cv2.DIST_L2, 5)
        y, x = np.unravel_index(inside.argmax(), inside.shape)
        row = (
            iou(mask_from_box(frame, box), truth),
            iou(filled, truth),
            iou(mask_from_points(frame, [(float(x), float(y))]), truth),
        )
        rows.append(row)
        print(f"  {clip.name:<16} {row[0]:11.2f} {row[1]:10.2f} {row[2]:13.2f}")
    means = np.mean(rows, axis=0)
    print(f"  {'mean':<16} {means[0]:11.2f} {means[1]:10.2f} {means[2]:13.2f}")


def free_port() -> int:
    return devserver.free_port()


def wait_up(url: str, seconds: float) -> None:
    try:
        devserver.wait_up(url, seconds)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def start_label_studio(binary: str, work: Path) -> tuple[subprocess.Popen, str, Path]:
    """Label Studio on a free loopback port with a fresh data dir, a legacy token (TOKEN),
    local files served from work/media, and the settings that let it call a loopback backend
    (xmem_label.backend.devserver, shared with the tests)."""
    try:
        return devserver.start_label_studio(
            binary, work, TOKEN, user="bench@example.com", password="bench-password-123"
        )
    except FileNotFoundError:
        raise SystemExit(
            f"no Label Studio at {binary}: give --ls-bin or set LABEL_STUDIO_BIN "
            "(label-studio 1.23.2), or --ls-url of a running one"
        ) from None
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def stop(process: subprocess.Popen | None) -> None:
    devserver.stop(process)


def xmem_label_command() -> str:
    """The `xmem-label` console script of this Python's environment."""
    try:
        return devserver.xmem_label_command()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def backend_environment(ls_url: str, token: str, **extra: str) -> dict[str, str]:
    """The environment of a backend process: Label Studio, its token, the credentials; media
    over HTTP (no LOCAL_FILES_DOCUMENT_ROOT), as on another machine."""
    env = dict(
        os.environ,
        LABEL_STUDIO_URL=ls_url,
        LABEL_STUDIO_API_KEY=token,
        BASIC_AUTH_USER=BACKEND_AUTH[0],
        BASIC_AUTH_PASS=BACKEND_AUTH[1],
        **extra,
    )
    env.pop("LOCAL_FILES_DOCUMENT_ROOT", None)
    return env


def connect(project_id: int, backend_url: str, ls_url: str, token: str) -> None:
    """`xmem-label connect`: the model with basic auth, and the webhook's credentials header."""
    done = subprocess.run(
        [
            xmem_label_command(),
            "connect",
            "--project",
            str(project_id),
            "--backend-url",
            backend_url,
            "--url",
            ls_url,
            "--token",
            token,
        ],
        env=backend_environment(ls_url, token),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise SystemExit(f"xmem-label connect failed: {done.stderr.strip() or done.stdout}")


def end_to_end_figures(args, work: Path) -> None:
    ls_process = backend = None
    try:
        if args.ls_url:
            url, media, token = args.ls_url, Path(args.document_root), args.token
        else:
            ls_process, url, media = start_label_studio(args.ls_bin, work)
            token = TOKEN
        http = requests.Session()
        http.headers["Authorization"] = f"Token {token}"

        def api(method, path, **kwargs):
            reply = http.request(method, url + path, timeout=300, **kwargs)
            reply.raise_for_status()
            return reply.json() if reply.content else None

        project = api("POST", "/api/projects", json={"title": "benchmark", "label_config": CONFIG})
        api(
            "PATCH",
            f"/api/projects/{project['id']}",
            json={"show_collab_predictions": False, "evaluate_predictions_automatically": False},
        )
        folder = media / f"benchmark-{project['id']}"
        folder.mkdir(parents=True)
        frames = sorted((args.clip / "frames").iterdir())[: args.frames]
        for path in frames:
            shutil.copy(path, folder / path.name)
        api(
            "POST",
            "/api/storages/localfiles",
            json={"project": project["id"], "path": str(folder), "title": "clip"},
        )
        urls = [
            f"/data/local-files/?d={(folder / p.name).relative_to(media).as_posix()}"
            for p in frames
        ]
        mask = read_label_mask(sorted((args.clip / "masks").iterdir())[0]) == 1
        height, width = mask.shape
        keyframe = painted_region(mask, "Object")
        api(
            "POST",
            f"/api/projects/{project['id']}/import",
            json=[{"frames": urls} for _ in range(args.repeat)],
        )
        tasks = api("GET", "/api/tasks", params={"project": project["id"]})["tasks"]
        for task in tasks:
            api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [keyframe]})

        port = free_port()
        backend = subprocess.Popen(
            [
                xmem_label_command(),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--engine",
                "flow",
            ],
            env=backend_environment(url, token, MODEL_DIR=str(work / "model-dir")),
            stdout=open(work / "backend.log", "w"),  # noqa: SIM115 (lives on)
            stderr=subprocess.STDOUT,
        )
        backend_url = f"http://127.0.0.1:{port}"
        wait_up(f"{backend_url}/health", 60)
        connect(project["id"], backend_url, url, token)  # Label Studio calls /setup
        while not requests.get(f"{backend_url}/health", timeout=5).json()["engine_loaded"]:
            time.sleep(0.2)  # the engine loads once per process; not part of a request

        rows = []
        for task in tasks:
            started = time.perf_counter()
            api(
                "POST",
                f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
                json={"selectedItems": {"all": False, "included": [task["id"]]}},
            )
            total = time.perf_counter() - started
            (prediction,) = api("GET", "/api/predictions", params={"task": task["id"]})
            assert len({r["item_index"] for r in prediction["result"]}) == len(frames)
            stages = requests.get(f"{backend_url}/metrics", auth=BACKEND_AUTH, timeout=5).json()[
                "last_timings"
            ]
            rows.append({**stages, "http": total - stages["total"], "all": total})
        print(
            f"\n'Retrieve predictions' -> stored prediction, {len(frames)} frames "
            f"{width}x{height}, engine flow, {len(rows)} run(s), median seconds:"
        )
        for key, label in (
            ("download", "media download (HTTP from Label Studio)"),
            ("decode", "decode (overlaps propagate)"),
            ("propagate", "propagate (incl. decode)"),
            ("encode", "brush RLE encode"),
            ("http", "HTTP + Label Studio (health/setup/predict, JSON, store)"),
            ("all", "total"),
        ):
            print(f"  {label:<58} {statistics.median(r[key] for r in rows):7.2f}")
        print(f"  prediction: {len(prediction['result'])} regions, score {prediction['score']}")
    finally:
        stop(backend)
        stop(ls_process)


def add_label_studio_options(parser: argparse.ArgumentParser) -> None:
    """Where the benchmarks find Label Studio: a binary to start, or a running server."""
    parser.add_argument(
        "--ls-bin",
        default=DEFAULT_LS_BIN,
        help="label-studio 1.23.2 binary (default: $LABEL_STUDIO_BIN, else "
        ".venv-ls/bin/label-studio in the repository)",
    )
    parser.add_argument("--ls-url", help="use this running Label Studio instead of starting one")
    parser.add_argument("--token", default=TOKEN, help="its legacy API token (with --ls-url)")
    parser.add_argument("--document-root", help="its LOCAL_FILES_DOCUMENT_ROOT (with --ls-url)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="tasks timed end to end")
    add_label_studio_options(parser)
    parser.add_argument("--skip-server", action="store_true", help="RLE figures only")
    args = parser.parse_args()
    mask = read_label_mask(sorted((args.clip / "masks").iterdir())[0]) == 1
    rle_figures(mask, repeat=20)
    prompt_figures(args.clip.parent)
    if not args.skip_server:
        with tempfile.TemporaryDirectory(prefix="xmem-label-bench-") as work:
            end_to_end_figures(args, Path(work))


if __name__ == "__main__":
    main()
