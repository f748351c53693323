"""FiftyOne labels <-> the engine's masks, for one frame at a time.

Prompts come from a frame field holding `fo.Detections` (instance masks cropped to their box,
or boxes alone) or `fo.Segmentation` (a full-frame mask of object ids). Results go back as
`fo.Detections`: one `fo.Detection` per object, its mask cropped to its box, `index` = object
id, `confidence`, a `keyframe` attribute saying whether a person drew it, and its provenance:
`source` ("keyframe", "forward", "backward" or "fused": how the engine got the mask) and
`keyframes` (the FiftyOne frame numbers it comes from), so a curator can filter by them.

Objects are linked by FiftyOne's `Detection.index`; the engine numbers them 1..255, so a
video's indexes are mapped to engine ids and back (`engine_ids`).

FiftyOne boxes are relative `[x, y, width, height]`; the engine's boxes are pixel
`(x0, y0, x1, y1)` with x1, y1 exclusive. Frame sizes are `(height, width)` here.
"""

from __future__ import annotations

import dataclasses

import cv2
import fiftyone as fo
import numpy as np

from xmem_label.model import FrameResult, InputError
from xmem_label.model.keyframes import MAX_OBJECT_ID
from xmem_label.model.masks import fit_mask_to_frame
from xmem_label.model.prompts import mask_from_box


@dataclasses.dataclass
class PromptObject:
    """One object a person gave on one frame: its full-frame mask and, for instance masks,
    the person's own Detection (returned verbatim on that frame)."""

    object_id: int
    label: str
    mask: np.ndarray
    drawn: fo.Detection | None = None


def assign_object_indexes(
    detections_by_frame: dict[int, list[fo.Detection]],
) -> dict[int, list[int]]:
    """The object index of every detection of every keyframe of one video.

    A detection's `index` links one object across frames (FiftyOne's convention) and is kept.
    Detections without one get indexes above the largest given, matched across keyframes by
    label and order: the second "chair" on one keyframe is the second "chair" on the next.
    """
    explicit = [
        det.index for dets in detections_by_frame.values() for det in dets if det.index is not None
    ]
    if any(index < 0 for index in explicit):
        raise InputError(f"detection index {min(explicit)} is negative")
    next_index = max(explicit, default=0) + 1
    implicit: dict[tuple[str | None, int], int] = {}
    indexes_by_frame = {}
    for frame_number in sorted(detections_by_frame):
        seen: dict[str | None, int] = {}
        indexes = []
        for det in detections_by_frame[frame_number]:
            if det.index is not None:
                indexes.append(det.index)
                continue
            key = (det.label, seen.get(det.label, 0))
            seen[det.label] = key[1] + 1
            if key not in implicit:
                implicit[key] = next_index
                next_index += 1
            indexes.append(implicit[key])
        if len(set(indexes)) != len(indexes):
            raise InputError(f"frame {frame_number}: two detections share one index")
        indexes_by_frame[frame_number] = indexes
    return indexes_by_frame


def engine_ids(indexes: set[int]) -> dict[int, int]:
    """FiftyOne object index -> the engine's object id (1..255, in index order)."""
    if len(indexes) > MAX_OBJECT_ID:
        raise InputError(f"{len(indexes)} objects in one video; at most {MAX_OBJECT_ID}")
    return {index: object_id for object_id, index in enumerate(sorted(indexes), start=1)}


