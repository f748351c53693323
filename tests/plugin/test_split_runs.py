"""A view split into one delegated run per sample, shared by real `fiftyone delegated
launch` workers: the wall time of a 4-sample view with 1 worker and with 2."""

from __future__ import annotations

import time

import fiftyone as fo  # noqa: I001  (conftest has set the environment)
import fiftyone.operators as foo
from bson import ObjectId
from fiftyone.operators.delegated import DelegatedOperationService

from .conftest import PLUGIN_NAME
from .workers import Workers, long_clip, wait_for

PROPAGATE = f"{PLUGIN_NAME}/propagate_masks"
SAMPLES, FRAMES = 4, 96


def split_run(dataset, workers: int) -> tuple[float, list, list[str]]:
    """Queue the whole view with samples_per_run=1 and run it on `workers` workers (started
    and idle first); returns the wall time from queueing to the last part done, the parts
    and the workers' output."""
    with Workers(workers) as running:
        started = time.monotonic()
        queued = foo.execute_operator(
            PROPAGATE,
            ctx=dict(
                dataset=dataset,
                request_delegation=True,
                params=dict(
                    prompt_field="gt", label_field="xmem", engine="flow", samples_per_run=1
                ),
            ),
        )
        parent = queued.result["id"]
        assert wait_for([parent]) == {parent: "completed"}, running.output
        parts = DelegatedOperationService().get(parent).result.result["runs"]
        states = wait_for(parts)
        wall = time.monotonic() - started
    assert set(states.values()) == {"completed"}, running.output
    service = DelegatedOperationService()
    first = service.get(parent).queued_at
    for op_id in [parent, *parts]:
        op = service.get(ObjectId(str(op_id)))
        print(
            f"{op.label}: queued +{(op.queued_at - first).total_seconds():.1f} s, started "
            f"+{(op.started_at - first).total_seconds():.1f} s, done "
            f"+{(op.completed_at - first).total_seconds():.1f} s"
        )
    return wall, parts, running.output


def test_a_view_is_shared_by_two_workers(mongod, tmp_path):
    dataset = fo.Dataset("split-view", overwrite=True)
    dataset.persistent = True
    try:
        for number in range(SAMPLES):
            clip = tmp_path / f"clip{number}.mp4"
            chair = long_clip(clip, FRAMES)
            sample = fo.Sample(filepath=str(clip))
            sample.frames[1]["gt"] = fo.Detections(
                detections=[fo.Detection.from_mask(chair, label="chair", index=1)]
            )
            dataset.add_sample(sample)

        one_worker, parts, _ = split_run(dataset, workers=1)
        assert len(parts) == SAMPLES
        dataset.reload()
        assert dataset.count("frames.xmem.detections") == SAMPLES * FRAMES
        labels = DelegatedOperationService().get(ObjectId(parts[0])).label
        assert labels == "Propagate masks: frames.gt -> frames.xmem (part 1/4)"

        two_workers, parts, output = split_run(dataset, workers=2)
        dataset.reload()
        assert dataset.count("frames.xmem.detections") == SAMPLES * FRAMES  # replaced
        for worker_output in output:  # each worker ran at least one part
            assert any(str(part) in worker_output for part in parts), worker_output
        print(
            f"\n{SAMPLES} samples x {FRAMES} frames (480x320, flow), one delegated run per "
            f"sample: 1 worker {one_worker:.1f} s, 2 workers {two_workers:.1f} s "
            f"({one_worker / two_workers:.2f}x)"
        )
    finally:
        dataset.delete()
