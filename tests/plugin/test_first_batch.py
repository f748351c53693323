"""A video's first frames are stored while the rest propagates (issue 17, time to first mask),
and a run that fails puts them back as they were. Real database (private mongod), a 40-frame
clip (the chair played back and forth), the flow engine."""

from __future__ import annotations

import subprocess

import fiftyone as fo  # noqa: I001  (conftest has set the environment)
import fiftyone.operators as foo
import numpy as np
import pytest
from bson import ObjectId
from fiftyone.core.odm import get_db_conn
from fiftyone.operators.delegated import DelegatedOperationService

from xmem_label.model import Session
from xmem_label.plugin import first_batch

from .conftest import CHAIR, PLUGIN_NAME, full_frame, run_operator
from .workers import Workers, wait_for

PROPAGATE = f"{PLUGIN_NAME}/propagate_masks"
CORRECT = f"{PLUGIN_NAME}/propagate_corrections"
LENGTH = 40


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory, chair_truth):
    """40 frames of the chair clip played forward and backward (H.264), and its truth."""
    frames = sorted((CHAIR / "frames").glob("*.jpg"))
    order = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
    indexes = [order[i % len(order)] for i in range(LENGTH)]
    folder = tmp_path_factory.mktemp("long")
    listing = folder / "frames.txt"
    listing.write_text("".join(f"file '{frames[i]}'\nduration 0.04\n" for i in indexes))
    path = folder / "chair-40.mp4"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-f", "concat", "-safe", "0", "-i", str(listing),
         "-frames:v", str(LENGTH), "-r", "25", "-c:v", "libx264", "-crf", "12",
         "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )  # fmt: skip
    return path, [chair_truth[i] for i in indexes]


@pytest.fixture
def long_dataset(mongod, long_clip, request, tmp_path, monkeypatch):
    monkeypatch.setenv("XMEM_LABEL_FIFTYONE_CACHE", str(tmp_path / "cache"))
    path, truth = long_clip
    ds = fo.Dataset(f"long-{request.node.name}"[:60], overwrite=True)
    ds.add_sample(fo.Sample(filepath=str(path)))
    ds.compute_metadata()
    set_keyframes(ds, truth, [1])
    yield ds
    ds.delete()


def set_keyframes(ds, truth, numbers, absent=()) -> None:
    """The ground truth of FiftyOne frames `numbers` as keyframe labels; `absent`: labels
    deleted."""
    labels = {
        n: fo.Detections(
            detections=[fo.Detection.from_mask(truth[n - 1] == 1, label="chair", index=1)]
        )
        for n in numbers
    }
    ds.set_values("frames.gt", {ds.first().id: {**labels, **dict.fromkeys(absent)}}, key_field="id")


def stored_frames(ds, field: str = "xmem") -> list[int]:
    """The frame numbers holding a label in `field`, read from the database itself."""
    found = get_db_conn()[ds._frame_collection_name].find(
        {"_sample_id": ObjectId(ds.first().id), field: {"$ne": None}}, {"frame_number": True}
    )
    return sorted(doc["frame_number"] for doc in found)


def frame_documents(ds) -> dict[int, dict]:
    """frame number -> its whole stored document."""
    collection = get_db_conn()[ds._frame_collection_name]
    return {
        doc["frame_number"]: doc for doc in collection.find({"_sample_id": ObjectId(ds.first().id)})
    }


@pytest.fixture
def at_frame(monkeypatch):
    """at_frame(index, action): run action() when the session fuses engine frame `index`."""
    actions: dict = {}
    fuse = Session._fuse

    def fused(self, index, *args):
        if index in actions:
            actions[index]()
        return fuse(self, index, *args)

    monkeypatch.setattr(Session, "_fuse", fused)
    return actions.__setitem__


def fail() -> None:
    raise RuntimeError("the engine failed here")


@pytest.mark.parametrize("uri", [PROPAGATE, CORRECT])
def test_the_first_frames_are_stored_before_the_rest_is_computed(long_dataset, at_frame, uri):
    seen: list[list[int]] = []
    at_frame(30, lambda: seen.append(stored_frames(long_dataset)))
    result = run_operator(uri, long_dataset, prompt_field="gt", label_field="xmem", engine="flow")
    assert result.error is None, result.error
    assert seen == [list(range(1, first_batch.FIRST_BATCH + 1))]  # while frame 31 was computed
    assert stored_frames(long_dataset) == list(range(1, LENGTH + 1))
    requests = result.executor.to_json()["requests"]  # what the App receives
    triggered = [r["operator_uri"] for r in requests]
    stored_at = triggered.index("reload_dataset")  # the first batch: the App shows it
    assert "first 10 stored" in requests[stored_at - 1]["params"]["label"]
    assert stored_at < triggered.index("notify") - 1  # well before the end's reload
    long_dataset.reload()
    frames = long_dataset.first().frames
    assert frames[1].xmem.keyframe_digest is not None  # the final write gave it this run's
    assert all(getattr(frames[n].xmem, "keyframe_digest", None) is None for n in range(2, LENGTH))


