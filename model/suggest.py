"""Which frames a person should check next, and why.

After a propagation every frame gets a review score from what the session saw there, per object
(the worst object counts):
- low confidence: 1 - the object's confidence;
- disagreement: 1 - IoU of the forward and backward passes' masks on fused frames, times how
  evenly the fusion weighs them (near a keyframe its own pass decides, whatever the other says);
- area drift: |log| of the ratio of the object's area to its area on the nearest keyframe
  (sudden changes of size or shape show up as a jump of this);
- distance: how far the frame is from the object's nearest keyframe, as a share of the clip.

Each part is standardised over the clip's propagated frames (clips differ in how confident an
engine is everywhere; what stands out within the clip is what a person should see), and the
score is their weighted sum. Frames are picked greedily by score, and each pick
lowers the score of its neighbours (within a radius that grows as fewer frames are asked for), so
n suggestions spread over the clip instead of marking n neighbours of one bad moment. Keyframes
are never suggested.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import numpy as np

from .results import FrameResult

WEIGHTS = {"confidence": 1.0, "disagreement": 1.0, "area": 0.5, "distance": 0.5}
AREA_SMOOTHING = 50  # pixels added to both areas, so a tiny object's jitter is not a drift
REASON_THRESHOLDS = {"confidence": 0.3, "disagreement": 0.2, "area": math.log(1.5), "distance": 0.1}


@dataclasses.dataclass(frozen=True)
class ObjectReview:
    confidence: float
    area: int
    source: str
    keyframes: tuple[int, ...]
    disagreement: float | None


@dataclasses.dataclass(frozen=True)
class FrameReview:
    """What the session saw on one frame, kept for `suggest` (no masks)."""

    index: int
    name: str
    keyframe: bool
    objects: dict[int, ObjectReview]

    @classmethod
    def of(cls, result: FrameResult, disagreement: Mapping[int, float]) -> FrameReview:
        return cls(
            index=result.index,
            name=result.name,
            keyframe=result.is_keyframe,
            objects={
                object_id: ObjectReview(
                    obj.confidence, obj.area, obj.source, obj.keyframes, disagreement.get(object_id)
                )
                for object_id, obj in result.objects.items()
            },
        )


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """A frame to check: its review score and the reasons, worst first."""

    index: int
    name: str
    score: float
    reasons: list[str]

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def rank_frames(reviews: list[FrameReview]) -> list[Suggestion]:
    """Every propagated frame, highest review score first (see module); no spreading."""
    by_index = {review.index: review for review in reviews}
    length = max(by_index) + 1 if by_index else 0
    parts = {
        (review.index, object_id): _parts(review.index, object_id, obj, by_index, length)
        for review in reviews
        for object_id, obj in review.objects.items()
        if obj.source != "keyframe"
    }
    scale = _spread(parts.values())
    scores: dict[int, tuple[float, list[str]]] = {}
    for (index, object_id), values in parts.items():
        score = sum(
            WEIGHTS[name] * (value - scale[name][0]) / scale[name][1]
            for name, value in values.items()
        )
        if index not in scores or score > scores[index][0]:
            obj = by_index[index].objects[object_id]
            scores[index] = (score, _reasons(index, object_id, obj, values))
    ranked = sorted(scores, key=lambda index: (-scores[index][0], index))
    return [
        Suggestion(index, by_index[index].name, round(scores[index][0], 4), scores[index][1])
        for index in ranked
    ]


def suggest_frames(reviews: list[FrameReview], count: int) -> list[Suggestion]:
    """The `count` frames to check next: by rank, each pick lowering the scores of its
    neighbours, so they spread over the clip (see module)."""
    if count < 1:
        return []
    remaining = {suggestion.index: suggestion for suggestion in rank_frames(reviews)}
    length = max((review.index for review in reviews), default=-1) + 1
    radius = max(1.0, length / (4 * count))
    chosen: list[Suggestion] = []
    while remaining and len(chosen) < count:
        index = max(
            remaining,
            key=lambda i: (_discounted(remaining[i].score, i, chosen, radius), -i),
        )
        chosen.append(remaining.pop(index))
    return chosen


def _spread(values: Iterable[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each part over the clip (1 when it does not vary)."""
    rows = list(values)
    spread = {}
    for name in WEIGHTS:
        column = np.array([row[name] for row in rows]) if rows else np.zeros(1)
        deviation = float(column.std())
        spread[name] = (float(column.mean()), deviation if deviation > 1e-9 else 1.0)
    return spread


def _discounted(score: float, index: int, chosen: list[Suggestion], radius: float) -> float:
    """The score, lowered near frames already chosen (to half at `radius` frames)."""
    for suggestion in chosen:
        distance = abs(index - suggestion.index)
        score -= abs(score) * 0.5 ** (distance / radius)
    return score


def _parts(
    index: int,
    object_id: int,
    obj: ObjectReview,
    by_index: Mapping[int, FrameReview],
    length: int,
) -> dict[str, float]:
    nearest = min(obj.keyframes, key=lambda k: abs(k - index)) if obj.keyframes else None
    parts = {
        "confidence": 1.0 - obj.confidence,
        "disagreement": obj.disagreement or 0.0,
        "area": 0.0,
        "distance": 0.0,
    }
    if nearest is not None:
        parts["distance"] = abs(index - nearest) / max(length, 1)
        keyframe = by_index.get(nearest)
        if keyframe is not None and object_id in keyframe.objects:
            key_area = keyframe.objects[object_id].area
            parts["area"] = abs(math.log((obj.area + AREA_SMOOTHING) / (key_area + AREA_SMOOTHING)))
    return parts


def _reasons(
    index: int, object_id: int, obj: ObjectReview, parts: Mapping[str, float]
) -> list[str]:
    """The parts above their thresholds, worst first, in words (no frame numbers: platforms
    number frames differently)."""
    gap = min((abs(index - k) for k in obj.keyframes), default=0)
    words = {
        "confidence": f"object {object_id}: low confidence {obj.confidence:.2f}",
        "disagreement": (
            f"object {object_id}: forward and backward passes disagree "
            f"({parts['disagreement']:.2f})"
        ),
        "area": (
            f"object {object_id}: area {math.exp(parts['area']):.1f}x away from "
            "its nearest keyframe's"
        ),
        "distance": f"object {object_id}: {gap} frame{'s' * (gap != 1)} from its nearest keyframe",
    }
    ranked = sorted(parts, key=lambda name: WEIGHTS[name] * parts[name], reverse=True)
    reasons = [words[name] for name in ranked if parts[name] >= REASON_THRESHOLDS[name]]
    return reasons or [words[ranked[0]]]
