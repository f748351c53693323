"""Unit tests of the FiftyOne <-> engine label translation (no database, no video)."""

from __future__ import annotations

import fiftyone as fo
import numpy as np
import pytest

from xmem_label.model import FrameResult, InputError, ObjectResult
from xmem_label.model.prompts import mask_from_box
from xmem_label.plugin.labels import (
    assign_object_indexes,
    detection_to_mask,
    engine_ids,
    prompt_objects,
    relative_to_pixel_box,
    result_to_detections,
)

FRAME_HW = (40, 60)


def full_mask(y0, y1, x0, x1, hw=FRAME_HW):
    mask = np.zeros(hw, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_detection_mask_round_trip():
    mask = full_mask(5, 20, 10, 33)
    mask[7, 12] = False
    det = fo.Detection.from_mask(mask, label="chair")
    np.testing.assert_array_equal(detection_to_mask(det, FRAME_HW, None), mask)


def test_object_indexes_are_kept_then_given_by_label_order():
    chair = fo.Detection(label="chair", bounding_box=[0, 0, 0.5, 0.5])
    cat = fo.Detection(label="cat", bounding_box=[0, 0, 0.5, 0.5])
    indexed = fo.Detection(label="dog", bounding_box=[0, 0, 0.5, 0.5], index=7)
    second_chair = fo.Detection(label="chair", bounding_box=[0.5, 0.5, 0.5, 0.5])
    indexes = assign_object_indexes({1: [chair, indexed, cat], 5: [cat, chair, second_chair]})
    assert indexes == {1: [8, 7, 9], 5: [9, 8, 10]}


def test_any_indexes_map_to_engine_ids_and_back():
    assert engine_ids({0, 300, 7}) == {0: 1, 7: 2, 300: 3}
    with pytest.raises(InputError, match="at most 255"):
        engine_ids(set(range(256)))


def test_negative_and_duplicate_indexes_are_input_errors():
    with pytest.raises(InputError, match="negative"):
        assign_object_indexes({1: [fo.Detection(label="a", index=-1)]})
    twice = [fo.Detection(label="a", index=2), fo.Detection(label="b", index=2)]
    with pytest.raises(InputError, match="share one index"):
        assign_object_indexes({1: twice})


def test_segmentation_prompt_uses_ids_and_mask_targets():
    ids = np.zeros(FRAME_HW, dtype=np.uint8)
    ids[2:10, 2:10] = 3
    ids[20:30, 40:50] = 5
    objects = prompt_objects(fo.Segmentation(mask=ids), None, FRAME_HW, None, {3: "cup"}, "f")
    assert [(o.object_id, o.label) for o in objects] == [(3, "cup"), (5, "5")]
    np.testing.assert_array_equal(objects[1].mask, ids == 5)
    assert all(o.drawn is None for o in objects)


@pytest.mark.parametrize(
    "label, message",
    [
        (fo.Segmentation(mask=np.zeros(FRAME_HW, np.uint8)), "empty"),
        (fo.Segmentation(mask=np.zeros((10, 10), np.uint8)), "the frame is 60x40"),
        (fo.Segmentation(mask=np.zeros((*FRAME_HW, 3), np.uint8)), "RGB"),
        (fo.Classification(label="x"), "expected Detections or Segmentation"),
    ],
)
def test_bad_prompts_are_input_errors(label, message):
    with pytest.raises(InputError, match=message):
        prompt_objects(label, None, FRAME_HW, None, None, "clip.mp4 frame 1")


def test_empty_instance_mask_is_an_input_error():
    det = fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.2, 0.2], mask=np.zeros((8, 12), bool))
    with pytest.raises(InputError, match="mask of 'a' is empty"):
        prompt_objects(fo.Detections(detections=[det]), [(1, 1)], FRAME_HW, None, None, "f")


def test_box_prompt_finds_the_object_inside_the_box():
    frame = np.full((*FRAME_HW, 3), 30, dtype=np.uint8)
    frame[10:30, 20:40] = (220, 40, 40)  # the object
    box = relative_to_pixel_box([15 / 60, 5 / 40, 30 / 60, 30 / 40], FRAME_HW)
    assert box == (15, 5, 45, 35)
    mask = mask_from_box(frame, box)
    truth = full_mask(10, 30, 20, 40)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9
    assert not mask[:5].any() and not mask[:, 45:].any()  # never outside the box


