"""The FiftyOne plugin against bad input: one table of cases on a real FiftyOne database
(the private mongod of tests/plugin) and the chair clip.

Each case changes the dataset as a user might, takes a snapshot of every stored document
of the dataset (samples, frames, the dataset's own document with its schema and field
infos), runs the operator as the App does, and asserts the one-line message and that the
snapshot did not change: nothing written, nothing declared, nothing replaced.
"""

# The plugin tests' conftest first: it sets FiftyOne's environment (a private mongod, this
# plugin folder) before fiftyone is imported, and holds the fixtures used here by name.
from tests.plugin.conftest import (  # noqa: I001, F401
    PLUGIN_NAME,
    chair_mp4,
    chair_truth,
    dataset,
    mongod,
    run_operator,
)

import cv2
import fiftyone as fo
import fiftyone.core.odm as foodm
import numpy as np
import pytest

PROPAGATE = f"{PLUGIN_NAME}/propagate_masks"
REVIEW = f"{PLUGIN_NAME}/review_frames"


def snapshot(ds: fo.Dataset) -> tuple:
    """Every stored document of `ds`, as the database holds it."""
    dataset_doc = foodm.get_db_conn().datasets.find_one({"_id": ds._doc.id})
    dataset_doc.pop("last_loaded_at", None)  # set by merely loading the dataset
    samples = list(ds._sample_collection.find({}, sort=[("_id", 1)]))
    frames = []
    if ds._frame_collection is not None:  # video datasets only
        frames = list(ds._frame_collection.find({}, sort=[("_id", 1)]))
    return dataset_doc, samples, frames


def set_frame(ds, field, label, frame_number=1):
    sample = ds.first()
    sample.frames[frame_number][field] = label
    sample.save()


def detections(*dets):
    return fo.Detections(detections=list(dets))


def square(size=(160, 240), box=(40, 60, 90, 120)):
    mask = np.zeros(size, dtype=bool)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def add_propagated_output(ds, tmp_path):
    assert run_operator(PROPAGATE, ds, prompt_field="gt", label_field="xmem").error is None


def add_video(ds, tmp_path, name, content: bytes | None):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    sample = fo.Sample(filepath=str(path))
    ds.add_sample(sample)
    ds.set_values("frames.gt", {sample.id: {1: ds.first().frames[1].gt.copy()}}, key_field="id")


