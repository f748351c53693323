"""Fast modes (bf16, int8) against exact mode (float32) on real clips (issue 6, goal 2).

    python -m benchmarks.fast_mode [--data ../shared/data/vos] [--sequences a,b]
        [--precisions bf16,int8] [--weights XMem.pth] [--threads 2]

Both modes propagate each clip forward from its ground-truth first-frame mask (the setup of the
weight-free engine's evaluation), by default with the synthetic seed-1 weights: the official
ones cannot be downloaded here; `--weights` checks a real checkpoint. Per clip: argmax
agreement over all pixels and over the pixels exact mode decides by a probability margin above
0.05, the share of such decided pixels, and the largest probability difference. Random weights
leave many near-ties, which real weights do not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from xmem_label.model import load_engine
from xmem_label.model.evaluation import compare_clip

from .common import synthetic_checkpoint
from .quality import DEFAULT_DATA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of DAVIS-format clips")
    parser.add_argument("--sequences", help="comma-separated clip names (default: all)")
    parser.add_argument("--precisions", default="bf16,int8", help="fast precisions to compare")
    parser.add_argument("--size", type=int, default=480, help="internal short side (-1 native)")
    parser.add_argument("--weights", help="checkpoint path or name (default: synthetic weights)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    weights = args.weights or synthetic_checkpoint()
    torch.set_num_threads(args.threads)

    def engine(precision: str):
        return load_engine(
            "xmem", weights=weights, device="cpu", size=args.size, precision=precision
        )

    exact = engine("fp32")
    data = Path(args.data)
    names = [n for n in (args.sequences or "").split(",") if n] or sorted(
        p.name for p in data.iterdir() if (p / "frames").is_dir()
    )
    for precision in args.precisions.split(","):
        fast = engine(precision)
        print(
            f"\n{precision} against fp32, {args.weights or 'synthetic weights'}, size "
            f"{args.size}, {args.threads} threads"
        )
        print(f"{'clip':<16} {'all px':>8} {'decided px':>11} {'decided share':>14} {'max|dp|':>8}")
        rows = []
        for name in names:
            row = compare_clip(data / name, exact, fast)
            rows.append(row)
            print(
                f"{name:<16} {row['agreement']:>8.2%} {row['decided_agreement']:>11.3%} "
                f"{row['decided_share']:>14.1%} {row['max_difference']:>8.3f}",
                flush=True,
            )
        print(
            f"{'mean':<16} {np.mean([r['agreement'] for r in rows]):>8.2%} "
            f"{np.mean([r['decided_agreement'] for r in rows]):>11.3%} "
            f"{np.mean([r['decided_share'] for r in rows]):>14.1%} "
            f"{max(r['max_difference'] for r in rows):>8.3f}"
        )


if __name__ == "__main__":
    main()
