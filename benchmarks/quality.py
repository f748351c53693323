"""Accuracy (J&F) and speed of the flow engine beside two baselines (issue 3).

    python -m benchmarks.quality [--data ../shared/data/vos] [--sequences a,b] [--threads 2]

The DIS-warp baseline chains backward DIS flow (PRESET_MEDIUM, full resolution) from the
previous frame and warps the previous frame's hard mask, thresholded at 0.5; copying the
keyframe's mask to every frame is the lower bound (both in model/baselines.py).
All engines go through the same Session and scoring (model/evaluation.py). Frames/s counts
propagation with frame decoding; the machine is shared, so timings are noisy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from xmem_label.model import Session, load_engine, read_label_mask
from xmem_label.model.baselines import CopyFirstMaskEngine, DisWarpEngine
from xmem_label.model.evaluation import (
    boundary_accuracy,
    evaluate_dataset,
    format_report,
    region_similarity,
)

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "vos"


def measure_speed(clip_dir: Path, engine, repeats: int = 3) -> tuple[float, float]:
    """Frames/s of one clip's propagation from decoded frames in memory (best of `repeats`,
    wall clock) and from the process's CPU time (what an idle machine would give; the machine
    is shared, so the wall clock is often slower)."""
    frames = [
        cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        for path in sorted((clip_dir / "frames").glob("*.jpg"))
    ]
    keyframe = read_label_mask(sorted((clip_dir / "masks").glob("*.png"))[0])
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        session = Session(engine, frames)
        session.add_mask(0, keyframe)
        wall, cpu = time.perf_counter(), time.process_time()
        for _result in session.propagate():
            pass
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return len(frames) / best_wall, len(frames) / best_cpu


def union_score(clip_dir: Path, keyframe_labels: Path, engine) -> tuple[float, float]:
    """J and F of the union of the objects propagated from a multi-object first frame, against
    single-object ground truth (bmx-trees: bike and rider split as in DAVIS 2017)."""
    truths = sorted((clip_dir / "masks").glob("*.png"))
    j_scores, f_scores = [], []
    with Session(engine, clip_dir / "frames") as session:
        session.add_mask(0, read_label_mask(keyframe_labels))
        for result in session.propagate():
            if result.index > 0:
                predicted, true = result.labels > 0, read_label_mask(truths[result.index]) > 0
                j_scores.append(region_similarity(predicted, true))
                f_scores.append(boundary_accuracy(predicted, true))
    return float(np.mean(j_scores)), float(np.mean(f_scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of DAVIS-format clips")
    parser.add_argument("--sequences", help="comma-separated clip names (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="OpenCV and torch threads")
    parser.add_argument(
        "--speed-clip", default="blackswan", help="clip (854x480, one object) timed from memory"
    )
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)
    sequences = [name for name in (args.sequences or "").split(",") if name] or None
    reports = {}
    for engine in (CopyFirstMaskEngine(), DisWarpEngine(), load_engine("flow")):
        started = time.perf_counter()
        reports[engine.name] = evaluate_dataset(args.data, engine, sequences=sequences)
        print(format_report(reports[engine.name]))
        print(f"({time.perf_counter() - started:.0f} s including scoring)\n")
    copied, baseline, flow = reports.values()
    print(f"{'J&F':<18} {'copy':>6} {'dis-warp':>8} {'flow':>6}")
    for clips in zip(copied.clips, baseline.clips, flow.clips, strict=True):
        print(f"{clips[0].name:<18} {clips[0].jf:>6.3f} {clips[1].jf:>8.3f} {clips[2].jf:>6.3f}")
    print(f"{'mean':<18} {copied.jf:>6.3f} {baseline.jf:>8.3f} {flow.jf:>6.3f}")
    fps = baseline.frames_per_second, flow.frames_per_second
    print(f"{'frames/s':<18} {'':>6} {fps[0]:>8.1f} {fps[1]:>6.1f}  (with JPEG decoding)")
    split = Path(args.data) / "bmx-trees" / "instances_davis2017" / "00000.png"
    if split.is_file() and not sequences:
        j, f = union_score(split.parent.parent, split, load_engine("flow"))
        print(f"bmx-trees from its two-object first frame (union scored): J&F {(j + f) / 2:.3f}")
    wall, cpu = measure_speed(Path(args.data) / args.speed_clip, load_engine("flow"))
    print(
        f"flow engine on {args.speed_clip} from memory, {args.threads} thread(s): "
        f"{wall:.1f} frames/s wall clock, {cpu:.1f} frames/s of CPU time"
    )


if __name__ == "__main__":
    main()
