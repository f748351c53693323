"""Label config parsing, keyframes from annotations and prediction shapes."""

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from xmem_label.backend import formats
from xmem_label.backend.rle import mask_to_rle
from xmem_label.model import InputError

SEQUENCE = """<View>
  <Image name="image" valueList="$frames"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Chair"/><Label value="Person"/>
  </BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Chair"/></RectangleLabels>
</View>"""
VIDEO = """<View>
  <Labels name="videoLabels" toName="video"><Label value="Chair"/></Labels>
  <Video name="video" value="$video" framerate="10"/>
  <VideoRectangle name="track" toName="video"/>
</View>"""


def region(frame, label, mask, origin="manual", region_id="abc"):
    height, width = mask.shape
    return {
        "id": region_id,
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "item_index": frame,
        "origin": origin,
        "original_width": width,
        "original_height": height,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
    }


def square(x0, y0, size=4, shape=(12, 16)):
    mask = np.zeros(shape, bool)
    mask[y0 : y0 + size, x0 : x0 + size] = True
    return mask


def test_parse_sequence_and_video_configs():
    sequence = formats.parse_label_config(SEQUENCE)
    assert isinstance(sequence, formats.SequenceConfig)
    assert (sequence.brush_name, sequence.image_name, sequence.frames_key) == (
        "mask",
        "image",
        "frames",
    )
    assert sequence.labels == ("Chair", "Person") and sequence.prompt_names == ("box",)
    video = formats.parse_label_config(VIDEO)
    assert isinstance(video, formats.VideoConfig)
    assert (video.box_name, video.video_key, video.framerate, video.labels) == (
        "track",
        "video",
        10.0,
        ("Chair",),
    )


@pytest.mark.parametrize(
    "config, reason",
    [
        ("", "no label config"),
        (
            "<View><Image name='i' value='$image'/><Choices name='c' toName='i'>"
            "<Choice value='a'/></Choices></View>",
            "no supported tag pair",
        ),
        (
            "<View><Image name='i' value='$image'/><BrushLabels name='m' toName='i'>"
            "<Label value='a'/></BrushLabels></View>",
            "valueList",
        ),
    ],
)
def test_unsupported_configs_say_why(config, reason):
    with pytest.raises(InputError, match=reason):
        formats.parse_label_config(config)


def test_task_without_frames():
    config = formats.parse_label_config(SEQUENCE)
    with pytest.raises(InputError, match="no frames"):
        formats.task_media({"id": 3, "data": {"frames": []}}, config)
    assert formats.task_media({"data": {"frames": ["/a.jpg"]}}, config) == ["/a.jpg"]


def test_keyframes_group_objects_by_predicted_id_then_label_rank():
    config = formats.parse_label_config(SEQUENCE)
    results = [
        region(0, "Chair", square(0, 0)),
        region(0, "Chair", square(8, 0), region_id="other"),
        region(2, "Chair", square(1, 1)),  # first Chair on frame 2: object 1
        region(3, "Person", square(2, 2), origin="prediction", region_id="xl7f3"),  # untouched
        region(4, "Person", square(3, 3), origin="prediction-changed", region_id="xl7f4"),
    ]
    keyframes = formats.brush_keyframes(results, config, num_frames=5)
    assert sorted(keyframes.given.masks) == [0, 2, 4]  # frame 3 holds only an unchanged prediction
    assert keyframes.labels == {1: "Chair", 2: "Chair", 3: "Person"}
    assert np.array_equal(keyframes.given.masks[2][1], square(1, 1))
    assert np.array_equal(keyframes.given.masks[4][3], square(3, 3))
    assert keyframes.size == (16, 12)


def test_annotation_without_keyframe_or_with_bad_region():
    config = formats.parse_label_config(SEQUENCE)
    with pytest.raises(InputError, match="no keyframe"):
        formats.brush_keyframes([], config, num_frames=3)
    with pytest.raises(InputError, match="no keyframe"):
        formats.brush_keyframes(
            [region(0, "Chair", square(0, 0), origin="prediction")], config, num_frames=3
        )
    with pytest.raises(InputError, match="the task has 3 frames"):
        formats.brush_keyframes([region(5, "Chair", square(0, 0))], config, num_frames=3)
    broken = region(0, "Chair", square(0, 0))
    broken["value"]["rle"] = broken["value"]["rle"][:5]
    with pytest.raises(InputError, match="malformed"):
        formats.brush_keyframes([broken], config, num_frames=3)


def test_predicted_brush_region_validates():
    config = formats.parse_label_config(SEQUENCE)
    predicted = formats.brush_region(config, 2, "Chair", 4, square(0, 0), 0.8)
    assert predicted["id"] == "xl2f4" and predicted["item_index"] == 4
    assert LabelInterface(SEQUENCE).validate_prediction({"result": [predicted]})


def test_video_tracks_and_track_region():
    config = formats.parse_label_config(VIDEO)
    annotation = [
        {
            "from_name": "track",
            "to_name": "video",
            "type": "videorectangle",
            "value": {
                "labels": ["Chair"],
                "sequence": [
                    {"frame": 2, "enabled": True, "x": 10, "y": 20, "width": 50, "height": 25},
                    {"frame": 5, "enabled": False, "x": 0, "y": 0, "width": 10, "height": 10},
                ],
            },
        }
    ]
    (track,) = formats.video_tracks(annotation, config, (200, 100))
    assert track.label == "Chair"
    assert track.keyframes[0] == formats.BoxKeyframe(1, (20.0, 20.0, 120.0, 45.0), False)
    assert track.keyframes[1].ends_track

    boxes = [None, (0, 0, 20, 10), (10, 0, 30, 10), None, (0, 50, 200, 100)]
    predicted = formats.video_track_region(config, 1, "Chair", boxes, (200, 100), 0.5)
    sequence = predicted["value"]["sequence"]
    assert [item["frame"] for item in sequence] == [2, 3, 5]
    assert [item["enabled"] for item in sequence] == [True, False, False]
    assert sequence[2]["y"] == 50.0 and sequence[2]["width"] == 100.0
    assert sequence[0]["time"] == pytest.approx(0.2)
    assert LabelInterface(VIDEO).validate_prediction({"result": [predicted]})
    with pytest.raises(InputError, match="no keyframe"):
        formats.video_tracks([], config, (200, 100))
