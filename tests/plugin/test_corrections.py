"""The annotation loop in FiftyOne (issue 16): "propagate corrections" recomputes and writes
only the frames a changed keyframe can change, "suggest frames to review" writes the engine's
suggestions. Real database (private mongod), the chair clip as an mp4, the flow engine."""

from __future__ import annotations

import fiftyone as fo  # noqa: I001  (conftest has set the environment)
import fiftyone.operators as foo
import numpy as np
import pytest
from fiftyone.operators.delegated import DelegatedOperationService

from xmem_label.model import Session

from .conftest import PLUGIN_NAME, full_frame, run_operator
from .workers import Workers, wait_for

PROPAGATE = f"{PLUGIN_NAME}/propagate_masks"
CORRECT = f"{PLUGIN_NAME}/propagate_corrections"
SUGGEST = f"{PLUGIN_NAME}/suggest_frames"


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("XMEM_LABEL_FIFTYONE_CACHE", str(root))
    return root


@pytest.fixture
def refused(monkeypatch):
    """The engine frame indexes the session fuses anew (not read back from its cache)."""
    indexes: list[int] = []
    fuse = Session._fuse
    monkeypatch.setattr(
        Session, "_fuse", lambda self, index, *a: indexes.append(index) or fuse(self, index, *a)
    )
    return indexes


def truth_detections(mask: np.ndarray) -> fo.Detections:
    return fo.Detections(detections=[fo.Detection.from_mask(mask == 1, label="chair", index=1)])


def set_keyframes(ds, frames: dict) -> None:
    ds.set_values("frames.gt", {ds.first().id: frames}, key_field="id")


def frame_state(ds, field: str) -> dict[int, tuple]:
    """frame number -> (the frame document's last write, the ids of its labels in `field`)."""
    numbers, modified, ids = ds.values(
        ["frames.frame_number", "frames.last_modified_at", f"frames.{field}.detections.id"]
    )
    return {n: (m, tuple(i or ())) for n, m, i in zip(numbers[0], modified[0], ids[0], strict=True)}


def correct(ds) -> dict:
    """Run "propagate corrections" from Python (the summary comes back, not a generator)."""
    params = dict(prompt_field="gt", label_field="xmem", engine="flow")
    result = foo.execute_operator(CORRECT, ctx=dict(dataset=ds, params=params))
    ds.reload()
    return result.result


def test_a_correction_writes_only_the_frames_it_recomputes(
    dataset, chair_truth, cache_root, refused
):
    set_keyframes(
        dataset, {4: truth_detections(chair_truth[3]), 8: truth_detections(chair_truth[7])}
    )
    first = correct(dataset)
    assert (first["frames"], first["network_steps"]) == (8, 14)  # 3 + 3 both ways, 4 back, 4 on
    assert correct(dataset)["frames"] == 0  # nothing changed: nothing run, nothing written
    before = frame_state(dataset, "xmem")

    corrected = truth_detections(chair_truth[5])
    set_keyframes(dataset, {6: corrected})
    refused.clear()
    summary = correct(dataset)
    assert sorted(refused) == [4, 5, 6]  # engine indexes: FiftyOne frames 5, 6, 7
    assert summary["frames"] == len(refused) == 3
    assert summary["network_steps"] == 4  # from frame 6: two steps back, two on
    after = frame_state(dataset, "xmem")
    written = {n for n in after if after[n][0] != before[n][0]}
    assert written == {5, 6, 7}
    assert all(after[n][1] == before[n][1] for n in after if n not in written)
    frames = dataset.first().frames
    kept = frames[6].xmem.detections[0]  # the person's label, verbatim
    assert kept.bounding_box == corrected.detections[0].bounding_box
    assert (kept.source, kept.keyframes, kept.keyframe) == ("keyframe", [6], True)
    fused = frames[5].xmem.detections[0]
    assert (fused.source, fused.keyframes, fused.keyframe) == ("fused", [4, 6], False)

    # the same as a from-scratch run of the same keyframes, frame for frame
    assert run_operator(PROPAGATE, dataset, prompt_field="gt", label_field="full").error is None
    dataset.reload()
    for number in range(1, 9):
        frame = dataset.first().frames[number]
        shape = chair_truth[0].shape
        np.testing.assert_array_equal(full_frame(frame.xmem, shape), full_frame(frame.full, shape))


def test_a_correction_opens_its_video_once(dataset, chair_truth, cache_root, monkeypatch):
    """The keyframes are checked and the session propagates from one opened video: opening it
    decodes its first frame, which also gives its size (issue 16's fixed cost per run), and a
    run whose passes are all in the cache decodes nothing else. The opened video is kept for
    the process (an App server or worker runs many propagations): later runs on the same file
    do not open it again."""
    from xmem_label.model.frames import VideoFile
    from xmem_label.plugin import videos

    set_keyframes(
        dataset, {4: truth_detections(chair_truth[3]), 8: truth_detections(chair_truth[7])}
    )
    correct(dataset)
    videos._open_video.cache_clear()  # as in a process that has not opened it yet
    opened: list = []
    open_video = VideoFile._open
    monkeypatch.setattr(VideoFile, "_open", lambda self: opened.append(self) or open_video(self))
    for _ in range(2):
        dataset.delete_frame_field("xmem")  # no recorded digests: every frame is written again
        summary = correct(dataset)
        assert (summary["frames"], summary["network_steps"]) == (len(chair_truth), 0)
        assert len(opened) == 1