def test_tiny_box_prompt_is_filled():
    frame = np.zeros((*FRAME_HW, 3), dtype=np.uint8)
    np.testing.assert_array_equal(mask_from_box(frame, (3, 4, 6, 9)), full_mask(4, 9, 3, 6))


def test_result_to_detections_crops_to_box_and_keeps_drawn_masks_verbatim():
    labels = np.zeros(FRAME_HW, dtype=np.uint8)
    labels[5:15, 10:30] = 1
    labels[20:25, 40:44] = 2
    objects = {
        1: ObjectResult(1, 0.8, 200, (10, 5, 30, 15), False),
        2: ObjectResult(2, 1.0, 20, (40, 20, 44, 25), True),
        3: ObjectResult(3, 0.4, 0, None, False),
    }
    drawn_mask = full_mask(19, 26, 39, 45)  # the person's mask, larger than what is left
    drawn = fo.Detection.from_mask(drawn_mask, label="b", index=2)
    result = FrameResult(index=4, name="4", labels=labels, objects=objects)
    out = result_to_detections(result, {1: "a", 2: "b", 3: "c"}, {2: drawn}, {1: 0, 2: 5})

    assert out.min_confidence == 0.4
    first, second = out.detections  # object 3 is absent: no detection
    assert (first.label, first.index, first.confidence, first.keyframe) == ("a", 0, 0.8, False)
    assert first.bounding_box == [10 / 60, 5 / 40, 20 / 60, 10 / 40]
    np.testing.assert_array_equal(
        first.to_segmentation(frame_size=(60, 40), target=1).mask > 0, labels == 1
    )
    assert (second.label, second.index, second.confidence, second.keyframe) == ("b", 5, 1.0, True)
    assert second.bounding_box == drawn.bounding_box
    np.testing.assert_array_equal(detection_to_mask(second, FRAME_HW, None), drawn_mask)


def test_mask_drawn_at_another_resolution_fills_its_box():
    det = fo.Detection(label="a", bounding_box=[0.25, 0.25, 0.5, 0.5], mask=np.ones((3, 3), bool))
    np.testing.assert_array_equal(detection_to_mask(det, FRAME_HW, None), full_mask(10, 30, 15, 45))


def test_a_0_255_png_segmentation_is_object_1_like_the_command_line(tmp_path):
    """The same PNG the CLI reads as object 1 (model.masks.read_label_mask) is object 1 here."""
    from PIL import Image

    from xmem_label.model import read_label_mask

    values = np.zeros(FRAME_HW, np.uint8)
    values[5:20, 10:30] = 255
    png = tmp_path / "mask.png"
    Image.fromarray(values).save(png)
    objects = prompt_objects(fo.Segmentation(mask_path=str(png)), None, FRAME_HW, None, None, "f")
    assert [(o.object_id, o.label) for o in objects] == [(1, "1")]
    np.testing.assert_array_equal(objects[0].mask, read_label_mask(png) == 1)
    named = prompt_objects(
        fo.Segmentation(mask_path=str(png)), None, FRAME_HW, None, {255: "chair"}, "f"
    )
    assert named[0].label == "chair"


def test_an_unlabeled_detection_is_named_by_its_index_not_the_engine_id():
    det = fo.Detection.from_mask(full_mask(5, 20, 10, 33), index=3)
    (obj,) = prompt_objects(fo.Detections(detections=[det]), [(1, 3)], FRAME_HW, None, None, "f")
    assert (obj.object_id, obj.label) == (1, "3")


def test_a_segmentation_two_pixels_off_is_resized_as_on_the_command_line():
    ids = np.zeros((FRAME_HW[0] + 2, FRAME_HW[1] - 1), np.uint8)
    ids[5:20, 10:30] = 4
    with pytest.warns(UserWarning, match="resized"):
        (obj,) = prompt_objects(fo.Segmentation(mask=ids), None, FRAME_HW, None, None, "f")
    assert obj.object_id == 4 and obj.mask.shape == FRAME_HW
