"""A video's first frames stored while the rest propagates (issue 17, time to first mask), and
put back as they were when the run fails.

A run writes its labels in one bulk call at the end, so a long video showed nothing until its
last frame was computed. The engine's session yields each frame as soon as the passes it reads
have computed it; the first FIRST_BATCH frames a run writes on a video are now written as soon
as they exist, so a curator looking at the sample in the App sees them while the rest
propagates. Only on a video with at least FIRST_BATCH_MIN_FRAMES frames to write: a shorter
run ends soon after its first frames anyway, and the batch costs a read and a write more.

What a failed run leaves is what it left before: the labels as they were. Before writing a
batch the run reads what its frame documents hold in the output field; when the run fails
afterwards (an error, the run marked failed meanwhile, the App closing the request), it puts
those values back, with the documents' `last_modified_at`, and deletes the frame documents the
batch created. A run killed outright (SIGKILL, a lost machine) cannot: its first batches stay,
as the samples a worker killed during the final write has written do, and the re-run replaces
them. The batch's frames carry the keyframe digests of the last complete run, not this run's
(`corrections.py`), so after a killed run "propagate corrections" rewrites the same frames,
these included.
"""

from __future__ import annotations

import fiftyone as fo
from bson import ObjectId
from fiftyone.core.frame import Frame
from fiftyone.core.odm import get_db_conn

from .videos import write_frame_labels

FIRST_BATCH = 10
FIRST_BATCH_MIN_FRAMES = 3 * FIRST_BATCH
# What a frame document created by a write holds besides the written field.
_FRAME_KEYS = {"_id", "_sample_id", "_dataset_id", "frame_number", "created_at", "last_modified_at"}


def first_batch(wanted: list[int]) -> set[int]:
    """The frame numbers of a video's first batch among the frames a run writes (ascending,
    in the order the session yields them); empty when the video has too few to write."""
    return set(wanted[:FIRST_BATCH]) if len(wanted) >= FIRST_BATCH_MIN_FRAMES else set()


class EarlyFrames:
    """The first batches one run wrote into `frames.<label_field>`, and what their frame
    documents held there before, to put back if the run fails."""

    def __init__(self, dataset: fo.Dataset, label_field: str):
        self.dataset = dataset
        self.label_field = label_field
        self.count = 0  # frames written so far
        self._before: list[tuple[ObjectId, list[int], dict[int, dict]]] = []

    def _collection(self):
        return get_db_conn()[self.dataset._frame_collection_name]

    def write(self, sample_id: str, frames: dict[int, fo.Detections]) -> None:
        """Write one video's batch (frame number -> Detections) in one bulk call."""
        sample = ObjectId(sample_id)
        numbers = sorted(frames)
        found = self._collection().find(
            {"_sample_id": sample, "frame_number": {"$in": numbers}},
            {"frame_number": True, "last_modified_at": True, self.label_field: True},
        )
        self._before.append((sample, numbers, {doc["frame_number"]: doc for doc in found}))
        write_frame_labels(self.dataset, self.label_field, {sample_id: frames})
        self.count += len(frames)

    def restore(self) -> None:
        """Put back what the batches' frame documents held in the output field, and their
        `last_modified_at`; delete the documents a batch created (unless something else was
        written on them since)."""
        collection = self._collection()
        field = self.label_field
        for sample, numbers, before in self._before:
            for number in numbers:
                doc = before.get(number)
                if doc is None:
                    created = collection.find_one({"_sample_id": sample, "frame_number": number})
                    if created is None:
                        continue
                    if set(created) <= _FRAME_KEYS | {field}:
                        collection.delete_one({"_id": created["_id"]})
                    else:
                        collection.update_one({"_id": created["_id"]}, {"$unset": {field: ""}})
                    continue
                change: dict = {"$set": {"last_modified_at": doc.get("last_modified_at")}}
                if field in doc:
                    change["$set"][field] = doc[field]
                else:
                    change["$unset"] = {field: ""}
                collection.update_one({"_id": doc["_id"]}, change)
        self._before.clear()
        self.count = 0
        Frame._reload_docs(self.dataset._frame_collection_name)  # frames loaded in memory