def test_a_short_run_writes_no_first_batch(long_dataset, long_clip, at_frame):
    """A video with fewer frames to write than FIRST_BATCH_MIN_FRAMES is written at the end."""
    _, truth = long_clip
    set_keyframes(long_dataset, truth, [10, 30])
    assert run_operator(CORRECT, long_dataset, prompt_field="gt", label_field="xmem").error is None
    set_keyframes(long_dataset, truth, [15])  # rewrites frames 11..29: 19 frames
    before = frame_documents(long_dataset)
    seen: list[dict] = []
    at_frame(27, lambda: seen.append(frame_documents(long_dataset)))
    assert run_operator(CORRECT, long_dataset, prompt_field="gt", label_field="xmem").error is None
    assert seen == [before]  # nothing written while frame 28 was computed
    after = frame_documents(long_dataset)
    changed = [n for n in after if after[n]["last_modified_at"] != before[n]["last_modified_at"]]
    assert changed == list(range(11, 30))


def test_a_failed_run_puts_its_first_batch_back(long_dataset, long_clip, at_frame):
    """A run failing after its first batch leaves the database as it was: on a first run no
    frame document is added; on a later one every frame document is as before, field for
    field (labels, their ids, last_modified_at)."""
    _, truth = long_clip
    before = frame_documents(long_dataset)
    seen: list[list[int]] = []
    at_frame(20, lambda: seen.append(stored_frames(long_dataset)))
    at_frame(30, fail)
    failed = run_operator(PROPAGATE, long_dataset, prompt_field="gt", label_field="xmem")
    assert "the engine failed here" in failed.error
    assert seen == [list(range(1, 11))]  # it was stored, then put back
    assert frame_documents(long_dataset) == before  # only frame 1's document, unchanged

    at_frame(20, lambda: None)
    at_frame(30, lambda: None)
    assert (
        run_operator(PROPAGATE, long_dataset, prompt_field="gt", label_field="xmem").error is None
    )
    set_keyframes(long_dataset, truth, [LENGTH])
    before = frame_documents(long_dataset)
    assert len(before) == LENGTH
    during: list[dict] = []
    at_frame(20, lambda: during.append(frame_documents(long_dataset)))
    at_frame(30, fail)
    failed = run_operator(PROPAGATE, long_dataset, prompt_field="gt", label_field="xmem")
    assert "the engine failed here" in failed.error
    (stored,) = during
    assert [n for n in stored if stored[n] != before[n]] == list(range(1, 11))
    assert frame_documents(long_dataset) == before


def test_after_a_killed_run_a_correction_rewrites_its_first_batch(
    long_dataset, long_clip, at_frame, monkeypatch
):
    """A run killed after its first batch cannot put it back. Its frames carry the keyframe
    digests of the last complete run, so the next "propagate corrections" finds the same
    frames to write and gives what a from-scratch run gives. Here the killed run's batch
    covers a keyframe whose label was deleted: had the batch recorded this run's digests
    (none there), the next run would have found nothing changed."""
    _, truth = long_clip
    set_keyframes(long_dataset, truth, [6, LENGTH])
    assert run_operator(CORRECT, long_dataset, prompt_field="gt", label_field="xmem").error is None
    set_keyframes(long_dataset, truth, [], absent=[6])
    monkeypatch.setattr(first_batch.EarlyFrames, "restore", lambda self: None)  # as SIGKILL
    at_frame(30, fail)
    failed = run_operator(CORRECT, long_dataset, prompt_field="gt", label_field="xmem")
    assert "the engine failed here" in failed.error
    at_frame(30, lambda: None)
    params = dict(prompt_field="gt", label_field="xmem", engine="flow")
    again = foo.execute_operator(CORRECT, ctx=dict(dataset=long_dataset, params=params))
    assert again.result["frames"] == LENGTH - 2  # frames 2..39, the first batch included
    assert (
        run_operator(PROPAGATE, long_dataset, prompt_field="gt", label_field="full").error is None
    )
    long_dataset.reload()
    shape = truth[0].shape
    for frame in long_dataset.first().frames.values():
        np.testing.assert_array_equal(full_frame(frame.xmem, shape), full_frame(frame.full, shape))


def test_a_delegated_run_stores_its_first_batch_first_and_says_so(long_dataset):
    """In a `fiftyone delegated launch` worker: the first batch's frame documents were written
    before the rest (their last write is earlier), and the operation's progress says so."""
    long_dataset.persistent = True  # the worker is another process
    params = dict(prompt_field="gt", label_field="xmem", engine="flow")
    with Workers(1) as workers:
        queued = foo.execute_operator(
            PROPAGATE, ctx=dict(view=long_dataset.view(), request_delegation=True, params=params)
        )
        op_id = queued.result["id"]
        assert wait_for([op_id])[op_id] == "completed", workers.output
    operation = DelegatedOperationService().get(op_id)
    assert operation.result.result["frames"] == LENGTH
    assert operation.status.label == "100% of frames, first 10 stored"
    documents = frame_documents(long_dataset)
    assert stored_frames(long_dataset) == list(range(1, LENGTH + 1))
    batch = [documents[n]["last_modified_at"] for n in range(2, first_batch.FIRST_BATCH + 1)]
    rest = [documents[n]["last_modified_at"] for n in range(first_batch.FIRST_BATCH + 1, LENGTH)]
    assert max(batch) < min(rest)  # frame 1 is written again at the end, with its digest
