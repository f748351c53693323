"""Accuracy of an engine on DAVIS-format clips: region similarity J and boundary accuracy F.

A dataset is a folder of clips, each `<clip>/frames/*.jpg|png` with `<clip>/masks/*.png` matched
by file stem. The mask of the keyframe (the first frame unless told otherwise) is given to the
engine; every other frame with a ground-truth mask is scored, following the DAVIS 2017
definitions: J is the IoU of an object's predicted and true masks, F the F-measure of their
boundaries matched within ceil(0.008 x image diagonal) pixels. A clip's J (F) is the mean over
its objects of the mean over scored frames; J&F is the mean of J and F.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from .engine import Engine, load_engine
from .errors import InputError
from .masks import read_label_mask, write_label_mask
from .outputs import check_apart, check_replaceable, remove_stale_partials, staged_output
from .session import Session

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
BOUNDARY_TOLERANCE = 0.008  # of the image diagonal, as in the DAVIS benchmark


@dataclasses.dataclass(frozen=True)
class ClipScore:
    name: str
    frames: int
    objects: int
    j: float
    f: float
    seconds: float

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    engine: str
    clips: list[ClipScore]

    @property
    def j(self) -> float:
        return float(np.mean([clip.j for clip in self.clips]))

    @property
    def f(self) -> float:
        return float(np.mean([clip.f for clip in self.clips]))

    @property
    def jf(self) -> float:
        return float(np.mean([clip.jf for clip in self.clips]))

    @property
    def frames_per_second(self) -> float:
        seconds = sum(clip.seconds for clip in self.clips)
        return sum(clip.frames for clip in self.clips) / seconds if seconds else 0.0


def region_similarity(predicted: np.ndarray, truth: np.ndarray) -> float:
    """J: IoU of two boolean masks; 1 when both are empty."""
    union = np.logical_or(predicted, truth).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(predicted, truth).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a boolean mask: object pixels with a background 4-neighbour
    (the image border counts as background)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def boundary_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """F: boundary F-measure, boundary pixels matched within ceil(0.008 x diagonal) pixels."""
    tolerance = math.ceil(BOUNDARY_TOLERANCE * math.hypot(*truth.shape))
    predicted_edge, true_edge = boundary_map(predicted), boundary_map(truth)
    predicted_count, true_count = predicted_edge.sum(), true_edge.sum()
    if predicted_count == 0 and true_count == 0:
        return 1.0
    if predicted_count == 0 or true_count == 0:
        return 0.0
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    near_true = cv2.dilate(true_edge.astype(np.uint8), disk).astype(bool)
    near_predicted = cv2.dilate(predicted_edge.astype(np.uint8), disk).astype(bool)
    precision = (predicted_edge & near_true).sum() / predicted_count
    recall = (true_edge & near_predicted).sum() / true_count
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def find_clips(data_dir: str | Path, sequences: Sequence[str] | None = None) -> list[Path]:
    """Clip folders of `data_dir` (those with frames/ and masks/), or the named ones."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"dataset folder not found: {data_dir}")
    if sequences:
        clips = [data_dir / name for name in sequences]
        missing = [clip.name for clip in clips if not (clip / "frames").is_dir()]
        if missing:
            raise InputError(f"no clip {', '.join(missing)} (with a frames/ folder) in {data_dir}")
    else:
        clips = sorted(
            path
            for path in data_dir.iterdir()
            if (path / "frames").is_dir() and (path / "masks").is_dir()
        )
    if not clips:
        raise InputError(f"no clips (<clip>/frames and <clip>/masks) in {data_dir}")
    return clips


