"""Delegated propagation runs, on FiftyOne's own delegated-operation service: a heartbeat
while a run works, detection of runs whose worker died, a failed run's one-line reason.

FiftyOne marks nothing failed when a `fiftyone delegated launch` worker is killed: its
operation stays "running" for ever. A propagation run reports its progress every HEARTBEAT_S
(its heartbeat, stored on the operation); a running one whose last report is older than
STALE_AFTER_S is taken as dead. The next run on the dataset, or the "propagation status"
operator, marks it failed with that reason and the command that re-runs it. A run marked
failed that was only slow finds out before writing and writes nothing.
"""

from __future__ import annotations

import datetime
import threading

from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionResult, ExecutionRunState

HEARTBEAT_S = 2.0
STALE_AFTER_S = 60.0


def _utcnow() -> datetime.datetime:
    """Naive UTC, as FiftyOne stores the operations' times."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def operation_id(ctx) -> str | None:
    """The delegated operation a worker is running `ctx` for (None when immediate)."""
    return ctx.request_params.get("run_doc") if ctx.delegated else None


def fail(op_id, message: str, detail: str | None = None) -> None:
    """Mark running operation `op_id` failed with `message` as its error and error message
    (`detail`, a traceback, goes in the error instead when given)."""
    DelegatedOperationService().set_failed(
        doc_id=op_id,
        result=ExecutionResult(error=detail or message, error_message=message),
        required_state=ExecutionRunState.RUNNING,
    )


def is_still_running(op_id) -> bool:
    """False once something else marked the operation failed (see `fail_stale_runs`)."""
    operation = DelegatedOperationService().get(op_id)
    return operation is not None and operation.run_state == ExecutionRunState.RUNNING


def last_sign_of_life(operation) -> datetime.datetime | None:
    times = [operation.started_at, getattr(operation.status, "updated_at", None)]
    return max((t for t in times if t is not None), default=None)


def fail_stale_runs(
    dataset_name: str, operator_uri: str, stale_after_s: float | None = None
) -> list[str]:
    """Mark failed every running `operator_uri` operation on the dataset that has not
    reported for `stale_after_s` seconds (default STALE_AFTER_S); returns their ids."""
    stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
    service = DelegatedOperationService()
    now = _utcnow()
    failed = []
    for operation in service.list_operations(
        operator=operator_uri, dataset_name=dataset_name, run_state=ExecutionRunState.RUNNING
    ):
        seen = last_sign_of_life(operation)
        if seen is None or (now - seen).total_seconds() <= stale_after_s:
            continue
        message = (
            f"no heartbeat from its worker since {seen:%Y-%m-%d %H:%M:%S} UTC (worker killed or "
            f"lost); re-run it with: fiftyone delegated rerun {operation.id}"
        )
        if service.set_failed(
            doc_id=operation.id,
            result=ExecutionResult(error=message, error_message=message),
            required_state=ExecutionRunState.RUNNING,
        ):
            failed.append(str(operation.id))
    return failed


def describe_runs(dataset_name: str, operator_uri: str) -> list[str]:
    """One line per `operator_uri` operation on the dataset, newest first: id, state,
    progress, name and, for a failed one, its reason."""
    lines = []
    operations = DelegatedOperationService().list_operations(
        operator=operator_uri, dataset_name=dataset_name
    )
    for operation in sorted(operations, key=lambda op: op.queued_at or _utcnow(), reverse=True):
        progress = getattr(operation.status, "progress", None)
        line = f"{operation.id}  {operation.run_state}"
        if progress is not None:
            line += f"  {progress:.0%}"
        line += f"  {operation.label or ''}"
        error = getattr(operation.result, "error", None)
        if operation.run_state == ExecutionRunState.FAILED and error:
            line += f"  -- {error.strip().splitlines()[-1]}"
        lines.append(line)
    return lines


class Heartbeat:
    """While a delegated run works, report its latest progress every HEARTBEAT_S from a
    background thread, so long silent steps (loading weights, writing) still count as alive.
    Use as a context manager; `update(fraction, label)` sets what the next report says."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.fraction = 0.0
        self.label: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="xmem-label-heartbeat", daemon=True)

    def update(self, fraction: float, label: str | None = None, now: bool = False) -> None:
        """now: report at once (frames were stored) instead of at the next beat."""
        self.fraction, self.label = fraction, label
        if now:
            self._report()

    def _report(self) -> None:
        with self._lock:
            label = self.label or f"{self.fraction:.0%} of frames"
            self.ctx.set_progress(progress=self.fraction, label=label)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._report()

    def __enter__(self) -> Heartbeat:
        self._report()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._report()
