"""Running jobs: `run_job`, the one path every job takes (execute, deliver or store, fail or
retry, report), and `JobRunner`, the threads that claim the embedded journal's jobs and run
them while renewing their lease. The threads run inside each `xmem-label serve` process (the
embedded default, `--job-threads`) and in `xmem-label worker` processes; all share one journal
(journal.py). Past one machine, RQ workers run the same `run_job` (queues.py).

What a job means is the caller's: `execute(record)` computes a result, `store(record, result)`
stores it through Label Studio when no request waits for it, and `report(record, reason)`
leaves a failed job's reason where the annotator sees it. Failures are sorted here:
`XMemLabelError` (bad input, no weights) fails the job at once; anything else (Label Studio
unreachable, a crash) is retried up to the journal's attempt limit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

from xmem_label.model import XMemLabelError
from xmem_label.model.errors import one_line

from .journal import JobRecord, Journal

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.2


class JobStore(Protocol):
    """The small interface model.py and run_job use, with two implementations:
    journal.Journal (embedded SQLite, one machine, the default) and queues.RedisQueue (RQ on
    Redis, web replicas and workers on any hosts). Job logic lives in run_job, once."""

    max_attempts: int

    def submit(
        self, key: str, kind: str, project: str, task_id: int | None, payload: dict, deliver: str
    ) -> tuple[JobRecord, bool]: ...
    def get(self, job_id: Any) -> JobRecord: ...
    def wait(self, job_id: Any, timeout: float, poll: float = 0.1) -> JobRecord: ...
    def hand_over(self, job_id: Any) -> bool: ...
    def complete(self, job_id: Any, worker: str, result: dict) -> str: ...
    def mark_stored(self, job_id: Any, worker: str, result: dict | None = None) -> bool: ...
    def fail(self, job_id: Any, worker: str, error: str, *, retry: bool = False) -> bool: ...
    def counts(self) -> dict[str, int]: ...
    def latest_result(self) -> dict | None: ...
    def register_project(self, project: str) -> None: ...
    def is_project_registered(self, project: str) -> bool: ...


class QueueFull(Exception):
    """Too many jobs are waiting; the caller should retry later (HTTP 503 with Retry-After)."""


class JobRunner:
    """`threads` threads taking jobs from `journal` until `stop()`."""

    def __init__(
        self,
        journal: Journal,
        execute: Callable[[JobRecord], dict[str, Any]],
        store: Callable[[JobRecord, dict[str, Any]], dict[str, Any] | None],
        report: Callable[[JobRecord, str], None],
        *,
        threads: int,
    ):
        self.journal = journal
        self.execute = execute
        self.store = store
        self.report = report
        self.threads = threads
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        for number in range(self.threads):
            name = f"{socket.gethostname()}:{os.getpid()}:{number}"
            thread = threading.Thread(
                target=self._work, args=(name,), name=f"xmem-label-{name}", daemon=True
            )
            thread.start()
            self._workers.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.journal.submitted.set()  # wakes idle workers
        for thread in self._workers:
            thread.join(timeout)

    def _work(self, worker: str) -> None:
        while not self._stop.is_set():
            try:
                record = self.journal.claim(worker)
                if record is None:
                    self._report_abandoned()
                    self._wait_for_work()
                    continue
                self._run(record, worker)
            except Exception:  # the journal itself failed (disk full, ...): keep the thread
                log.exception("job runner %s", worker)
                self._stop.wait(1.0)

    def _wait_for_work(self) -> None:
        """Until a job is submitted in this process, or for the poll interval (other
        processes' jobs), or until stop()."""
        if self.journal.submitted.wait(IDLE_POLL_SECONDS) and not self._stop.is_set():
            self.journal.submitted.clear()

    def _report_abandoned(self) -> None:
        for record in self.journal.abandoned():
            log.warning("job %s (%s) abandoned: %s", record.id, record.key, record.error)
            if record.deliver == "store":  # else the waiting request has answered already
                self._report(record, record.error or "the job was abandoned")

    def _run(self, record: JobRecord, worker: str) -> None:
        renewing = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(record.id, worker, renewing), daemon=True
        )
        renewer.start()
        try:
            run_job(self.journal, record, worker, self.execute, self.store, self.report)
        finally:
            renewing.set()
            renewer.join()

    def _renew(self, job_id: int, worker: str, done: threading.Event) -> None:
        while not done.wait(self.journal.lease_seconds / 3):
            if not self.journal.renew(job_id, worker):
                return

    def _report(self, record: JobRecord, reason: str) -> None:
        report_safely(self.report, record, reason)


def run_job(
    queue: JobStore,
    record: JobRecord,
    worker: str,
    execute: Callable[[JobRecord], dict[str, Any]],
    store: Callable[[JobRecord, dict[str, Any]], dict[str, Any] | None],
    report: Callable[[JobRecord, str], None],
) -> str:
    """Run one claimed job to its outcome: the one job-execution path of every back-end (the
    journal's threads here, the Redis queue's RQ workers in queues.py).

    Returns "done", "retry" (failed, attempts left: run it again),
    "failed" (final; reported when nobody waits for it) or "lost" (no longer this worker's)."""
    try:
        result = execute(record)
        delivery = queue.complete(record.id, worker, result)
        if delivery == "store":
            queue.mark_stored(record.id, worker, store(record, result))
        return "lost" if delivery == "lost" else "done"
    except XMemLabelError as exc:
        return _fail(queue, record, worker, str(exc), retry=False, report=report)
    except Exception as exc:
        log.warning(
            "job %s (%s) attempt %s failed: %s", record.id, record.key, record.attempts, exc
        )
        return _fail(queue, record, worker, short_reason(exc), retry=True, report=report)


def _fail(
    queue: JobStore,
    record: JobRecord,
    worker: str,
    reason: str,
    *,
    retry: bool,
    report: Callable[[JobRecord, str], None],
) -> str:
    if not queue.fail(record.id, worker, reason, retry=retry):
        return "lost"
    if retry and record.attempts < queue.max_attempts:
        return "retry"
    log.warning("job %s (%s) failed: %s", record.id, record.key, reason)
    if queue.get(record.id).deliver == "store":  # else the waiting request answers with it
        report_safely(report, record, reason)
    return "failed"


def report_safely(report: Callable[[JobRecord, str], None], record: JobRecord, reason: str) -> None:
    """Leave a failed job's reason on its task; when Label Studio cannot be reached, the log
    is all that is left (a failing report must not fail the worker)."""
    try:
        report(record, reason)
    except Exception as exc:
        log.error(
            "job %s: could not report its failure to Label Studio: %s",
            record.id,
            short_reason(exc),
        )


def short_reason(exc: BaseException) -> str:
    """An exception as one line of at most 300 characters, for the journal and the log."""
    return one_line(exc)[:300]