def evaluate_clip(
    clip_dir: Path,
    engine: Engine,
    *,
    out_dir: Path | None = None,
    keyframe: int = 0,
) -> ClipScore:
    """Propagate the keyframe's ground truth through one clip and score every other frame."""
    frame_paths = sorted(
        p for p in (clip_dir / "frames").iterdir() if p.suffix.lower() in FRAME_SUFFIXES
    )
    truths = {p.stem: p for p in (clip_dir / "masks").glob("*.png")}
    if not frame_paths:
        raise InputError(f"no frames in {clip_dir / 'frames'}")
    if not 0 <= keyframe < len(frame_paths) or frame_paths[keyframe].stem not in truths:
        raise InputError(f"{clip_dir.name}: no ground-truth mask for keyframe {keyframe}")
    key_labels = read_label_mask(truths[frame_paths[keyframe].stem])
    object_ids = [int(v) for v in np.unique(key_labels) if v != 0]

    if out_dir is not None:
        (out_dir / clip_dir.name).mkdir(parents=True, exist_ok=True)
    session = Session(engine, clip_dir / "frames")
    session.add_mask(keyframe, key_labels)
    j_scores: dict[int, list[float]] = {obj: [] for obj in object_ids}
    f_scores: dict[int, list[float]] = {obj: [] for obj in object_ids}
    seconds = 0.0
    started = time.perf_counter()
    for result in session.propagate():
        seconds += time.perf_counter() - started
        stem = frame_paths[result.index].stem
        if out_dir is not None:
            write_label_mask(out_dir / clip_dir.name / f"{stem}.png", result.labels)
        if result.index != keyframe and stem in truths:
            truth = read_label_mask(truths[stem])
            for obj in object_ids:
                predicted, true = result.labels == obj, truth == obj
                j_scores[obj].append(region_similarity(predicted, true))
                f_scores[obj].append(boundary_accuracy(predicted, true))
        started = time.perf_counter()
    session.close()
    return ClipScore(
        name=clip_dir.name,
        frames=len(frame_paths),
        objects=len(object_ids),
        j=float(np.mean([np.mean(s) if s else 1.0 for s in j_scores.values()])),
        f=float(np.mean([np.mean(s) if s else 1.0 for s in f_scores.values()])),
        seconds=seconds,
    )


def evaluate_dataset(
    data_dir: str | Path,
    engine: Engine,
    *,
    out_dir: str | Path | None = None,
    sequences: Sequence[str] | None = None,
    keyframe: int = 0,
    progress: Callable[[ClipScore], None] | None = None,
) -> EvaluationReport:
    """Score `engine` on every clip of `data_dir` (or the named `sequences`).

    out_dir: write the predicted label masks there as `<clip>/<frame stem>.png`.
    progress(clip_score) is called after each clip. Times count propagation only (frame
    decoding included, scoring and mask writing excluded).
    """
    clips = find_clips(data_dir, sequences)
    out_path = Path(out_dir) if out_dir is not None else None
    scores = []
    for clip in clips:
        score = evaluate_clip(clip, engine, out_dir=out_path, keyframe=keyframe)
        scores.append(score)
        if progress is not None:
            progress(score)
    return EvaluationReport(engine=engine.name, clips=scores)


def format_clip_row(clip: ClipScore) -> str:
    fps = clip.frames / clip.seconds if clip.seconds else 0.0
    return (
        f"{clip.name:<18} {clip.frames:>6} {clip.objects:>7} "
        f"{clip.j:>6.3f} {clip.f:>6.3f} {clip.jf:>6.3f} {fps:>6.1f}"
    )


def format_report(report: EvaluationReport) -> str:
    """A per-clip table (J, F, J&F, frames/s) and the mean over clips."""
    header = f"{'clip':<18} {'frames':>6} {'objects':>7} {'J':>6} {'F':>6} {'J&F':>6} {'fps':>6}"
    lines = [f"engine: {report.engine}", header, "-" * len(header)]
    lines += [format_clip_row(clip) for clip in report.clips]
    lines.append("-" * len(header))
    frames = sum(clip.frames for clip in report.clips)
    lines.append(
        f"{'mean':<18} {frames:>6} {'':>7} {report.j:>6.3f} {report.f:>6.3f} "
        f"{report.jf:>6.3f} {report.frames_per_second:>6.1f}"
    )
    return "\n".join(lines)


