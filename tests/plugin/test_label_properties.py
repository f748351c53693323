"""Property-based tests (hypothesis) of the FiftyOne <-> engine mask conversions: any label
mask survives the trip to `fo.Detections` and back, Segmentation prompts give each id its
own object by the command line's rules, and object indexes link objects consistently."""

from __future__ import annotations

import fiftyone as fo  # noqa: I001  (conftest has set the environment)
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from xmem_label.model import FrameResult, ObjectResult
from xmem_label.plugin.labels import (
    assign_object_indexes,
    detection_to_mask,
    engine_ids,
    prompt_objects,
    result_to_detections,
)

SETTINGS = settings(max_examples=60, deadline=None)
frame_sizes = st.tuples(st.integers(1, 40), st.integers(1, 40))


@st.composite
def label_masks(draw, max_objects=4):
    """A (H, W) uint8 label mask with ids 0..max_objects, any shape of objects."""
    height, width = draw(frame_sizes)
    return draw(arrays(np.uint8, (height, width), elements=st.integers(0, max_objects)))


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def frame_result(labels: np.ndarray) -> FrameResult:
    objects = {}
    for object_id in range(1, int(labels.max(initial=0)) + 1):
        mask = labels == object_id
        box = box_of(mask) if mask.any() else None
        objects[object_id] = ObjectResult(object_id, 0.5, int(mask.sum()), box, False)
    return FrameResult(index=0, name="0", labels=labels, objects=objects)


@SETTINGS
@given(label_masks())
def test_engine_masks_survive_the_trip_through_detections(labels):
    result = frame_result(labels)
    names = {object_id: f"object {object_id}" for object_id in result.objects}
    indexes = {object_id: object_id * 10 for object_id in result.objects}
    detections = result_to_detections(result, names, {}, indexes)
    back = np.zeros_like(labels)
    for det in detections.detections:
        back[detection_to_mask(det, labels.shape, None)] = det.index // 10
        assert det.label == names[det.index // 10]
    np.testing.assert_array_equal(back, labels)
    present = {int(v) for v in np.unique(labels) if v}
    assert {det.index // 10 for det in detections.detections} == present  # absent: none
    assert detections.min_confidence == (0.5 if result.objects else 1.0)


@SETTINGS
@given(label_masks(max_objects=1))
def test_fiftyone_instance_masks_round_trip_at_any_frame_size(labels):
    """FiftyOne's own Detection.from_mask (relative box, crop) and our paste-back agree."""
    mask = labels == 1
    if not mask.any():
        return
    det = fo.Detection.from_mask(mask, label="a")
    np.testing.assert_array_equal(detection_to_mask(det, mask.shape, None), mask)


@SETTINGS
@given(label_masks(max_objects=6), st.dictionaries(st.integers(1, 6), st.text(min_size=1)))
def test_segmentation_ids_are_objects_named_by_mask_targets(ids, targets):
    if not ids.any():
        return
    objects = prompt_objects(fo.Segmentation(mask=ids), None, ids.shape, None, targets, "f")
    assert [obj.object_id for obj in objects] == sorted(int(v) for v in np.unique(ids) if v)
    for obj in objects:
        np.testing.assert_array_equal(obj.mask, ids == obj.object_id)
        assert obj.label == targets.get(obj.object_id, str(obj.object_id))


@SETTINGS
@given(label_masks(max_objects=1))
def test_a_0_255_segmentation_is_object_1_as_on_the_command_line(binary):
    values = binary.astype(np.uint8) * 255
    if set(np.unique(values).tolist()) != {0, 255}:
        return
    objects = prompt_objects(fo.Segmentation(mask=values), None, values.shape, None, {}, "f")
    assert [(obj.object_id, obj.label) for obj in objects] == [(1, "1")]
    np.testing.assert_array_equal(objects[0].mask, values > 0)


labels_or_none = st.sampled_from(["cat", "dog", None])


@SETTINGS
@given(
    st.dictionaries(
        st.integers(1, 50),
        st.lists(st.tuples(labels_or_none, st.one_of(st.none(), st.integers(0, 20))), max_size=5),
        max_size=4,
    )
)
def test_object_indexes_are_kept_unique_and_linked_by_label_and_order(frames):
    detections = {}
    for frame_number, dets in frames.items():
        explicit = [index for _, index in dets if index is not None]
        if len(set(explicit)) != len(explicit):
            return  # shared indexes are refused; tested in the bad-input table
        detections[frame_number] = [fo.Detection(label=label, index=index) for label, index in dets]
    indexes = assign_object_indexes(detections)
    explicit = {det.index for dets in detections.values() for det in dets if det.index is not None}
    implicit = {}
    for frame_number, dets in detections.items():
        assert len(set(indexes[frame_number])) == len(dets)  # one object per detection
        seen = {}
        for det, index in zip(dets, indexes[frame_number], strict=True):
            if det.index is not None:
                assert index == det.index
                continue
            assert index > max(explicit, default=0)
            key = (det.label, seen.get(det.label, 0))
            seen[det.label] = key[1] + 1
            assert implicit.setdefault(key, index) == index  # same label and order: same object
    ids = engine_ids({index for values in indexes.values() for index in values})
    assert sorted(ids.values()) == list(range(1, len(ids) + 1))
    assert [ids[index] for index in sorted(ids)] == sorted(ids.values())  # order kept


@SETTINGS
@given(st.integers(0, 300))
def test_an_unlabeled_detection_is_named_by_its_index(index):
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    det = fo.Detection.from_mask(mask, index=index)
    (obj,) = prompt_objects(fo.Detections(detections=[det]), [(1, index)], (8, 8), None, None, "f")
    assert obj.label == str(index)
