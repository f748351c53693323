"""Time to the first masks against time to every mask, on a 300-frame clip (issue 17, item 4).

    python -m benchmarks.first_mask [--clip blackswan] [--frames 300] [--size 480] [--threads 2]
        [--cases flow,xmem-int8,xmem-fp32] [--direction both|forward] [--data ../shared/data/vos]

A DAVIS clip played forward and backward to --frames frames (`annotation_loop.ping_pong`), its
first ground-truth mask as the keyframe on frame 0, propagated as the platforms do (the default
reconciled mode). The session yields each frame as soon as the passes it reads have computed
it, so a platform can store the first masks while the rest runs: this prints when the first 10
arrive against when the last does. XMem runs on the synthetic weights (speed does not depend on
their values) at internal short side --size. Times count from the call of propagate(), with the
engine loaded before; the cases run one after the other in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2

from xmem_label.model import Session, load_engine, read_label_mask

from .annotation_loop import DEFAULT_DATA, ping_pong
from .common import synthetic_checkpoint

FIRST = 10  # frames a platform could store as a first batch
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "flow": ("flow", {}),
    "xmem-int8": ("xmem", {"precision": "int8"}),
    "xmem-fp32": ("xmem", {"precision": "fp32"}),
}


def arrival_times(
    engine_name: str, options: dict[str, Any], frames: Path, keyframe: Path, direction: str
) -> list[float]:
    """Seconds from propagate() to each frame's result, in frame order."""
    engine = load_engine(engine_name, **options)
    with Session(engine, frames) as session:
        session.add_mask(0, read_label_mask(keyframe))
        started = time.perf_counter()
        return [time.perf_counter() - started for _ in session.propagate(direction=direction)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--clip", default="blackswan")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", type=int, default=480, help="XMem's internal short side")
    parser.add_argument("--threads", type=int, default=2, help="the engines' threads option")
    parser.add_argument("--cases", default=",".join(CASES), help=", ".join(CASES))
    parser.add_argument("--direction", default="both", choices=["both", "forward"])
    args = parser.parse_args(argv)
    clip = args.data / args.clip
    keyframe = sorted((clip / "masks").glob("*.png"))[0]
    with tempfile.TemporaryDirectory(prefix="first-mask-") as temporary:
        frames = ping_pong(clip, args.frames, Path(temporary))
        width, height = cv2.imread(str(next(frames.iterdir()))).shape[1::-1]
        print(
            f"{args.frames} frames of {args.clip} (forward and backward), {width}x{height}, "
            f"keyframe on frame 0, direction {args.direction}, {args.threads} threads; "
            f"XMem at size {args.size}, synthetic weights; load average "
            f"{os.getloadavg()[0]:.2f}",
            flush=True,
        )
        for case in args.cases.split(","):
            engine_name, options = CASES[case]
            options = {**options, "threads": args.threads}
            if engine_name == "xmem":
                options |= {"weights": synthetic_checkpoint(), "device": "cpu", "size": args.size}
            times = arrival_times(engine_name, options, frames, keyframe, args.direction)
            first, last = times[FIRST - 1], times[-1]
            print(
                f"{case}: first frame {times[0]:.2f} s, first {FIRST} frames {first:.1f} s, "
                f"all {len(times)} frames {last:.1f} s ({first / last:.1%} of the time), "
                f"{(last - first) / (len(times) - FIRST):.3f} s/frame after the first {FIRST}",
                flush=True,
            )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
