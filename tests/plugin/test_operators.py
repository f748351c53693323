"""End-to-end tests of the FiftyOne plugin with a real database (private mongod), the chair
clip encoded to mp4, and the weight-free flow engine."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import fiftyone as fo  # noqa: I001  (conftest has set the environment)
import fiftyone.operators as foo
import numpy as np
import pytest

from xmem_label.plugin.labels import relative_to_pixel_box
from xmem_label.plugin.videos import iter_video_labels

from .conftest import PLUGIN_NAME, check_equals_engine, full_frame, run_operator

PROPAGATE = f"{PLUGIN_NAME}/propagate_masks"
REVIEW = f"{PLUGIN_NAME}/review_frames"


def run(uri, ds, selected=None, **params):
    return run_operator(uri, ds, selected=selected, **params)


def test_operator_is_registered(mongod):
    assert PROPAGATE in [op.uri for op in foo.list_operators()]
    assert REVIEW in [op.uri for op in foo.list_operators()]


def test_immediate_run_writes_the_engines_masks_and_evaluates_like_the_engine(
    dataset, engine_labels, chair_truth
):
    result = run(PROPAGATE, dataset, prompt_field="gt", label_field="xmem", engine="flow")
    assert result.error is None, result.error
    # what the App receives while the generator runs: progress, then a reload and a message
    requests = result.executor.to_json()["requests"]
    progress = [r["params"]["progress"] for r in requests if r["operator_uri"] == "set_progress"]
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) >= 2
    assert [r["operator_uri"] for r in requests[-2:]] == ["reload_dataset", "notify"]
    assert "8 frames of 1 videos written to frames.xmem" in requests[-1]["params"]["message"]
    dataset.reload()
    check_equals_engine(dataset, "xmem", engine_labels)
    keyframe = dataset.first().frames[1]
    assert keyframe.xmem.detections[0].bounding_box == keyframe.gt.detections[0].bounding_box
    assert keyframe.xmem.detections[0].confidence == 1.0

    dataset.evaluate_detections(
        "frames.xmem", gt_field="frames.truth", eval_key="ev", use_masks=True, iou=0.1
    )
    dataset.reload()
    fiftyone_ious = [frame.xmem.detections[0].ev_iou for frame in dataset.first().frames.values()]
    engine_ious = [
        ((labels == 1) & (truth == 1)).sum() / ((labels == 1) | (truth == 1)).sum()
        for labels, truth in zip(engine_labels, chair_truth, strict=True)
    ]
    np.testing.assert_allclose(fiftyone_ious, engine_ious, atol=1e-6)


def test_an_immediate_run_from_python_returns_its_summary(dataset, engine_labels):
    """The App gets a generator (progress as it runs); Python callers get the summary."""
    result = foo.execute_operator(
        PROPAGATE,
        ctx=dict(
            dataset=dataset, params=dict(prompt_field="gt", label_field="xmem", engine="flow")
        ),
    )
    assert result.result == {
        "samples": 1,
        "frames": 8,
        "network_steps": 8,
        "skipped_samples": 0,
        "label_field": "frames.xmem",
        "engine": "flow",
        "stale_runs_failed": [],
    }
    dataset.reload()
    check_equals_engine(dataset, "xmem", engine_labels)


def test_rerun_replaces_and_a_failed_run_keeps_earlier_labels(dataset, engine_labels):
    for _ in range(2):
        assert run(PROPAGATE, dataset, prompt_field="gt", label_field="xmem").error is None
    dataset.reload()
    assert dataset.count("frames.xmem.detections") == 8  # one per frame, not two
    failed = run(
        PROPAGATE,
        dataset,
        prompt_field="gt",
        label_field="xmem",
        engine="xmem",
        checkpoint="/nonexistent/XMem.pth",
    )
    assert failed.error_message
    dataset.reload()
    check_equals_engine(dataset, "xmem", engine_labels)


def test_segmentation_prompt_and_selected_samples(dataset, chair_truth, chair_mp4):
    other = fo.Sample(filepath=str(chair_mp4))
    dataset.add_sample(other)
    first = dataset.first()
    first.frames[1]["seg"] = fo.Segmentation(mask=chair_truth[0].astype(np.uint8))
    first.save()
    dataset.mask_targets = {"frames.seg": {1: "chair"}}
    dataset.save()
    result = run(
        PROPAGATE,
        dataset,
        selected=[first.id],
        prompt_field="seg",
        label_field="from_seg",
        view_target="SELECTED_SAMPLES",
    )
    assert result.error is None, result.error
    dataset.reload()
    assert dataset.count("frames.from_seg.detections") == 8
    assert dataset[other.id].frames[1].has_field("from_seg") is False or (
        dataset[other.id].frames[1].from_seg is None
    )
    assert dataset.first().frames[4].from_seg.detections[0].label == "chair"


def test_box_prompt_is_turned_into_a_mask(dataset, chair_truth):
    box = dataset.first().frames[1].gt.detections[0].bounding_box
    dataset.set_values(
        "frames.boxes",
        {
            dataset.first().id: {
                1: fo.Detections(detections=[fo.Detection(label="chair", bounding_box=box)])
            }
        },
        key_field="id",
    )
    result = run(PROPAGATE, dataset, prompt_field="boxes", label_field="from_box")
    assert result.error is None, result.error
    dataset.reload()
    assert dataset.count("frames.from_box.detections") == 8
    first = dataset.first().frames[1].from_box
    mask = full_frame(first, chair_truth[0].shape) == 1
    x0, y0, x1, y1 = relative_to_pixel_box(box, mask.shape)
    assert mask.any() and mask[y0:y1, x0:x1].sum() == mask.sum()  # inside the box
    # This chair (behind glass, thin, background colours) defeats GrabCut: the prompt is the
    # whole box, IoU 0.35 with the truth. Masks are the strong prompt; boxes start a mask.
    truth = chair_truth[0] == 1
    assert (mask & truth).sum() / (mask | truth).sum() > 0.3


def test_review_tags_the_least_confident_frames_of_each_video(dataset):
    first = dataset.first()
    second = fo.Sample(filepath=first.filepath)
    dataset.add_sample(second)
    dataset.set_values("frames.gt", {second.id: {8: first.frames[8].truth.copy()}}, key_field="id")
    assert run(PROPAGATE, dataset, prompt_field="gt", label_field="xmem").error is None

    result = run(REVIEW, dataset, label_field="xmem", k=3, tag="check")
    assert result.error is None, result.error
    assert result.result["frames"] == 6 and result.result["samples"] == 2
    dataset.reload()
    for sample in dataset:
        propagated = sorted(
            (frame.xmem.min_confidence, number)
            for number, frame in sample.frames.items()
            if not frame.xmem.detections[0].keyframe
        )
        tagged = {
            number
            for number, frame in sample.frames.items()
            if "check" in frame.xmem.detections[0].tags
        }
        assert tagged == {number for _, number in propagated[:3]}

    again = run(REVIEW, dataset, label_field="xmem", k=1, tag="check")
    assert again.result["frames"] == 2
    assert dataset.count_label_tags()["check"] == 2  # re-running moves the tag, never adds

    saved = run(REVIEW, dataset, label_field="xmem", k=2, action="view", tag="to-review")
    assert saved.error is None, saved.error
    assert dataset.load_saved_view("to-review").count("frames") == 4
    again = run(REVIEW, dataset, label_field="xmem", k=1, action="view", tag="to-review")
    assert again.error is None, again.error  # its own saved view: replaced
    assert dataset.load_saved_view("to-review").count("frames") == 2


@pytest.mark.parametrize(
    "change, params, message",
    [
        (None, dict(prompt_field="nope"), "no frame field 'frames.nope'"),
        ("classification", dict(prompt_field="cls"), "holds Classification"),
        ("late_keyframe", dict(prompt_field="late"), "keyframe on frame 20 but the video has 8"),
        ("empty_mask", dict(prompt_field="empty"), "is empty"),
        (None, dict(prompt_field="gt", label_field="gt"), "must differ"),
        (None, dict(prompt_field="gt", label_field="a.b"), "not a plain field name"),
        (None, dict(prompt_field="gt", label_field="frame_number"), "other than Detections"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(dataset, change, params, message):
    sample = dataset.first()
    if change == "classification":
        sample.frames[1]["cls"] = fo.Classification(label="chair")
    elif change == "late_keyframe":
        sample.frames[20]["late"] = sample.frames[1].gt.copy()
    elif change == "empty_mask":
        empty = np.zeros((5, 5), bool)
        det = fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.2, 0.2], mask=empty)
        sample.frames[1]["empty"] = fo.Detections(detections=[det])
    sample.save()
    params.setdefault("label_field", "out")
    result = run(PROPAGATE, dataset, **params)
    assert message in (result.error_message or ""), result.error_message
    assert "Traceback" not in result.error_message
    dataset.reload()
    if params["label_field"] == "out":
        assert not dataset.has_frame_field("out")


def test_image_samples_are_refused(mongod, tmp_path):
    import cv2

    image = tmp_path / "still.png"
    cv2.imwrite(str(image), np.zeros((20, 20, 3), np.uint8))
    ds = fo.Dataset("images", overwrite=True)
    ds.add_sample(fo.Sample(filepath=str(image)))
    try:
        result = run(PROPAGATE, ds, prompt_field="gt", label_field="out")
        assert "needs video samples" in result.error_message
    finally:
        ds.delete()


def test_run_dying_mid_way_leaves_earlier_labels_intact(dataset, engine_labels, monkeypatch):
    """Labels are written in one bulk call after every video has propagated: a run that dies
    on its second video (an engine error, a killed worker) writes nothing."""
    import xmem_label.plugin.operators as operators

    first = dataset.first()
    second = fo.Sample(filepath=first.filepath)
    dataset.add_sample(second)
    dataset.set_values("frames.gt", {second.id: {1: first.frames[1].gt.copy()}}, key_field="id")
    assert run(PROPAGATE, dataset, prompt_field="gt", label_field="xmem").error is None
    dataset.set_values(
        "frames.later",
        {sid: {5: first.frames[5].truth.copy()} for sid in (first.id, second.id)},
        key_field="id",
    )

    def dies_on_second_video(job, engine, progress=None, cache_dir=None, only=None):
        if job.sample_id == second.id:
            raise RuntimeError("worker killed")
        yield from iter_video_labels(job, engine, progress, cache_dir, only)

    monkeypatch.setattr(operators, "iter_video_labels", dies_on_second_video)
    failed = run(PROPAGATE, dataset, prompt_field="later", label_field="xmem")
    assert "worker killed" in failed.error_message
    dataset.reload()
    check_equals_engine(dataset, "xmem", engine_labels)  # the first run's labels, untouched


def test_an_output_field_made_meanwhile_by_another_process_is_not_replaced(dataset, monkeypatch):
    """The output field is checked again just before the write: a field another process made
    while the run worked (not xmem-label's) is refused, nothing written."""
    import xmem_label.plugin.operators as operators

    made = (
        f"import fiftyone as fo; "
        f"fo.load_dataset({dataset.name!r}).add_frame_field('xmem', fo.StringField)"
    )

    def another_process_makes_the_field(job, engine, progress=None, cache_dir=None, only=None):
        subprocess.run([sys.executable, "-c", made], check=True, timeout=120)
        yield from iter_video_labels(job, engine, progress, cache_dir, only)

    monkeypatch.setattr(operators, "iter_video_labels", another_process_makes_the_field)
    failed = run(PROPAGATE, dataset, prompt_field="gt", label_field="xmem")
    assert "frames.xmem already holds something other than Detections" in failed.error_message
    dataset.reload()
    assert dataset.get_frame_field_schema()["xmem"].__class__ is fo.StringField
    assert dataset.count("frames.xmem") == 0


def test_corrected_review_frames_become_keyframes(dataset, chair_truth):
    """The active-learning loop: review picks the least confident frame, a person corrects it
    in the keyframe field, the next run keeps that correction verbatim."""
    assert run(PROPAGATE, dataset, prompt_field="gt", label_field="xmem").error is None
    assert run(REVIEW, dataset, label_field="xmem", k=1, tag="fix").error is None
    dataset.reload()
    sample = dataset.first()
    (worst,) = [fn for fn, frame in sample.frames.items() if frame.xmem.detections[0].tags]
    dataset.set_values(
        "frames.gt", {sample.id: {worst: sample.frames[worst].truth.copy()}}, key_field="id"
    )
    assert run(PROPAGATE, dataset, prompt_field="gt", label_field="xmem").error is None
    dataset.reload()
    corrected = dataset.first().frames[worst].xmem.detections[0]
    assert corrected.keyframe is True and corrected.confidence == 1.0
    labels = full_frame(dataset.first().frames[worst].xmem, chair_truth[0].shape)
    assert ((labels == 1) == (chair_truth[worst - 1] == 1)).all()


def test_long_jobs_default_to_delegated_execution(dataset):
    from fiftyone.operators.executor import resolve_execution_options
    from fiftyone.operators.registry import OperatorRegistry

    def options():
        request = dict(dataset_name=dataset.name, view=dataset.view()._serialize(), params={})
        return asyncio.run(resolve_execution_options(OperatorRegistry(), PROPAGATE, request))

    assert options().default_choice_to_delegated is False  # 8 frames
    sample = dataset.first()
    sample.metadata = fo.VideoMetadata(total_frame_count=5000)
    sample.save()
    assert options().default_choice_to_delegated is True
    assert options().allow_immediate_execution and options().allow_delegated_execution


def test_two_objects_keep_their_own_indexes(dataset, chair_truth):
    """FiftyOne indexes are kept as given (0 and 12 here), whatever the engine numbers."""
    first = dataset.first()
    patch = np.zeros_like(chair_truth[0], dtype=bool)
    patch[110:140, 150:200] = True  # a stretch of floor, as a second object
    keyframe = fo.Detections(
        detections=[
            fo.Detection.from_mask(chair_truth[0] == 1, label="chair", index=12),
            fo.Detection.from_mask(patch, label="floor", index=0),
        ]
    )
    dataset.set_values("frames.two", {first.id: {1: keyframe}}, key_field="id")
    assert run(PROPAGATE, dataset, prompt_field="two", label_field="out").error is None
    dataset.reload()
    for number, frame in dataset.first().frames.items():
        found = {(det.label, det.index) for det in frame.out.detections}
        assert found == {("chair", 12), ("floor", 0)}, number


def test_unreadable_video_is_a_clear_error(dataset, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    sample = fo.Sample(filepath=str(broken))
    dataset.add_sample(sample)
    gt = dataset.first().frames[1].gt.copy()
    dataset.set_values("frames.gt", {sample.id: {1: gt}}, key_field="id")
    result = run(PROPAGATE, dataset, prompt_field="gt", label_field="out")
    assert "broken.mp4" in result.error_message
    dataset.reload()
    assert not dataset.has_frame_field("out")


def test_review_needs_a_propagated_field(dataset):
    result = run(REVIEW, dataset, label_field="truth_seg_missing", k=2)
    assert "is not a propagated Detections field" in result.error_message


def form(ds, **params) -> dict:
    """The "propagate masks" form the App would show for `params`: name -> property JSON."""
    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    request = dict(
        dataset_name=ds.name, view=ds.view()._serialize(), params=params, target="inputs"
    )
    resolved = asyncio.run(resolve_type(OperatorRegistry(), PROPAGATE, request))
    return resolved.to_json()["type"]["properties"]


def test_outputs_are_marked_declared_and_not_the_default_keyframes(dataset):
    """The App form's keyframe field defaults to a field that is not an output, even when an
    output sorts first; taking an output as keyframes needs an explicit confirmation."""
    assert run(PROPAGATE, dataset, prompt_field="gt", label_field="a_out").error is None
    dataset.reload()
    info = dataset.get_field("frames.a_out").info["xmem_label"]
    assert info["prompt_field"] == "frames.gt" and info["engine"]["engine"] == "flow"
    schema = dataset.get_frame_field_schema(flat=True)
    assert isinstance(schema["a_out.min_confidence"], fo.FloatField)
    assert isinstance(schema["a_out.detections.keyframe"], fo.BooleanField)
    # declared, so the App's sidebar filters can use them
    assert (
        dataset.filter_labels("frames.a_out", fo.ViewField("keyframe") == True).count(  # noqa: E712
            "frames.a_out.detections"
        )
        == 1
    )
    assert dataset.bounds("frames.a_out.min_confidence")[1] == 1.0

    inputs = form(dataset)
    assert sorted(["a_out", "gt", "truth"]) == [
        choice["value"] for choice in inputs["prompt_field"]["view"]["choices"]
    ]
    assert inputs["prompt_field"]["default"] == "gt"  # "a_out" sorts first but is an output
    assert "output_as_keyframes" not in inputs

    inputs = form(dataset, prompt_field="a_out", label_field="b_out")
    assert inputs["output_as_keyframes"]["default"] is False
    assert "confirm" in inputs["output_as_keyframes"]["error_message"]
    refused = run(PROPAGATE, dataset, prompt_field="a_out", label_field="b_out")
    assert "frames.a_out was written by xmem-label" in refused.error_message
    confirmed = run(
        PROPAGATE, dataset, prompt_field="a_out", label_field="b_out", output_as_keyframes=True
    )
    assert confirmed.error is None, confirmed.error
    dataset.reload()
    assert all(det.keyframe for det in dataset.values("frames.b_out.detections", unwind=True))


def test_the_default_output_never_names_a_field_of_someone_else(dataset):
    dataset.add_frame_field("xmem", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    assert form(dataset)["label_field"]["default"] == "xmem_2"
    assert run(PROPAGATE, dataset, prompt_field="gt", label_field="xmem_2").error is None
    dataset.reload()
    assert form(dataset)["label_field"]["default"] == "xmem_2"  # ours now: offered again
    assert dataset.count("frames.xmem.detections") == 0


def test_an_object_left_out_of_a_keyframe_is_absent_there(dataset, chair_truth):
    """The keyframe rule of model/keyframes.py, as the Label Studio backend applies it too: a
    keyframe is the person's complete say on its frame, so the floor, given on frame 1 and left
    out of the keyframe on frame 5, is absent on frame 5 and propagated again after it only
    from its own keyframe (backwards before frame 5, never after)."""
    first = dataset.first()
    patch = np.zeros_like(chair_truth[0], dtype=bool)
    patch[110:140, 150:200] = True
    both = fo.Detections(
        detections=[
            fo.Detection.from_mask(chair_truth[0] == 1, label="chair", index=1),
            fo.Detection.from_mask(patch & (chair_truth[0] != 1), label="floor", index=2),
        ]
    )
    chair_only = fo.Detections(
        detections=[fo.Detection.from_mask(chair_truth[4] == 1, label="chair", index=1)]
    )
    dataset.set_values("frames.kf", {first.id: {1: both, 5: chair_only}}, key_field="id")
    assert run(PROPAGATE, dataset, prompt_field="kf", label_field="out").error is None
    dataset.reload()
    frames = dataset.first().frames
    labels = {
        number: {det.label for det in frames[number].out.detections}
        for number in range(1, len(frames) + 1)
    }
    assert labels[1] == labels[2] == {"chair", "floor"}
    assert all(labels[number] == {"chair"} for number in range(5, len(frames) + 1)), labels
