"""Bounded memory on long videos (issue 6): RSS and time per frame over a 10,000-frame clip.

    python -m benchmarks.long_video --frames 10000 [--size 320x192] [--plot FILE.png]

Default XMem settings, so long-term memory fills (first pruning near frame 2,000) and is then
pruned again and again. The clip is synthetic and computed frame by frame (no decoding, no
spill), processed at its native size. Prints the RSS at frame 1,000 and the peak after it, the
median time per frame by block, and writes the plot and a CSV beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from xmem_label.model import Session, load_engine

from .common import SyntheticClip, current_rss_mb, peak_rss_mb, synthetic_checkpoint

CHECKPOINT_FRAME = 1000  # memory and speed from here on are compared with this frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--size", default="320x192", help="WIDTHxHEIGHT")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("long_video.png"))
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)

    engine = load_engine(
        "xmem", weights=synthetic_checkpoint(), size=-1, device="cpu", precision=args.precision
    )
    clip = SyntheticClip(args.frames, height, width)
    session = Session(engine, clip)
    session.add_mask(0, clip.first_mask(1))
    seconds, rss = [], []
    last = time.perf_counter()
    for result in session.propagate(direction="forward"):
        now = time.perf_counter()
        seconds.append(now - last)
        rss.append(current_rss_mb())
        last = now
        if result.index % 500 == 0:
            print(f"frame {result.index}: {seconds[-1]:.3f} s, RSS {rss[-1]:.0f} MB", flush=True)

    report(seconds, rss, args)
    return 0


def report(seconds: list[float], rss: list[float], args: argparse.Namespace) -> None:
    frames = len(seconds)
    block = max(frames // 10, 1)
    print(f"\n{frames} frames at {args.size}, {args.precision}, {args.threads} threads")
    print(f"peak RSS of the process: {peak_rss_mb():.0f} MB")
    if frames > CHECKPOINT_FRAME:
        at_checkpoint = rss[CHECKPOINT_FRAME]
        after = max(rss[CHECKPOINT_FRAME:])
        print(
            f"RSS at frame {CHECKPOINT_FRAME}: {at_checkpoint:.0f} MB; highest after it: "
            f"{after:.0f} MB ({(after / at_checkpoint - 1) * 100:+.1f} %)"
        )
        early = statistics.median(seconds[CHECKPOINT_FRAME : CHECKPOINT_FRAME + block])
        late = statistics.median(seconds[-block:])
        print(
            f"median s/frame, frames {CHECKPOINT_FRAME}-{CHECKPOINT_FRAME + block}: "
            f"{early:.4f}; last {block} frames: {late:.4f} ({(late / early - 1) * 100:+.1f} %)"
        )
    for start in range(0, frames, block):
        part = seconds[start : start + block]
        peak = max(rss[start : start + block])
        print(
            f"  frames {start:>6}-{start + len(part) - 1:>6}: "
            f"median {statistics.median(part):.4f} s/frame, RSS {peak:.0f} MB"
        )

    csv_path = args.plot.with_suffix(".csv")
    csv_path.write_text(
        "frame,seconds,rss_mb\n"
        + "".join(
            f"{i},{s:.5f},{m:.1f}\n" for i, (s, m) in enumerate(zip(seconds, rss, strict=True))
        )
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(rss, linewidth=0.8)
    top.set_ylabel("RSS (MB)")
    top.set_title(f"XMem, {args.size}, {frames} frames, default memory settings")
    bottom.plot(seconds, linewidth=0.3, alpha=0.5, label="per frame")
    smooth = [statistics.median(seconds[max(0, i - 50) : i + 50]) for i in range(0, frames, 25)]
    bottom.plot(range(0, frames, 25), smooth, linewidth=1.2, label="running median")
    bottom.set_ylabel("seconds per frame")
    bottom.set_xlabel("frame")
    bottom.legend()
    figure.tight_layout()
    figure.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}; data: {csv_path}")


if __name__ == "__main__":
    sys.exit(main())
