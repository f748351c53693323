"""What propagation returns for each frame."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ObjectResult:
    """One object on one frame.

    confidence: in [0, 1]; the soft IoU between the object's probability map and its final mask,
    ignoring probabilities below 0.1 (see README); 1.0 on a person's keyframe and for an object
    confidently absent. box: (x0, y0, x1, y1) in pixels, x1 and y1 exclusive; None when absent.
    source: where the mask comes from: "keyframe" (the person's, verbatim), "forward" or
    "backward" (one pass from a keyframe), "fused" (both passes between two keyframes), "none"
    (before the object's first keyframe in the forward-only mode); keyframes: the frames it comes
    from (the keyframe itself, the pass's keyframe, or the two around a fused frame).
    """

    object_id: int
    confidence: float
    area: int
    box: tuple[int, int, int, int] | None
    keyframe: bool
    source: str = "forward"
    keyframes: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class FrameResult:
    """One frame: its label mask at the source resolution and a summary per object.

    probs is (1 + K, H, W) float32 (background first, objects in `object_ids` order) when asked.
    """

    index: int
    name: str
    labels: np.ndarray
    objects: dict[int, ObjectResult]
    probs: np.ndarray | None = None

    @property
    def object_ids(self) -> list[int]:
        return list(self.objects)

    @property
    def is_keyframe(self) -> bool:
        """A person gave at least one object's mask on this frame."""
        return any(obj.keyframe for obj in self.objects.values())

    @property
    def min_confidence(self) -> float:
        """The lowest object confidence (1.0 with no objects): the frame's review priority."""
        return min((obj.confidence for obj in self.objects.values()), default=1.0)
