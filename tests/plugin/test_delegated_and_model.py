"""Delegated runs with a real `fiftyone delegated launch` worker, the prompted video Model
through `dataset.apply_model`, and the zoo model source."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import fiftyone as fo  # noqa: I001  (conftest has set the environment)
import fiftyone.operators as foo
import fiftyone.zoo as foz
import pytest
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionError

from xmem_label.model import InputError
from xmem_label.plugin import runs
from xmem_label.plugin.fields import MARKER
from xmem_label.plugin.model import XMemLabelVideoModel

from .conftest import PLUGIN_NAME, REPO, check_equals_engine, run_operator
from .workers import FIFTYONE, Workers, error_message, long_clip, wait_for

PROPAGATE = f"{PLUGIN_NAME}/propagate_masks"
STATUS = f"{PLUGIN_NAME}/propagation_status"


def queue(dataset, view=None, **params):
    """Queue a delegated propagation as a Python caller does; returns the operation id."""
    queued = foo.execute_operator(
        PROPAGATE,
        ctx=dict(
            view=dataset.view() if view is None else view,
            request_delegation=True,
            params=dict(engine="flow", **params),
        ),
    )
    assert queued.delegated
    return queued.result["id"]


def operations(dataset) -> list:
    return DelegatedOperationService().list_operations(dataset_name=dataset.name)


def test_delegated_run_by_a_worker_process(dataset, engine_labels):
    op_id = queue(dataset, prompt_field="gt", label_field="xmem")
    with Workers(1) as workers:
        states = wait_for([op_id])
    operation = DelegatedOperationService().get(op_id)
    assert states[op_id] == "completed", (operation.result, workers.output)
    assert operation.result.result["frames"] == 8
    assert operation.status.progress == 1.0  # progress (the heartbeat) on the record
    assert operation.label == "Propagate masks: frames.gt -> frames.xmem"
    dataset.reload()
    check_equals_engine(dataset, "xmem", engine_labels)
    assert dataset.get_field("frames.xmem").info[MARKER]["run"] == str(op_id)


def test_bad_parameters_are_refused_before_queueing(dataset):
    with pytest.raises(ExecutionError, match="no frame field 'frames.missing' in this dataset"):
        queue(dataset, prompt_field="missing", label_field="out")
    with pytest.raises(ExecutionError, match="frames.truth was not written by xmem-label"):
        queue(dataset, prompt_field="gt", label_field="truth")
    assert operations(dataset) == []
    dataset.reload()
    assert not dataset.has_frame_field("out")


def test_a_run_failing_in_the_worker_records_a_one_line_reason(dataset):
    """What needs the video (here a keyframe past its end) is found by the worker; the
    operation's error and error_message are that one line, not a traceback."""
    sample = dataset.first()
    sample.frames[20]["late"] = sample.frames[1].gt.copy()
    sample.save()
    op_id = queue(dataset, prompt_field="late", label_field="out")
    with Workers(1) as workers:
        states = wait_for([op_id])
    assert states[op_id] == "failed", workers.output
    reason = "chair.mp4: keyframe on frame 20 but the video has 8 frames"
    assert error_message(op_id) == reason
    assert DelegatedOperationService().get(op_id).result.error == reason
    dataset.reload()
    assert not dataset.has_frame_field("out")


def test_a_killed_worker_is_detected_and_the_run_reruns_cleanly(dataset, tmp_path, monkeypatch):
    """SIGKILL the worker mid-run: FiftyOne leaves the operation "running". The next run on
    the dataset marks it failed, naming the command that re-runs it; that re-run, on a
    fresh worker, writes the whole clip."""
    clip = tmp_path / "long.mp4"
    chair = long_clip(clip, 96)
    sample = fo.Sample(filepath=str(clip))
    dataset.add_sample(sample)
    dataset.set_values(
        "frames.long",
        {
            sample.id: {
                1: fo.Detections(detections=[fo.Detection.from_mask(chair, label="chair", index=1)])
            }
        },
        key_field="id",
    )
    long_view = dataset.select(sample.id)
    op_id = queue(dataset, view=long_view, prompt_field="long", label_field="out")
    with Workers(1) as workers:
        assert wait_for([op_id], states=("running",)) == {op_id: "running"}
        time.sleep(1.0)  # mid-way through the clip
        workers.kill(0)
    assert DelegatedOperationService().get(op_id).run_state == "running"  # FiftyOne's view
    dataset.reload()
    assert not dataset.has_frame_field("out")  # nothing half-written

    monkeypatch.setattr(runs, "STALE_AFTER_S", 1.0)
    time.sleep(runs.HEARTBEAT_S + 1.5)
    status = run_operator(STATUS, dataset, stale_after_s=600)
    assert status.result["marked_failed"] == []  # not yet dead by the user's measure
    next_run = run_operator(
        PROPAGATE, dataset, prompt_field="gt", label_field="xmem", engine="flow"
    )
    assert next_run.error is None, next_run.error
    notice = next_run.executor.to_json()["requests"][-1]["params"]["message"]
    assert f"marked failed (their worker died): {op_id}" in notice
    reason = error_message(op_id)
    assert "no heartbeat from its worker" in reason
    assert reason.endswith(f"re-run it with: fiftyone delegated rerun {op_id}")
    status = run_operator(STATUS, dataset)
    assert any(line.startswith(f"{op_id}  failed") for line in status.result["runs"])

    subprocess.run([FIFTYONE, "delegated", "rerun", str(op_id)], check=True, capture_output=True)
    (rerun,) = DelegatedOperationService().list_operations(
        dataset_name=dataset.name, run_state="queued"
    )
    with Workers(1) as workers:
        states = wait_for([rerun.id])
    assert states[rerun.id] == "completed", workers.output
    dataset.reload()
    assert long_view.count("frames.out.detections") == 96
    assert dataset.count("frames.out.detections") == 96  # the chair sample untouched


def test_apply_model_writes_the_engines_masks(dataset, engine_labels):
    dataset.apply_model(
        XMemLabelVideoModel(engine="flow"), label_field="xmem", prompt_field="frames.gt"
    )
    dataset.reload()
    check_equals_engine(dataset, "xmem", engine_labels)
    assert dataset.get_field("frames.xmem").info[MARKER]["run"] == "apply_model"


def test_apply_model_refuses_a_frames_prefix_before_running(dataset):
    model = XMemLabelVideoModel(engine="flow")
    started = time.monotonic()
    with pytest.raises(InputError, match="without its 'frames.' prefix"):
        dataset.apply_model(
            model, label_field="frames.xmem", prompt_field="frames.gt", skip_failures=False
        )
    assert time.monotonic() - started < 5
    dataset.reload()
    assert not dataset.has_frame_field("xmem")


def test_zoo_model_source(dataset, engine_labels):
    zoo_dir = Path(fo.config.model_zoo_dir)
    zoo_dir.mkdir(parents=True, exist_ok=True)
    source = zoo_dir / "xmem-label"  # a copy: FiftyOne writes its "downloaded" note into it
    if not source.exists():
        shutil.copytree(REPO / "plugin" / "zoo", source)
    assert "xmem-label-video" in foz.list_zoo_models()
    model = foz.load_zoo_model("xmem-label-video", engine="flow")
    assert isinstance(model, XMemLabelVideoModel)
    dataset.apply_model(model, label_field="zoo", prompt_field="frames.gt")
    dataset.reload()
    check_equals_engine(dataset, "zoo", engine_labels)
