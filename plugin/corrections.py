"""Which frames a correction changes, found from the keyframes alone.

Every run records, on each keyframe's output label, a digest of what the engine was told
there (`keyframe_digest` on the `fo.Detections`): the engine, the clip's objects with their
names and indexes, and each object's mask or absence on that frame (a keyframe is a person's
complete say, `xmem_label.model.keyframes`). The next "propagate corrections" compares the
recorded digests with the current ones. A frame's result depends only on the statements
nearest to it on either side (the engine's invariant, `xmem_label.model.session`), so the
frames that can change are those strictly between the nearest unchanged keyframes around each
changed one, the changed keyframes included; every other frame is left as it was written.
"""

from __future__ import annotations

import bisect
import hashlib
import json

import numpy as np

from xmem_label.model import Engine

from .videos import VideoJob

DIGEST_ATTRIBUTE = "keyframe_digest"


def keyframe_digests(job: VideoJob, engine: Engine) -> dict[int, str]:
    """FiftyOne frame number -> digest of the engine's input on that keyframe of `job`."""
    header = json.dumps(
        {
            "engine": engine.describe().as_dict(),
            "frames": job.num_frames,
            "names": sorted(job.names.items()),
            "indexes": sorted(job.indexes.items()),
        },
        sort_keys=True,
        default=str,
    ).encode()
    digests = {}
    for index, objects in job.keyframes.items():
        digest = hashlib.sha256(header)
        for obj in sorted(objects, key=lambda o: o.object_id):
            digest.update(f"|{obj.object_id}:".encode())
            digest.update(np.packbits(obj.mask).tobytes())
            if obj.drawn is not None:  # written verbatim: its own box matters too
                digest.update(json.dumps(list(obj.drawn.bounding_box)).encode())
        digests[index + 1] = digest.hexdigest()
    return digests


def frames_to_write(
    previous: dict[int, str], current: dict[int, str], num_frames: int
) -> list[int]:
    """The FiftyOne frame numbers whose labels can differ from the last run's, ascending: all of
    them when nothing was recorded (a first run), none when no keyframe changed."""
    if not previous:
        return list(range(1, num_frames + 1))
    changed = sorted(f for f in {*previous, *current} if previous.get(f) != current.get(f))
    stable = sorted(f for f in current if previous.get(f) == current[f])
    frames: set[int] = set()
    for frame in changed:
        position = bisect.bisect_left(stable, frame)
        start = stable[position - 1] + 1 if position > 0 else 1
        stop = stable[position] if position < len(stable) else num_frames + 1
        frames.update(range(start, stop))
    return sorted(frames)


def recorded_digests(collection, label_field: str) -> dict[str, dict[int, str]]:
    """sample id -> {frame number -> digest} recorded on `frames.<label_field>` (empty for a
    sample never written, or written before digests were recorded)."""
    schema = collection.get_frame_field_schema() if collection.media_type == "video" else {}
    if label_field not in schema:
        return {}
    sample_ids, frame_numbers, digests = collection.values(
        ["id", "frames.frame_number", f"frames.{label_field}.{DIGEST_ATTRIBUTE}"]
    )
    recorded = {}
    for sample_id, numbers, values in zip(sample_ids, frame_numbers, digests, strict=True):
        recorded[sample_id] = {
            number: value
            for number, value in zip(numbers or [], values or [], strict=True)
            if value is not None
        }
    return recorded