def add_eval_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `eval`: score an engine on DAVIS-format clips (J, F, J&F, frames/s)."""
    parser = subparsers.add_parser(
        "eval",
        help="score an engine on DAVIS-format clips (<clip>/frames, <clip>/masks)",
        description="Propagate each clip's keyframe mask and print per-clip and mean J&F "
        "(DAVIS 2017 definitions, keyframe excluded) and frames per second.",
    )
    parser.add_argument("--data", required=True, help="folder of clips")
    parser.add_argument("--engine", default="flow", help="engine name (default: flow)")
    parser.add_argument(
        "--out", type=Path, help="write predicted masks to this folder (written whole at the end)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier eval's --out (nothing else)"
    )
    parser.add_argument("--sequences", help="comma-separated clip names (default: all)")
    parser.add_argument("--keyframe", type=int, default=0, help="keyframe index (default: 0)")
    effort = parser.add_argument_group(
        "simulated annotator",
        "With --rounds R: round 0 keys each object's first frame; each round a strategy picks "
        "a frame, its ground truth becomes a keyframe and the clip is re-propagated "
        "(incrementally). Prints J&F per round, its area, the corrections to reach 0.85 and "
        "each round's seconds against a from-scratch run.",
    )
    effort.add_argument("--rounds", type=int, help="corrections per clip")
    effort.add_argument(
        "--strategy",
        default="suggested",
        choices=("suggested", "uniform", "random", "worst"),
        help="how the annotator picks the frame to correct (worst: the oracle, by true J&F)",
    )
    effort.add_argument("--seed", type=int, default=0, help="seed of --strategy random")
    effort.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    effort.add_argument(
        "--no-scratch", action="store_true", help="skip the from-scratch runs (time only)"
    )
    parser.set_defaults(run=_run_eval)
    return parser


def _run_eval(args: argparse.Namespace) -> int:
    if args.rounds is not None:
        from .effort import run_effort  # effort.py builds on this module's scores

        return run_effort(args)
    out = args.out
    if out is not None:  # the same rules as propagate's --out: see outputs.py
        check_apart(out, None, [("--data folder", Path(args.data))])
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()):
            if not args.force:
                raise InputError(f"--out {out} is not empty; choose another folder or add --force")
            check_replaceable(out, ["eval"], "--force replaces only an earlier eval's output")
    engine = load_engine(args.engine)
    sequences = [name for name in (args.sequences or "").split(",") if name] or None
    with contextlib.ExitStack() as stack:
        staged = None
        if out is not None:
            remove_stale_partials(out)
            staged = stack.enter_context(staged_output(out, None, "eval", replace=True))
        report = evaluate_dataset(
            args.data,
            engine,
            out_dir=staged.folder if staged is not None else None,
            sequences=sequences,
            keyframe=args.keyframe,
            progress=lambda clip: print(format_clip_row(clip), flush=True),
        )
    print(format_report(report))
    return 0


DECIDED_MARGIN = 0.05  # a pixel is decided when its top two probabilities differ by more


def compare_clip(clip_dir: Path, exact: Engine, fast: Engine) -> dict[str, float]:
    """Propagate one DAVIS-format clip with two engines (exact mode and a fast mode) in
    lockstep from its first mask; agreement figures over frames 1..N-1."""
    keyframe = read_label_mask(sorted((clip_dir / "masks").glob("*.png"))[0])
    same = decided_same = decided = pixels = 0
    worst = 0.0
    with (
        Session(exact, clip_dir / "frames") as exact_run,
        Session(fast, clip_dir / "frames") as fast_run,
    ):
        exact_run.add_mask(0, keyframe)
        fast_run.add_mask(0, keyframe)
        for ours, reference in zip(
            fast_run.propagate(direction="forward", with_probs=True),
            exact_run.propagate(direction="forward", with_probs=True),
            strict=True,
        ):
            if ours.index == 0:
                continue
            assert ours.probs is not None and reference.probs is not None  # with_probs=True
            top_two = np.sort(reference.probs, axis=0)[-2:]
            is_decided = top_two[1] - top_two[0] > DECIDED_MARGIN
            agrees = ours.labels == reference.labels
            same += int(agrees.sum())
            decided_same += int(agrees[is_decided].sum())
            decided += int(is_decided.sum())
            pixels += agrees.size
            worst = max(worst, float(np.abs(ours.probs - reference.probs).max()))
    return {
        "agreement": same / pixels,
        "decided_agreement": decided_same / max(decided, 1),
        "decided_share": decided / pixels,
        "max_difference": worst,
    }