def detection_to_mask(det: fo.Detection, frame_hw: tuple[int, int], frame: np.ndarray | None):
    """The full-frame boolean mask of `det`: its instance mask pasted into its box (rounded to
    whole pixels, as FiftyOne's own `Detection.from_mask` makes boxes), or, for a box without a
    mask, the object found inside the box (`model.prompts.mask_from_box`, GrabCut)."""
    height, width = frame_hw
    if not det.bounding_box or len(det.bounding_box) != 4:
        raise InputError(f"detection {det.label!r} has no bounding box")
    box = relative_to_pixel_box(det.bounding_box, frame_hw)
    if not det.has_mask:
        if frame is None:
            raise InputError(f"detection {det.label!r} is a box; its frame is needed for a mask")
        return mask_from_box(frame, box)
    x0, y0, x1, y1 = box
    crop = np.asarray(det.get_mask()) > 0  # masks stored as PNG files read back as 0/255
    mask = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0 or crop.ndim != 2 or crop.size == 0:
        return mask
    if crop.shape != (y1 - y0, x1 - x0):  # a mask drawn at another resolution than its box
        size = (x1 - x0, y1 - y0)
        crop = cv2.resize(crop.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    mask[y0:y1, x0:x1] = crop
    return mask


def relative_to_pixel_box(
    bounding_box: list[float], frame_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """FiftyOne's relative [x, y, w, h] -> pixel (x0, y0, x1, y1), clipped to the frame."""
    height, width = frame_hw
    x, y, w, h = bounding_box
    x0 = int(np.clip(round(x * width), 0, width))
    y0 = int(np.clip(round(y * height), 0, height))
    x1 = int(np.clip(round((x + w) * width), 0, width))
    y1 = int(np.clip(round((y + h) * height), 0, height))
    return x0, y0, x1, y1


def prompt_objects(
    label: fo.Detections | fo.Segmentation,
    object_ids: list[tuple[int, int]] | None,
    frame_hw: tuple[int, int],
    frame: np.ndarray | None,
    mask_targets: dict[int, str] | None,
    where: str,
) -> list[PromptObject]:
    """The objects a person gave in one keyframe label (`where` names it in errors).

    object_ids: for Detections, (engine id, FiftyOne index) of each detection (see
    `assign_object_indexes` and `engine_ids`); a detection without a label is named by its
    index, as the command line names objects by their ids.
    mask_targets: for Segmentation, id -> label name (the dataset's mask targets).
    """
    if isinstance(label, fo.Detections):
        objects = []
        for det, (object_id, index) in zip(label.detections, object_ids or [], strict=True):
            mask = detection_to_mask(det, frame_hw, frame)
            if not mask.any():
                raise InputError(f"{where}: the mask of {det.label!r} is empty")
            drawn = det if det.has_mask else None
            objects.append(PromptObject(object_id, det.label or str(index), mask, drawn))
        return objects
    if isinstance(label, fo.Segmentation):
        return _segmentation_objects(label, frame_hw, mask_targets or {}, where)
    raise InputError(f"{where}: expected Detections or Segmentation, got {type(label).__name__}")


def is_binary_mask(values: np.ndarray) -> bool:
    """A mask holding only 0 and 255: a binary mask saved as an image, one object (id 1) by
    the command line's rule (`model.masks.read_label_mask`)."""
    return set(np.unique(values).tolist()) == {0, 255}


def segmentation_ids(values: np.ndarray, frame_hw: tuple[int, int], where: str) -> np.ndarray:
    """A Segmentation's mask as engine object ids, by the command line's rules: values are
    ids, a 0/255 mask is object 1, and a mask one or two pixels off the frame size is resized
    (a larger mismatch is refused)."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise InputError(f"{where}: RGB segmentation masks are not supported; use object ids")
    if values.min(initial=0) < 0 or values.max(initial=0) > MAX_OBJECT_ID:
        raise InputError(f"{where}: mask values must be object ids 0..{MAX_OBJECT_ID}")
    ids_mask = (values > 0) if is_binary_mask(values) else values
    return fit_mask_to_frame(ids_mask.astype(np.uint8), frame_hw, where)


def _segmentation_objects(
    label: fo.Segmentation, frame_hw: tuple[int, int], names: dict, where: str
) -> list[PromptObject]:
    values = label.get_mask()
    if values is None:
        raise InputError(f"{where}: the segmentation has no mask")
    ids_mask = segmentation_ids(values, frame_hw, where)
    present = [int(v) for v in np.unique(ids_mask) if v != 0]
    if not present:
        raise InputError(f"{where}: the segmentation mask is empty")
    if is_binary_mask(values):  # the image holds 255; a mask target may name 255 or 1
        names = {1: names.get(255, names.get(1, 1))}
    return [PromptObject(obj, str(names.get(obj, obj)), ids_mask == obj) for obj in present]


def result_to_detections(
    result: FrameResult,
    names: dict[int, str],
    drawn: dict[int, fo.Detection],
    indexes: dict[int, int] | None = None,
) -> fo.Detections:
    """One frame's engine result as `fo.Detections`.

    names: object id -> label. drawn: object id -> the person's Detection on this frame, copied
    verbatim (an engine returns the keyframe mask too, but overlapping objects would clip it).
    indexes: object id -> the Detection `index` to write (default: the object id).
    The container carries `min_confidence`, the frame's review priority (it counts objects
    that vanished, which have no Detection).
    """
    height, width = result.labels.shape
    indexes = indexes or {}
    detections = []
    for object_id, obj in result.objects.items():
        index = indexes.get(object_id, object_id)
        if object_id in drawn:
            verbatim = _verbatim(drawn[object_id], index, names[object_id])
            verbatim["source"] = "keyframe"
            verbatim["keyframes"] = [result.index + 1]
            detections.append(verbatim)
            continue
        if obj.box is None:
            continue
        x0, y0, x1, y1 = obj.box
        detections.append(
            fo.Detection(
                label=names[object_id],
                bounding_box=[x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height],
                mask=result.labels[y0:y1, x0:x1] == object_id,
                index=index,
                confidence=obj.confidence,
                keyframe=obj.keyframe,
                source=obj.source,
                keyframes=[frame + 1 for frame in obj.keyframes],
            )
        )
    return fo.Detections(detections=detections, min_confidence=result.min_confidence)


def _verbatim(det: fo.Detection, index: int, name: str) -> fo.Detection:
    mask = np.asarray(det.get_mask()) > 0  # masks stored as PNG files read back as 0/255
    return fo.Detection(
        label=name,
        bounding_box=list(det.bounding_box),
        mask=mask,
        index=index,
        confidence=1.0,
        keyframe=True,
    )
