"""How much annotator work propagation saves: a simulated annotator on DAVIS-format clips.

Like the DAVIS interactive benchmark, ground truth plays the person:
- round 0: the ground truth of the first frame where each object appears is the keyframe;
- each later round, a strategy picks one frame, its ground truth (every object: a mask, or
  absent) becomes a keyframe, and the session re-propagates incrementally.

Strategies: "suggested" (the session's first suggestion), "uniform" (the frame farthest from
every keyframe: keyframes spread evenly), "random" (fixed seed), "worst" (the frame with the
lowest true J&F: an oracle no real user has, the upper bound).

Scored after every round: J&F over every frame with ground truth except the round-0 keyframes
(the same frames in every round and strategy; a corrected frame counts with its perfect mask,
the work it cost is the round). Reported per clip: the J&F curve, its area (the mean of the
trapezoids between rounds), the corrections needed to reach J&F >= 0.85, and each round's
propagation seconds against a from-scratch run of the same keyframes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .engine import Engine, load_engine
from .errors import InputError
from .evaluation import FRAME_SUFFIXES, boundary_accuracy, find_clips, region_similarity
from .masks import read_label_mask
from .results import FrameResult
from .session import Session

STRATEGIES = ("suggested", "uniform", "random", "worst")
TARGET_JF = 0.85
RANKING_SHARE = 0.1  # the ranking figure compares the top 10 % of suggest with the worst 10 %


@dataclasses.dataclass(frozen=True)
class RoundScore:
    round: int
    picked: int | None  # the frame corrected in this round (None in round 0)
    jf: float
    seconds: float  # this round's propagation (incremental after round 0)
    scratch_seconds: float | None  # a fresh session with the same keyframes
    network_steps: int


@dataclasses.dataclass(frozen=True)
class ClipEffort:
    name: str
    frames: int
    strategy: str
    rounds: list[RoundScore]
    ranking_hits: int  # round 0: of the top 10 % suggested frames, how many are 10 % worst by J
    ranking_size: int

    @property
    def curve(self) -> list[float]:
        return [score.jf for score in self.rounds]

    @property
    def area(self) -> float:
        return curve_area(self.curve)

    @property
    def corrections_to_target(self) -> int | None:
        return next((score.round for score in self.rounds if score.jf >= TARGET_JF), None)


def curve_area(curve: Sequence[float]) -> float:
    """The mean height of the J&F curve over rounds (trapezoids); its only point if one."""
    if len(curve) == 1:
        return float(curve[0])
    return float(np.mean([(a + b) / 2 for a, b in zip(curve, curve[1:], strict=False)]))


class TruthClip:
    """A clip's frames and ground truth (label masks by frame index)."""

    def __init__(self, clip_dir: Path):
        self.name = clip_dir.name
        self.frames_dir = clip_dir / "frames"
        paths = sorted(p for p in self.frames_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        truths = {p.stem: p for p in (clip_dir / "masks").glob("*.png")}
        self.truth = {
            index: read_label_mask(truths[path.stem])
            for index, path in enumerate(paths)
            if path.stem in truths
        }
        self.length = len(paths)
        self.object_ids = sorted({int(v) for mask in self.truth.values() for v in np.unique(mask)})
        self.object_ids = [obj for obj in self.object_ids if obj != 0]
        if not self.object_ids:
            raise InputError(f"{self.name}: no object in any ground-truth mask")

    def first_keyframes(self) -> list[int]:
        """The first frame with ground truth where each object appears."""
        firsts = set()
        for object_id in self.object_ids:
            firsts.add(min(i for i, mask in self.truth.items() if (mask == object_id).any()))
        return sorted(firsts)

    def state(self, session: Session, index: int) -> None:
        """Give the session frame `index`'s ground truth: each object's mask, or absent."""
        self.state_as(session, index, index)

    def state_as(self, session: Session, index: int, truth_index: int) -> None:
        """Give the session, on its frame `index`, the ground truth of frame `truth_index`."""
        for object_id in self.object_ids:
            mask = self.truth[truth_index] == object_id
            if mask.any():
                session.add_object_mask(index, object_id, mask)
            else:
                session.set_absent(index, object_id)

    def frame_scores(self, results: list[FrameResult]) -> dict[int, tuple[float, float]]:
        """Per frame with ground truth: (J, F), each the mean over the clip's objects."""
        scores = {}
        for result in results:
            truth = self.truth.get(result.index)
            if truth is None:
                continue
            pairs = [
                (
                    region_similarity(result.labels == obj, truth == obj),
                    boundary_accuracy(result.labels == obj, truth == obj),
                )
                for obj in self.object_ids
            ]
            scores[result.index] = (
                float(np.mean([p[0] for p in pairs])),
                float(np.mean([p[1] for p in pairs])),
            )
        return scores


def simulate_clip(
    clip_dir: Path,
    engine: Engine,
    *,
    rounds: int,
    strategy: str,
    seed: int = 0,
    compare_scratch: bool = True,
) -> ClipEffort:
    """Run the simulated annotator on one clip (see the module's docstring)."""
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    clip = TruthClip(clip_dir)
    rng = np.random.default_rng([seed, sum(clip.name.encode())])
    initial = clip.first_keyframes()
    keyframes = list(initial)
    scores: list[RoundScore] = []
    ranking = (0, 0)
    with Session(engine, clip.frames_dir) as session:
        for index in initial:
            clip.state(session, index)
        picked: int | None = None
        for round_number in range(rounds + 1):
            started = time.perf_counter()
            results = session.run()
            seconds = time.perf_counter() - started
            frame_scores = clip.frame_scores(results)
            scored = {i: s for i, s in frame_scores.items() if i not in initial}
            scratch = _scratch_seconds(engine, clip, keyframes) if compare_scratch else None
            jf = _clip_jf(scored) if scored else 1.0
            scores.append(
                RoundScore(round_number, picked, jf, seconds, scratch, session.network_steps)
            )
            if round_number == 0:
                ranking = _ranking(session, scored)
            if round_number == rounds:
                break
            picked = _pick(strategy, session, clip, keyframes, frame_scores, rng)
            if picked is None:  # every frame is a keyframe
                break
            keyframes.append(picked)
            clip.state(session, picked)
    return ClipEffort(clip.name, clip.length, strategy, scores, *ranking)


def simulate_dataset(
    data_dir: str | Path,
    engine: Engine,
    *,
    rounds: int,
    strategy: str,
    sequences: Sequence[str] | None = None,
    seed: int = 0,
    compare_scratch: bool = True,
    progress: Callable[[ClipEffort], None] | None = None,
) -> list[ClipEffort]:
    efforts = []
    for clip_dir in find_clips(data_dir, sequences):
        effort = simulate_clip(
            clip_dir,
            engine,
            rounds=rounds,
            strategy=strategy,
            seed=seed,
            compare_scratch=compare_scratch,
        )
        efforts.append(effort)
        if progress is not None:
            progress(effort)
    return efforts


def _clip_jf(scored: dict[int, tuple[float, float]]) -> float:
    return float(np.mean([(j + f) / 2 for j, f in scored.values()]))


def _pick(
    strategy: str,
    session: Session,
    clip: TruthClip,
    keyframes: list[int],
    frame_scores: dict[int, tuple[float, float]],
    rng: np.random.Generator,
) -> int | None:
    """The frame the strategy corrects next (only frames with ground truth, not keyframes)."""
    candidates = [i for i in sorted(clip.truth) if i not in keyframes]
    if not candidates:
        return None
    if strategy == "suggested":
        for suggestion in session.suggest(len(candidates)):
            if suggestion.index in candidates:
                return suggestion.index
        return candidates[0]
    if strategy == "uniform":
        return max(candidates, key=lambda i: (min(abs(i - k) for k in keyframes), -i))
    if strategy == "random":
        return int(rng.choice(candidates))
    return min(candidates, key=lambda i: (sum(frame_scores[i]) / 2, i))  # worst


def _ranking(session: Session, scored: dict[int, tuple[float, float]]) -> tuple[int, int]:
    """Of the RANKING_SHARE frames `rank_frames` puts first, how many are among the worst by
    true J."""
    size = max(1, round(RANKING_SHARE * len(scored)))
    worst = set(sorted(scored, key=lambda i: (scored[i][0], i))[:size])
    suggested = [s.index for s in session.rank_frames() if s.index in scored][:size]
    return len(worst & set(suggested)), size


def _scratch_seconds(engine: Engine, clip: TruthClip, keyframes: list[int]) -> float:
    """Propagation seconds of a fresh session with the same keyframes."""
    with Session(engine, clip.frames_dir) as fresh:
        for index in keyframes:
            clip.state(fresh, index)
        started = time.perf_counter()
        for _ in fresh.propagate():
            pass
        return time.perf_counter() - started


def format_efforts(efforts: list[ClipEffort]) -> str:
    """Per clip and on average: J&F per round, area, corrections to 0.85, seconds per round
    (incremental / from scratch)."""
    rounds = max(len(e.rounds) for e in efforts)
    header = (
        f"{'clip':<16} "
        + " ".join(f"{'r' + str(r):>6}" for r in range(rounds))
        + f" {'AUC':>6} {'to.85':>6}  seconds per round (incremental/scratch)"
    )
    lines = [f"strategy: {efforts[0].strategy}", header, "-" * len(header)]
    for effort in efforts:
        to_target = effort.corrections_to_target
        lines.append(
            f"{effort.name:<16} "
            + " ".join(f"{jf:>6.3f}" for jf in effort.curve)
            + " " * (7 * (rounds - len(effort.curve)))
            + f" {effort.area:>6.3f} {'-' if to_target is None else to_target:>6}  "
            + " ".join(_seconds(score) for score in effort.rounds)
        )
    lines.append("-" * len(header))
    mean_curve = [
        float(np.mean([e.curve[r] for e in efforts if r < len(e.curve)])) for r in range(rounds)
    ]
    reached = [e.corrections_to_target for e in efforts]
    reached_mean = _mean_corrections(reached, rounds)
    lines.append(
        f"{'mean':<16} "
        + " ".join(f"{jf:>6.3f}" for jf in mean_curve)
        + f" {float(np.mean([e.area for e in efforts])):>6.3f} {reached_mean:>6}"
    )
    hits = sum(e.ranking_hits for e in efforts)
    size = sum(e.ranking_size for e in efforts)
    lines.append(
        f"clips reaching J&F >= {TARGET_JF}: {sum(r is not None for r in reached)}/{len(efforts)}"
        f"; round-0 ranking: {hits}/{size} = {hits / max(size, 1):.0%} of the top 10 % "
        "ranked frames are among the 10 % worst by J"
    )
    return "\n".join(lines)


def _mean_corrections(reached: list[int | None], rounds: int) -> str:
    """The mean corrections to the target, counting a clip that never got there as rounds
    (a lower bound, marked with >=)."""
    values = [rounds if r is None else r for r in reached]
    mean = float(np.mean(values))
    prefix = ">=" if any(r is None for r in reached) else ""
    return f"{prefix}{mean:.2f}" if not math.isnan(mean) else "-"


def _seconds(score: RoundScore) -> str:
    scratch = "-" if score.scratch_seconds is None else f"{score.scratch_seconds:.1f}"
    return f"{score.seconds:.1f}/{scratch}"


def effort_json(efforts: list[ClipEffort]) -> dict[str, object]:
    return {
        "strategy": efforts[0].strategy if efforts else None,
        "clips": [
            {
                "name": e.name,
                "frames": e.frames,
                "rounds": [dataclasses.asdict(score) for score in e.rounds],
                "area": e.area,
                "corrections_to_target": e.corrections_to_target,
                "ranking_hits": e.ranking_hits,
                "ranking_size": e.ranking_size,
            }
            for e in efforts
        ],
        "target_jf": TARGET_JF,
    }


def run_effort(args: argparse.Namespace) -> int:
    """`xmem-label eval --rounds R`: print (and with --json write) the effort figures."""
    if args.rounds < 0:
        raise InputError(f"--rounds must be 0 or more, not {args.rounds}")
    if args.out is not None:
        raise InputError("--out is not used with --rounds; use --json for the figures")
    engine = load_engine(args.engine)
    sequences = [name for name in (args.sequences or "").split(",") if name] or None
    efforts = simulate_dataset(
        args.data,
        engine,
        rounds=args.rounds,
        strategy=args.strategy,
        sequences=sequences,
        seed=args.seed,
        compare_scratch=not args.no_scratch,
        progress=lambda effort: print(format_efforts([effort]).splitlines()[3], flush=True),
    )
    print(format_efforts(efforts))
    if args.json is not None:
        args.json.write_text(json.dumps(effort_json(efforts), indent=2) + "\n")
    return 0
