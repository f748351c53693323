"""Two clips at once on one backend, against the same two clips one after the other (issue 17,
item 5), and the per-job memory peaks that calibrate the backend's admission estimate.

    python -m benchmarks.parallel_clips [--engines flow,xmem] [--precision fp32]
    python -m benchmarks.parallel_clips --calibrate

The real backend code path: `Runtime` (journal, job runner with its memory budget, the engine
loaded once), the Flask app's `/predict`, `run_sequence` reading JPEG frames from disk through
LOCAL_FILES_DOCUMENT_ROOT and encoding brush RLE; only Label Studio is absent (a `/predict`
waits for its results). Synthetic 854x480 clips (`common.SyntheticClip`), XMem on the
equivalence fixtures' synthetic weights (`common.synthetic_checkpoint`).

Each case runs in its own process, so its peak RSS is its own:
- throughput: one process with `--job-threads 2` submits both clips in one `/predict` (two
  jobs queued at once, run side by side as they fit the budget, each on 1 torch thread of
  the 2 cores), another with `--job-threads 1` (XMem's default: a job on every core) sends
  one `/predict` per clip, the second after the first answered. frames/s = frames of both
  clips / wall time from the first submission to the last result; peak RSS of the process,
  and its RSS with the engine loaded.
- --calibrate: one clip per process; the job's peak = peak RSS - RSS with the engine loaded
  + the bytes free in the C heap then (the backend keeps freed memory, allocator.py: what
  loading the engine freed is reused by the first job, not by a second one beside it),
  beside the estimate (`jobs.estimate_job_bytes`). It includes the process's one-time
  initialisation of the first job (no warm-up clip: XMem runs any clip at 480 pixels on the
  short side, so a warm-up would be as large as the job and leave its memory to reuse).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from xmem_label.backend.app import create_app
from xmem_label.backend.jobs import JobShape, estimate_job_bytes
from xmem_label.backend.model import EngineHolder, Runtime
from xmem_label.backend.settings import BackendSettings
from xmem_label.model.allocator import keep_freed_memory

from .common import (
    SyntheticClip,
    current_rss_mb,
    painted_region,
    peak_rss_mb,
    synthetic_checkpoint,
)

LABELS = ("A", "B", "C", "D")
CONFIG = (
    '<View><Image name="image" valueList="$frames"/><BrushLabels name="mask" toName="image">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</BrushLabels></View>"
)
DEFAULT_FRAMES = {"flow": 60, "xmem": 16}
CALIBRATION = [  # (engine, precision, width, height, objects, frames)
    ("flow", "fp32", 854, 480, 1, 30),
    ("flow", "fp32", 854, 480, 3, 30),
    ("flow", "fp32", 1920, 1080, 1, 30),
    ("flow", "fp32", 1920, 1080, 3, 30),
    ("flow", "fp32", 854, 480, 1, 300),
    ("xmem", "fp32", 854, 480, 1, 12),
    ("xmem", "fp32", 854, 480, 3, 12),
    ("xmem", "fp32", 1920, 1080, 1, 12),
    ("xmem", "fp32", 480, 854, 1, 12),
    ("xmem", "bf16", 854, 480, 1, 12),
    ("xmem", "bf16", 854, 480, 3, 12),
    ("xmem", "int8", 854, 480, 1, 12),
    ("xmem", "int8", 854, 480, 3, 12),
    ("xmem", "fp32", 854, 480, 1, 60),
]


@dataclasses.dataclass
class Clip:
    """A clip written as JPEG frames under the document root, and its task."""

    task: dict
    frames: int


def write_clip(
    root: Path, name: str, task_id: int, frames: int, width: int, height: int, objects: int
) -> Clip:
    """Frames of a synthetic clip as JPEG files, and a task with its frame-0 keyframe: one
    brush region per object, each under its own label (so each is one object)."""
    clip = SyntheticClip(frames, height, width)
    folder = root / name
    folder.mkdir(parents=True)
    urls = []
    for index in range(frames):
        path = folder / f"frame_{index:06d}.jpg"
        cv2.imwrite(str(path), clip.read(index)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        urls.append(f"/data/local-files/?d={name}/{path.name}")
    labels = clip.first_mask(objects)
    regions = [
        painted_region(labels == object_id, LABELS[object_id - 1])
        for object_id in range(1, objects + 1)
    ]
    task = {"id": task_id, "data": {"frames": urls}, "annotations": [{"id": 1, "result": regions}]}
    return Clip(task, frames)


def start_backend(
    engine: str, precision: str, root: Path, state: Path, job_threads: int = 1
) -> tuple[Runtime, object]:
    """The backend as `xmem-label serve --job-threads N` configures it (the budget's
    default), its engine loaded; its Flask test client."""
    keep_freed_memory()  # as `xmem-label serve` does before any thread starts
    environment = {
        "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "MODEL_DIR": str(state),
        "XMEM_LABEL_ENGINE": engine,
        "LABEL_STUDIO_URL": "http://ls.invalid:8080",
        "LABEL_STUDIO_API_KEY": "benchmark-token",
    }
    settings = BackendSettings.from_environment(environment)
    settings = dataclasses.replace(settings, sync_seconds=3600.0, job_threads=job_threads)
    runtime = Runtime(settings)
    if engine == "xmem":
        runtime.engines = EngineHolder(
            "xmem", weights=synthetic_checkpoint(), device="cpu", precision=precision
        )
    runtime.start()
    runtime.engines.get()
    client = create_app(runtime).test_client()
    reply = client.post("/setup", json={"project": "1.0", "schema": CONFIG})
    assert reply.status_code == 200, reply.json
    return runtime, client


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd")
        + ("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def heap_free_mb() -> float:
    """Bytes free inside glibc's heap (mallinfo2's fordblks), in MB; 0 without glibc 2.33+."""
    name = ctypes.util.find_library("c")
    mallinfo2 = getattr(ctypes.CDLL(name), "mallinfo2", None) if name else None
    if mallinfo2 is None:
        return 0.0
    mallinfo2.restype = _MallInfo2
    return mallinfo2().fordblks / 1e6


def predict(client, tasks: list[dict]) -> None:
    reply = client.post(
        "/predict",
        json={"tasks": tasks, "project": "1.0", "label_config": CONFIG, "params": {}},
    )
    assert reply.status_code == 200, reply.json
    assert all(result for result in reply.json["results"]), reply.json


def throughput_case(engine: str, precision: str, mode: str, frames: int) -> dict:
    """One process: both clips at once ("parallel") or one after the other ("sequential")."""
    with tempfile.TemporaryDirectory(prefix="xmem-label-parallel-") as folder:
        root, state = Path(folder) / "media", Path(folder) / "state"
        clips = [write_clip(root, f"clip{n}", n, frames, 854, 480, 1) for n in (1, 2)]
        job_threads = 2 if mode == "parallel" else 1
        runtime, client = start_backend(engine, precision, root, state, job_threads)
        loaded_mb = current_rss_mb()
        started = time.perf_counter()
        if mode == "parallel":
            predict(client, [clip.task for clip in clips])
        else:
            for clip in clips:
                predict(client, [clip.task])
        seconds = time.perf_counter() - started
        runtime.runner.stop()
    return {
        "seconds": seconds,
        "frames_per_second": sum(clip.frames for clip in clips) / seconds,
        "loaded_mb": loaded_mb,
        "peak_mb": peak_rss_mb(),
        "budget_mb": runtime.settings.job_memory_bytes / 1e6,
    }


def calibration_case(
    engine: str, precision: str, width: int, height: int, objects: int, frames: int
) -> dict:
    """One process: one job; its peak over the RSS with the engine loaded."""
    with tempfile.TemporaryDirectory(prefix="xmem-label-calibrate-") as folder:
        root, state = Path(folder) / "media", Path(folder) / "state"
        clip = write_clip(root, "clip", 2, frames, width, height, objects)
        runtime, client = start_backend(engine, precision, root, state)
        before_mb, free_mb = current_rss_mb(), heap_free_mb()
        predict(client, [clip.task])
        peak_mb = peak_rss_mb()
        runtime.runner.stop()
    shape = JobShape(width, height, objects, frames)
    return {
        "before_mb": before_mb,
        "peak_mb": peak_mb,
        "free_mb": free_mb,
        "job_mb": peak_mb - before_mb + free_mb,
        "estimate_mb": estimate_job_bytes(engine, precision, shape) / 1e6,
    }


def child(argv: list[str]) -> dict:
    """Run one case in this process (the parent's subprocess)."""
    kind, *rest = argv
    if kind == "throughput":
        engine, precision, mode, frames = rest
        return throughput_case(engine, precision, mode, int(frames))
    engine, precision, width, height, objects, frames = rest
    return calibration_case(engine, precision, int(width), int(height), int(objects), int(frames))


def run_child(*args: object) -> dict:
    command = [sys.executable, "-m", "benchmarks.parallel_clips", "--child", *map(str, args)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="flow,xmem", help="comma-separated: flow, xmem")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--frames", type=int, default=None, help="frames per clip")
    parser.add_argument("--calibrate", action="store_true", help="measure per-job memory peaks")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    if args.calibrate:
        print(
            "engine precision size objects frames | RSS loaded, heap free, job peak, estimate (MB)"
        )
        for case in CALIBRATION:
            result = run_child("calibrate", *case)
            engine, precision, width, height, objects, frames = case
            print(
                f"{engine} {precision} {width}x{height} {objects} {frames} | "
                f"{result['before_mb']:.0f}, {result['free_mb']:.0f}, {result['job_mb']:.0f}, "
                f"{result['estimate_mb']:.0f}",
                flush=True,
            )
        return 0
    print(
        "2 clips of 854x480, 1 object each, keyframe on frame 0; sequential: --job-threads 1, "
        "one /predict per clip; parallel: --job-threads 2, both in one /predict"
    )
    for engine in args.engines.split(","):
        frames = args.frames or DEFAULT_FRAMES[engine]
        name = engine if engine == "flow" else f"xmem {args.precision}"
        results = {
            mode: run_child("throughput", engine, args.precision, mode, frames)
            for mode in ("sequential", "parallel")
        }
        for mode, result in results.items():
            print(
                f"{name}, {frames} frames per clip, {mode:>10}: {result['seconds']:.1f} s, "
                f"{result['frames_per_second']:.2f} frames/s, peak RSS "
                f"{result['peak_mb']:.0f} MB (engine loaded: {result['loaded_mb']:.0f} MB; "
                f"budget {result['budget_mb']:.0f} MB)",
                flush=True,
            )
        ratio = (
            results["parallel"]["frames_per_second"] / results["sequential"]["frames_per_second"]
        )
        print(f"{name}: 2 at once / one after the other = {ratio:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
