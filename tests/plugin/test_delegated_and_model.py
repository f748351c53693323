"""Delegated runs with a real `fiftyone delegated launch` worker, the prompted video Model
through `dataset.apply_model`, and the zoo model source."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fiftyone as fo  # noqa: I001  (conftest has set the environment)
import fiftyone.operators as foo
import fiftyone.zoo as foz
from fiftyone.operators.delegated import DelegatedOperationService

from xmem_label.plugin.model import XMemLabelVideoModel

from .conftest import PLUGIN_NAME, REPO, check_equals_engine

PROPAGATE = f"{PLUGIN_NAME}/propagate_masks"
WORKER_TIMEOUT_S = 180


def wait_for_delegated(op_id: str) -> tuple[str, str]:
    """Run `fiftyone delegated launch` until operation `op_id` is done; returns its state
    and the worker's output."""
    service = DelegatedOperationService()
    worker = subprocess.Popen(
        [str(Path(sys.executable).with_name("fiftyone")), "delegated", "launch"],
        env=dict(os.environ, OMP_NUM_THREADS="1"),  # a good neighbour on a 2-core runner
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    state = None
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while time.monotonic() < deadline:
            state = service.get(op_id).run_state
            if state in ("completed", "failed"):
                break
            time.sleep(0.5)
    finally:
        os.killpg(worker.pid, signal.SIGINT)  # only the worker group this test started
        try:
            output, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            output, _ = worker.communicate()
    return state, output


def test_delegated_run_by_a_worker_process(dataset, engine_labels):
    queued = foo.execute_operator(
        PROPAGATE,
        ctx=dict(
            dataset=dataset,
            params=dict(prompt_field="gt", label_field="xmem", engine="flow", delegate=True),
        ),
    )
    assert queued.delegated
    state, output = wait_for_delegated(queued.result["id"])
    operation = DelegatedOperationService().get(queued.result["id"])
    assert state == "completed", (operation.result, output)
    assert operation.result.result["frames"] == 8
    assert operation.status.progress > 0  # progress reported on the operation's record
    dataset.reload()
    check_equals_engine(dataset, "xmem", engine_labels)


def test_delegated_failure_is_recorded_and_writes_nothing(dataset):
    queued = foo.execute_operator(
        PROPAGATE,
        ctx=dict(
            dataset=dataset,
            request_delegation=True,
            params=dict(prompt_field="missing", label_field="out"),
        ),
    )
    state, output = wait_for_delegated(queued.result["id"])
    assert state == "failed", output
    operation = DelegatedOperationService().get(queued.result["id"])
    assert "no frame field 'frames.missing'" in operation.result.error
    dataset.reload()
    assert not dataset.has_frame_field("out")


def test_apply_model_writes_the_engines_masks(dataset, engine_labels):
    dataset.apply_model(XMemLabelVideoModel(engine="flow"), label_field="xmem",
                        prompt_field="frames.gt")
    dataset.reload()
    check_equals_engine(dataset, "xmem", engine_labels)


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
