"""Smart prompts: context parsing, and boxes / points turned into masks with GrabCut."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from xmem_label.backend import formats
from xmem_label.model import InputError, read_label_mask
from xmem_label.model.prompts import mask_from_box, mask_from_points

CHAIR = Path(__file__).resolve().parents[1] / "data" / "vos" / "chair"
CONFIG = """<View><Image name="image" valueList="$frames"/>
  <BrushLabels name="mask" toName="image"><Label value="Chair"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Chair"/></RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Chair"/></KeyPointLabels>
  <RectangleLabels name="plain" toName="image"><Label value="Chair"/></RectangleLabels>
</View>"""


def frame_and_chair(index=0):
    frame = cv2.cvtColor(
        cv2.imread(str(CHAIR / "frames" / f"frame_{index:06d}.jpg")), cv2.COLOR_BGR2RGB
    )
    return frame, read_label_mask(CHAIR / "masks" / f"frame_{index:06d}.png") == 1


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_context_prompts_in_pixels():
    config = formats.parse_label_config(CONFIG)
    assert config.prompt_names == ("box", "point")  # the non-smart tool is no prompt
    context = {
        "result": [
            {
                "from_name": "box",
                "type": "rectanglelabels",
                "item_index": 3,
                "original_width": 200,
                "original_height": 100,
                "value": {
                    "x": 10,
                    "y": 20,
                    "width": 50,
                    "height": 40,
                    "rectanglelabels": ["Chair"],
                },
            },
            {
                "from_name": "point",
                "type": "keypointlabels",
                "original_width": 200,
                "original_height": 100,
                "is_positive": False,
                "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Chair"]},
            },
            {
                "from_name": "plain",
                "type": "rectanglelabels",
                "original_width": 200,
                "original_height": 100,
                "value": {"x": 0, "y": 0, "width": 5, "height": 5},
            },
        ]
    }
    box, point = formats.prompts_from_context(context, config)
    assert (box.frame, box.label, box.box) == (3, "Chair", (20.0, 20.0, 120.0, 60.0))
    assert (point.frame, point.point, point.positive) == (0, (100.0, 50.0), False)


def test_box_prompt_finds_the_object_better_than_the_box():
    frame, chair = frame_and_chair()
    ys, xs = np.nonzero(chair)
    box = (xs.min() - 4, ys.min() - 4, xs.max() + 5, ys.max() + 5)
    filled = np.zeros_like(chair)
    filled[box[1] : box[3], box[0] : box[2]] = True
    mask = mask_from_box(frame, box)
    assert iou(mask, chair) > iou(filled, chair)
    assert np.array_equal(mask, mask_from_box(frame, box))  # deterministic
    assert not mask[:, : box[0]].any() and not mask[: box[1]].any()  # never outside the box
    with pytest.raises(InputError, match="outside the frame"):
        mask_from_box(frame, (500, 500, 600, 600))


def test_point_prompt_gives_a_connected_mask_under_the_point():
    frame, chair = frame_and_chair()
    ys, xs = np.nonzero(chair)
    point = (float(np.median(xs)), float(np.median(ys)))
    mask = mask_from_points(frame, [point])
    assert mask[int(point[1]), int(point[0])]
    assert cv2.connectedComponents(mask.astype(np.uint8))[0] == 2  # background + one part
    with pytest.raises(InputError, match="positive point"):
        mask_from_points(frame, [], [point])