def test_without_the_cache_a_correction_computes_again_and_writes_the_same(
    dataset, chair_truth, cache_root, monkeypatch
):
    """A cap of 0 bytes: each run's folder is evicted once the run has released it."""
    monkeypatch.setenv("XMEM_LABEL_FIFTYONE_CACHE_GB", "0")
    set_keyframes(dataset, {8: truth_detections(chair_truth[7])})
    correct(dataset)
    assert list(cache_root.iterdir()) == []
    set_keyframes(dataset, {5: truth_detections(chair_truth[4])})
    summary = correct(dataset)
    assert summary["frames"] == 6  # frames 2..7: between the unchanged keyframes 1 and 8
    assert summary["network_steps"] == 14  # every pass again
    assert run_operator(PROPAGATE, dataset, prompt_field="gt", label_field="full").error is None
    dataset.reload()
    shape = chair_truth[0].shape
    for frame in dataset.first().frames.values():
        np.testing.assert_array_equal(full_frame(frame.xmem, shape), full_frame(frame.full, shape))


def test_a_region_deleted_on_a_keyframe_is_absent_there(dataset, chair_truth, cache_root):
    """Issue 16 item 4, through the plugin: deleting an object's label on a keyframe says the
    object is not on that frame; "propagate corrections" stops propagating it there."""
    patch = np.zeros_like(chair_truth[0], dtype=bool)
    patch[110:140, 150:200] = True
    patch &= chair_truth[0] != 1

    def both(index: int) -> fo.Detections:
        labels = truth_detections(chair_truth[index])
        labels.detections.append(fo.Detection.from_mask(patch, label="floor", index=2))
        return labels

    set_keyframes(dataset, {1: both(0), 8: both(7)})
    correct(dataset)
    assert {d.label for d in dataset.first().frames[8].xmem.detections} == {"chair", "floor"}

    sample = dataset.first()
    keyframe = sample.frames[8].gt
    keyframe.detections = [d for d in keyframe.detections if d.label == "chair"]  # deleted
    sample.save()
    assert correct(dataset)["frames"] == 7  # frames 2..8
    frames = dataset.first().frames
    assert {d.label for d in frames[8].xmem.detections} == {"chair"}
    assert {d.label for d in frames[2].xmem.detections} == {"chair", "floor"}
    floor = next(d for d in frames[2].xmem.detections if d.label == "floor")
    assert (floor.source, floor.keyframes) == ("fused", [1, 8])  # fused with its absence


def test_suggested_frames_get_a_rank_reasons_and_a_saved_view(
    dataset, chair_truth, cache_root, refused
):
    set_keyframes(dataset, {8: truth_detections(chair_truth[7])})
    correct(dataset)
    refused.clear()
    result = run_operator(SUGGEST, dataset, label_field="xmem", count=3)
    assert result.error is None, result.error
    assert result.result["frames"] == 3
    assert refused == []  # everything came back from the cache
    dataset.reload()
    numbers, reviews = dataset.values(["frames.frame_number", "frames.xmem_review"])
    ranked = {n: r for n, r in zip(numbers[0], reviews[0], strict=True) if r is not None}
    assert sorted(r.rank for r in ranked.values()) == [1, 2, 3]
    assert not {1, 8} & set(ranked)  # never a keyframe
    assert all(r.reasons and r.label.startswith(f"#{r.rank}: ") for r in ranked.values())
    view = dataset.load_saved_view("xmem review")
    assert view.values("xmem_review.rank") == [1, 2, 3]
    assert view.values("frame_number") == sorted(ranked, key=lambda n: ranked[n].rank)

    assert run_operator(SUGGEST, dataset, label_field="xmem", count=1).error is None
    dataset.reload()
    assert dataset.count("frames.xmem_review") == 1  # the earlier suggestions are replaced
    assert len(dataset.load_saved_view("xmem review")) == 1

    set_keyframes(dataset, {4: truth_detections(chair_truth[3])})
    stale = run_operator(SUGGEST, dataset, label_field="xmem", count=1)
    assert "run propagate corrections first" in stale.error_message
    dataset.save_view("mine", dataset.view())
    taken = run_operator(SUGGEST, dataset, label_field="xmem", view_name="mine")
    assert "was not made by suggest frames" in taken.error_message


def test_a_delegated_correction_writes_only_its_frames(dataset, chair_truth, cache_root):
    """The worker process finds the passes the first run kept (the cache root comes from the
    environment it inherits) and writes only the frames around the correction."""

    def queued() -> str:
        params = dict(prompt_field="gt", label_field="xmem", engine="flow")
        result = foo.execute_operator(
            CORRECT, ctx=dict(view=dataset.view(), request_delegation=True, params=params)
        )
        return result.result["id"]

    set_keyframes(dataset, {8: truth_detections(chair_truth[7])})
    with Workers(1) as workers:
        first = queued()
        assert wait_for([first])[first] == "completed", workers.output
        dataset.reload()
        before = frame_state(dataset, "xmem")
        set_keyframes(dataset, {6: truth_detections(chair_truth[5])})
        second = queued()
        assert wait_for([second])[second] == "completed", workers.output
    summary = DelegatedOperationService().get(second).result.result
    assert (summary["frames"], summary["network_steps"]) == (6, 7)  # frames 2..7; 5 back, 2 on
    dataset.reload()
    after = frame_state(dataset, "xmem")
    assert {n for n in after if after[n][0] != before[n][0]} == set(range(2, 8))
    assert after[1] == before[1] and after[8] == before[8]
