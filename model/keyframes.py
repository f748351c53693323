"""Keyframes: what a person said about some frames of a clip, one rule for every platform.

A keyframe is a person's complete say on its frame: each object they gave there is set to its
mask, and every other object of the clip is absent there (a region the person deleted means the
object is not on that frame). The Label Studio backend and the FiftyOne plugin both build a
`Keyframes` from their labels and hand it to the session with `apply_to`.

Object identity across frames (`ObjectIds`): an explicit key the platform carries (a predicted
region's id, a FiftyOne object index) names one object for the whole clip; a region without one
is named by its label and its rank among that label's regions on its frame (the first "Chair"
on every frame is one object, the second another). Ids run 1..MAX_OBJECT_ID in the order
objects are first seen, the label mask's range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import numpy as np

from .errors import InputError
from .session import Session

MAX_OBJECT_ID = 255  # label masks are uint8: 0 is the background


class ObjectIds:
    """Object ids for a clip's regions, by the identity rule above."""

    def __init__(self) -> None:
        self._ids: dict[Hashable, int] = {}
        self._ranks: dict[tuple[int, str], int] = {}

    def id_for(self, frame: int, label: str, key: Hashable | None = None) -> int:
        """The object id of a region on `frame`: by its explicit `key` when it has one, else
        by `label` and how many regions of that label came before it on the frame."""
        if key is None:
            rank = self._ranks.get((frame, label), 0)
            self._ranks[(frame, label)] = rank + 1
            key = ("label", label, rank)
        else:
            key = ("key", key)
        if key not in self._ids:
            if len(self._ids) == MAX_OBJECT_ID:
                raise InputError(f"more than {MAX_OBJECT_ID} objects in one clip")
            self._ids[key] = len(self._ids) + 1
        return self._ids[key]


@dataclasses.dataclass
class Keyframes:
    """frame -> object id -> (H, W) bool mask; an all-False mask says the object is absent."""

    masks: dict[int, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)

    def add(self, frame: int, object_id: int, mask: np.ndarray) -> None:
        """Give an object's mask on a frame; two masks of one object there are joined."""
        if not 1 <= object_id <= MAX_OBJECT_ID:
            raise InputError(f"object id {object_id} is outside 1..{MAX_OBJECT_ID}")
        on_frame = self.masks.setdefault(frame, {})
        on_frame[object_id] = mask if object_id not in on_frame else on_frame[object_id] | mask

    @property
    def object_ids(self) -> list[int]:
        return sorted({object_id for on_frame in self.masks.values() for object_id in on_frame})

    def apply_to(self, session: Session) -> None:
        """Hand every keyframe to the session: the objects given there with their masks, every
        other object of the clip as absent there."""
        every_object = self.object_ids
        for frame, on_frame in sorted(self.masks.items()):
            for object_id in every_object:
                mask = on_frame.get(object_id)
                if mask is not None and mask.any():
                    session.add_object_mask(frame, object_id, mask)
                else:
                    session.set_absent(frame, object_id)
