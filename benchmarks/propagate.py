"""Speed and memory of XMem propagation on CPU (issue 6), beside the reference's figures.

    python -m benchmarks.propagate --size 854x480 --objects 1,3 --frames 60 [--precision bf16|int8]
        [--compile] [--threads N]

Each case runs in its own process so its peak RSS is its own. Frames are pre-decoded (a
synthetic clip, computed in memory), so this measures the network and memory, as the reference
timings in shared notes did: time per frame = one session step including argmax and statistics,
median over frames 3..N-1. Achieved GFLOP/s = FLOPs counted on a short run / median time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from xmem_label.model import Session, load_engine

from .common import (
    SyntheticClip,
    counting_flops,
    describe_times,
    peak_rss_mb,
    synthetic_checkpoint,
)

# The official implementation on this machine kind (shared notes, section 6): s/frame, peak RSS.
REFERENCE = {(854, 480, 1): (2.03, 1500), (854, 480, 3): (4.35, 1710), (320, 192, 1): (0.275, 980)}
FLOP_FRAMES = 7  # frames counted for GFLOP/s: includes the first memory write after frame 0


def run_case(
    width: int, height: int, objects: int, frames: int, precision: str, compile: bool, threads: int
) -> dict:
    """Propagate one synthetic clip and return its timings (runs in the case's own process)."""
    engine = load_engine(
        "xmem",
        weights=synthetic_checkpoint(),
        size=-1,
        device="cpu",
        precision=precision,
        compile=compile,
        threads=threads,
    )
    clip = SyntheticClip(frames, height, width)

    def timed_run(num_frames: int) -> list[float]:
        session = Session(
            engine, clip if num_frames == frames else SyntheticClip(num_frames, height, width)
        )
        session.add_mask(0, clip.first_mask(objects))
        stamps = [time.perf_counter()]
        for _ in session.propagate(direction="forward"):
            stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]

    flops_per_frame = float("nan")  # compiled graphs hide their operations from the counter
    if not compile:
        with counting_flops() as counter:
            timed_run(FLOP_FRAMES)
        flops_per_frame = counter.get_total_flops() / FLOP_FRAMES
    seconds = timed_run(frames)[3:-1]  # with compile, the first frames include compiling
    median = statistics.median(seconds)
    return {
        "seconds": seconds,
        "median": median,
        "gflops": flops_per_frame / median / 1e9,
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--size", default="854x480", help="WIDTHxHEIGHT")
    parser.add_argument("--objects", default="1,3", help="comma-separated object counts")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"])
    parser.add_argument("--threads", type=int, default=2, help="the engine's threads option")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    if args.case:  # child process: one case, JSON on stdout
        result = run_case(
            width,
            height,
            int(args.objects),
            args.frames,
            args.precision,
            args.compile,
            args.threads,
        )
        print(json.dumps(result))
        return 0

    compiled = ", compiled" if args.compile else ""
    print(
        f"XMem on CPU, {args.threads} threads, {args.precision}{compiled}, {width}x{height}, "
        f"{args.frames} frames, synthetic clip and weights"
    )
    for objects in (int(n) for n in args.objects.split(",")):
        command = [
            sys.executable,
            "-m",
            "benchmarks.propagate",
            "--case",
            "--size",
            args.size,
            "--objects",
            str(objects),
            "--frames",
            str(args.frames),
            "--precision",
            args.precision,
            "--threads",
            str(args.threads),
        ]
        command += ["--compile"] if args.compile else []
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        line = (
            f"{objects} object(s): {describe_times(result['seconds'])}, "
            f"peak RSS {result['peak_rss_mb'] / 1000:.2f} GB, "
            f"{result['gflops']:.0f} GFLOP/s achieved"
        )
        reference = REFERENCE.get((width, height, objects))
        if reference:
            line += (
                f"; reference {reference[0]:.3f} s/frame, {reference[1] / 1000:.2f} GB "
                f"-> {reference[0] / result['median']:.2f}x"
            )
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
