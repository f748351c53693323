"""The annotation loop's figures (issue 15): two-way propagation, the effort curve, the cost
of a correction.

    python -m benchmarks.annotation_loop two-way [--data ../shared/data/vos]
    python -m benchmarks.annotation_loop effort  [--rounds 5] [--json FILE]
    python -m benchmarks.annotation_loop cost    [--engine flow|xmem] [--frames 300]
    python -m benchmarks.annotation_loop memory  [--every 20]

two-way: per clip, J&F of the forward pass from the first frame's ground truth, the backward
pass from the last frame's, and the reconciled result of both keyframes (the two keyframes are
not scored). effort: the simulated annotator (model/effort.py) with every strategy, a table of
mean J&F per round, area, corrections to 0.85 and the round-0 ranking. cost: a clip of `--frames`
frames (a shared clip played forward and backward, at its 854x480), keyframes at 0 and the last
frame then a correction on the middle one, and keyframes every 50 frames then a correction on
frame 125; prints the network steps and wall time of the first (from-scratch) run and of the
correction's, and the disk the session keeps per stored frame. XMem runs with the equivalence
fixtures' deterministic weights (speed does not depend on their values). memory: what a segment
pass starts from, measured: keyframes (ground truth) every `--every` frames, J&F of one long
forward pass through all of them (memory carried across keyframes) against forward passes
restarted at each keyframe (what the session's passes do), and the reconciled result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from xmem_label.model import Session, load_engine
from xmem_label.model.effort import (
    STRATEGIES,
    TARGET_JF,
    TruthClip,
    curve_area,
    effort_json,
    format_efforts,
    simulate_dataset,
)
from xmem_label.model.evaluation import find_clips

from .common import synthetic_checkpoint

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "vos"


def two_way(data: Path) -> None:
    engine = load_engine("flow")
    rows = []
    print(f"{'clip':<16} {'forward':>8} {'backward':>8} {'both':>8} {'vs better':>9}")
    for clip_dir in find_clips(data):
        clip = TruthClip(clip_dir)
        first, last = min(clip.truth), max(clip.truth)
        figures = []
        for keyframes, direction in (
            ([first], "forward"),
            ([last], "both"),
            ([first, last], "both"),
        ):
            with Session(engine, clip.frames_dir) as session:
                for index in keyframes:
                    clip.state(session, index)
                scores = clip.frame_scores(session.run(direction=direction))
            scored = [(j + f) / 2 for i, (j, f) in scores.items() if i not in (first, last)]
            figures.append(float(np.mean(scored)))
        forward, backward, both = figures
        rows.append(figures)
        margin = both - max(forward, backward)
        print(f"{clip.name:<16} {forward:>8.3f} {backward:>8.3f} {both:>8.3f} {margin:>+9.3f}",
              flush=True)  # fmt: skip
    forward, backward, both = np.mean(rows, axis=0)
    worst = min(row[2] - max(row[0], row[1]) for row in rows)
    print(f"{'mean':<16} {forward:>8.3f} {backward:>8.3f} {both:>8.3f}")
    print(f"reconciled - forward: {both - forward:+.3f}; worst clip against its better "
          f"single direction: {worst:+.3f}")  # fmt: skip


def effort(data: Path, rounds: int, json_path: Path | None) -> None:
    engine = load_engine("flow")
    results = {}
    for strategy in STRATEGIES:
        efforts = simulate_dataset(data, engine, rounds=rounds, strategy=strategy)
        results[strategy] = efforts
        print(format_efforts(efforts), "\n", flush=True)
    print(f"{'strategy':<10} " + " ".join(f"{'r' + str(r):>6}" for r in range(rounds + 1))
          + f" {'AUC':>6} {'to.85':>6} {'reached':>7}")  # fmt: skip
    for strategy, efforts in results.items():
        curve = [float(np.mean([e.curve[r] for e in efforts])) for r in range(rounds + 1)]
        reached = [e.corrections_to_target for e in efforts]
        counted = [rounds + 1 if r is None else r for r in reached]
        print(f"{strategy:<10} " + " ".join(f"{jf:>6.3f}" for jf in curve)
              + f" {curve_area(curve):>6.3f} {np.mean(counted):>6.2f} "
              f"{sum(r is not None for r in reached):>4}/{len(efforts)}")  # fmt: skip
    print(f"(to.85: mean corrections to J&F >= {TARGET_JF}, a clip never reaching it counted "
          f"as {rounds + 1})")  # fmt: skip
    if json_path is not None:
        json_path.write_text(json.dumps({s: effort_json(e) for s, e in results.items()}, indent=1))


def ping_pong(clip_dir: Path, length: int, folder: Path) -> Path:
    """`length` frames of a clip played forward and backward, written as JPEG files."""
    paths = sorted((clip_dir / "frames").glob("*.jpg"))
    cycle = paths + paths[-2:0:-1]
    frames = folder / "frames"
    frames.mkdir()
    for index in range(length):
        image = cv2.imread(str(cycle[index % len(cycle)]))
        cv2.imwrite(str(frames / f"{index:05d}.jpg"), image)
    return frames


def cost(data: Path, engine_name: str, length: int, clip_name: str, scenarios: str) -> None:
    options = {"weights": synthetic_checkpoint(), "device": "cpu"} if engine_name == "xmem" else {}
    engine = load_engine(engine_name, **options)
    clip = TruthClip(data / clip_name)
    mask_cycle = [clip.truth[i] for i in sorted(clip.truth)]
    mask_cycle += mask_cycle[-2:0:-1]

    def truth(index: int) -> np.ndarray:
        return mask_cycle[index % len(mask_cycle)]

    last = length - 1
    chosen = [
        (title, keyframes, correction)
        for name, title, keyframes, correction in (
            ("ends", "keyframes 0 and last, correction on the middle", [0, last], length // 2),
            ("spaced", "keyframes every 50 frames, correction on 125",
             [*range(0, last, 50), last], 125),
        )
        if name in scenarios.split(",")
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as temporary:
        frames = ping_pong(data / clip_name, length, Path(temporary))
        print(f"{engine_name}, {length} frames of {clip_name} (forward and backward), "
              f"{cv2.imread(str(next(frames.iterdir()))).shape[1::-1]}")  # fmt: skip
        for title, keyframes, correction in chosen:
            with Session(engine, frames) as session:
                for index in keyframes:
                    session.add_mask(index, truth(index))
                started = time.perf_counter()
                session.run()
                full_seconds, full_steps = time.perf_counter() - started, session.network_steps
                disk, stored = session.stored_pass_bytes()
                session.add_mask(correction, truth(correction))
                started = time.perf_counter()
                session.run()
                seconds, steps = time.perf_counter() - started, session.network_steps
            print(f"{title}:\n  from scratch: {full_steps} network steps, {full_seconds:.1f} s\n"
                  f"  correction:   {steps} network steps, {seconds:.1f} s "
                  f"({seconds / full_seconds:.0%} of the time, {steps / full_steps:.0%} of the "
                  f"steps)\n  kept on disk: {disk / max(stored, 1) / 1024:.1f} KB per stored "
                  f"frame ({stored} frames, {disk / 1e6:.1f} MB)", flush=True)  # fmt: skip


def memory(data: Path, every: int) -> None:
    engine = load_engine("flow")
    print(f"keyframes every {every} frames; J&F of the frames between them")
    print(f"{'clip':<16} {'one pass':>8} {'restarted':>9} {'both':>8}")
    rows = []
    for clip_dir in find_clips(data):
        clip = TruthClip(clip_dir)
        keyframes = [*range(0, clip.length - 1, every), clip.length - 1]
        frames = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
                  for p in sorted(clip.frames_dir.glob("*.jpg"))]  # fmt: skip
        results = {}
        for direction in ("forward", "both"):
            with Session(engine, frames) as session:
                for index in keyframes:
                    clip.state(session, index)
                results[direction] = session.run(direction=direction)
        restarted = []
        for start, stop in zip(keyframes, keyframes[1:], strict=False):
            with Session(engine, frames[start:stop]) as session:
                clip.state_as(session, 0, start)
                restarted += [
                    dataclasses.replace(r, index=r.index + start)
                    for r in session.run(direction="forward")
                ]
        figures = []
        for outcome in (results["forward"], restarted, results["both"]):
            scores = clip.frame_scores(outcome)
            figures.append(float(np.mean([(j + f) / 2 for i, (j, f) in scores.items()
                                          if i not in keyframes])))  # fmt: skip
        rows.append(figures)
        print(f"{clip.name:<16} " + " ".join(f"{x:>8.3f}" for x in figures), flush=True)
    print(f"{'mean':<16} " + " ".join(f"{x:>8.3f}" for x in np.mean(rows, axis=0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", choices=("two-way", "effort", "cost", "memory"))
    parser.add_argument("--every", type=int, default=20, help="memory: keyframe spacing")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--engine", default="flow", choices=("flow", "xmem"))
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument(
        "--clip", default="dance-twirl", help="clip for cost (default: %(default)s)"
    )
    parser.add_argument("--scenarios", default="ends,spaced", help="cost: ends and/or spaced")
    args = parser.parse_args()
    if args.figure == "two-way":
        two_way(args.data)
    elif args.figure == "effort":
        effort(args.data, args.rounds, args.json)
    elif args.figure == "memory":
        memory(args.data, args.every)
    else:
        cost(args.data, args.engine, args.frames, args.clip, args.scenarios)


if __name__ == "__main__":
    main()