CASES = {
    # id: (setup(ds, tmp_path) or None, operator, params, message)
    "missing keyframe field": (
        None,
        PROPAGATE,
        dict(prompt_field="nope"),
        "no frame field 'frames.nope' in this dataset",
    ),
    "keyframe field of another type": (
        lambda ds, _: set_frame(ds, "cls", fo.Classification(label="chair")),
        PROPAGATE,
        dict(prompt_field="cls"),
        "frames.cls holds Classification; prompts must be",
    ),
    "keyframe past the end": (
        lambda ds, _: set_frame(ds, "late", ds.first().frames[1].gt.copy(), 20),
        PROPAGATE,
        dict(prompt_field="late"),
        "keyframe on frame 20 but the video has 8 frames",
    ),
    "keyframe field with no keyframe": (
        lambda ds, _: set_frame(ds, "blank", detections()),
        PROPAGATE,
        dict(prompt_field="blank"),
        "no sample has a keyframe label in frames.blank",
    ),
    "empty instance mask": (
        lambda ds, _: set_frame(
            ds,
            "empty",
            detections(
                fo.Detection(
                    label="a", bounding_box=[0.1, 0.1, 0.2, 0.2], mask=np.zeros((5, 5), bool)
                )
            ),
        ),
        PROPAGATE,
        dict(prompt_field="empty"),
        "the mask of 'a' is empty",
    ),
    "mask without a box": (
        lambda ds, _: set_frame(
            ds, "nobox", detections(fo.Detection(label="a", mask=np.ones((5, 5), bool)))
        ),
        PROPAGATE,
        dict(prompt_field="nobox"),
        "detection 'a' has no bounding box",
    ),
    "negative object index": (
        lambda ds, _: set_frame(
            ds, "neg", detections(fo.Detection.from_mask(square(), label="a", index=-1))
        ),
        PROPAGATE,
        dict(prompt_field="neg"),
        "detection index -1 is negative",
    ),
    "two detections share an index": (
        lambda ds, _: set_frame(
            ds,
            "twice",
            detections(
                fo.Detection.from_mask(square(), label="a", index=2),
                fo.Detection.from_mask(square(box=(0, 0, 20, 20)), label="b", index=2),
            ),
        ),
        PROPAGATE,
        dict(prompt_field="twice"),
        "frame 1: two detections share one index",
    ),
    "more than 255 objects": (
        lambda ds, _: set_frame(
            ds,
            "crowd",
            detections(
                *[
                    fo.Detection.from_mask(square(box=(0, i % 200, 2, i % 200 + 2)), index=i)
                    for i in range(256)
                ]
            ),
        ),
        PROPAGATE,
        dict(prompt_field="crowd"),
        "256 objects in one video; at most 255",
    ),
    "RGB segmentation": (
        lambda ds, _: set_frame(ds, "rgb", fo.Segmentation(mask=np.ones((160, 240, 3), np.uint8))),
        PROPAGATE,
        dict(prompt_field="rgb"),
        "RGB segmentation masks are not supported",
    ),
    "segmentation of another size": (
        lambda ds, _: set_frame(ds, "small", fo.Segmentation(mask=np.ones((10, 10), np.uint8))),
        PROPAGATE,
        dict(prompt_field="small"),
        "is 10x10 but the frame is 240x160",
    ),
    "segmentation ids above 255": (
        lambda ds, _: set_frame(
            ds, "wide", fo.Segmentation(mask=np.full((160, 240), 300, np.uint16))
        ),
        PROPAGATE,
        dict(prompt_field="wide"),
        "mask values must be object ids 0..255",
    ),
    "output equals keyframe field": (
        None,
        PROPAGATE,
        dict(prompt_field="gt", label_field="gt"),
        "the output field must differ from the keyframe field",
    ),
    "output not a plain name": (
        None,
        PROPAGATE,
        dict(prompt_field="gt", label_field="a.b"),
        "output field 'a.b' is not a plain field name",
    ),
    "output of another type": (
        None,
        PROPAGATE,
        dict(prompt_field="gt", label_field="frame_number"),
        "frames.frame_number already holds something other than Detections",
    ),
    "output a person's own Detections": (
        None,
        PROPAGATE,
        dict(prompt_field="gt", label_field="truth"),
        "frames.truth was not written by xmem-label and is never replaced",
    ),
    "an output as keyframes, unconfirmed": (
        add_propagated_output,
        PROPAGATE,
        dict(prompt_field="xmem", label_field="again"),
        "frames.xmem was written by xmem-label: every propagated frame would be a keyframe",
    ),
    "unknown engine": (
        None,
        PROPAGATE,
        dict(prompt_field="gt", engine="sam"),
        "Path: engine",
    ),
    "XMem weights missing": (
        None,
        PROPAGATE,
        dict(prompt_field="gt", engine="xmem", checkpoint="/nowhere/XMem.pth"),
        "weights file not found: /nowhere/XMem.pth",
    ),
    "samples per run not a number": (
        None,
        PROPAGATE,
        dict(prompt_field="gt", samples_per_run="many"),
        "samples per run must be a whole number",
    ),
    "samples per run negative": (
        None,
        PROPAGATE,
        dict(prompt_field="gt", samples_per_run=-2),
        "samples per run must be 0 (one run) or more",
    ),
    "video file missing": (
        lambda ds, tmp: add_video(ds, tmp, "gone.mp4", None),
        PROPAGATE,
        dict(prompt_field="gt"),
        "gone.mp4 does not exist",
    ),
    "video file unreadable": (
        lambda ds, tmp: add_video(ds, tmp, "broken.mp4", b"not a video"),
        PROPAGATE,
        dict(prompt_field="gt"),
        "broken.mp4",
    ),
    "review of a field that was not propagated": (
        None,
        REVIEW,
        dict(label_field="nothing_here", k=2),
        "frames.nothing_here is not a propagated Detections field",
    ),
    "review view over a person's saved view": (
        lambda ds, tmp: (add_propagated_output(ds, tmp), ds.save_view("mine", ds.limit(1))),
        REVIEW,
        dict(label_field="xmem", k=2, action="view", tag="mine"),
        "a saved view 'mine' exists and was not made by review frames",
    ),
    "review with k below 1": (
        add_propagated_output,
        REVIEW,
        dict(label_field="xmem", k=-1),
        "Path: k",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(dataset, tmp_path, case):  # noqa: F811
    setup, operator, params, message = CASES[case]
    if setup is not None:
        setup(dataset, tmp_path)
    if operator == PROPAGATE:
        params = {"label_field": "out", "engine": "flow", **params}
    dataset.reload()
    before = snapshot(dataset)
    result = run_operator(operator, dataset, **params)
    assert result.error_message and message in result.error_message, result.error_message
    assert "Traceback" not in result.error_message
    assert len(result.error_message.splitlines()) == 1
    dataset.reload()
    assert snapshot(dataset) == before


def test_image_samples_are_refused_and_unchanged(mongod, tmp_path):  # noqa: F811
    image = tmp_path / "still.png"
    cv2.imwrite(str(image), np.zeros((20, 20, 3), np.uint8))
    ds = fo.Dataset("bad-input-images", overwrite=True)
    ds.add_sample(fo.Sample(filepath=str(image)))
    try:
        before = snapshot(ds)
        result = run_operator(PROPAGATE, ds, prompt_field="gt", label_field="out")
        assert "propagation needs video samples; this collection holds image samples" in (
            result.error_message
        )
        assert snapshot(ds) == before
    finally:
        ds.delete()
