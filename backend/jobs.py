"""Running the journal's jobs: threads that claim a job, run it while renewing its lease, and
hand the outcome on. They run inside each `xmem-label serve` process (the embedded default,
`--job-threads`) and in `xmem-label worker` processes; all share one journal (journal.py).

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
from typing import Any

from xmem_label.model import XMemLabelError
from xmem_label.model.errors import one_line

from .journal import JobRecord, Journal

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.2


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
        for thread in self._workers:
            thread.join(timeout)

    def _work(self, worker: str) -> None:
        while not self._stop.is_set():
            try:
                record = self.journal.claim(worker)
                if record is None:
                    self._report_abandoned()
                    self._stop.wait(IDLE_POLL_SECONDS)
                    continue
                self._run(record, worker)
            except Exception:  # the journal itself failed (disk full, ...): keep the thread
                log.exception("job runner %s", worker)
                self._stop.wait(1.0)

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
            result = self.execute(record)
            if self.journal.complete(record.id, worker, result) == "store":
                self.journal.mark_stored(record.id, worker, self.store(record, result))
        except XMemLabelError as exc:
            self._fail(record, worker, str(exc), retry=False)
        except Exception as exc:
            log.warning(
                "job %s (%s) attempt %s failed: %s", record.id, record.key, record.attempts, exc
            )
            self._fail(record, worker, short_reason(exc), retry=True)
        finally:
            renewing.set()
            renewer.join()

    def _renew(self, job_id: int, worker: str, done: threading.Event) -> None:
        while not done.wait(self.journal.lease_seconds / 3):
            if not self.journal.renew(job_id, worker):
                return

    def _fail(self, record: JobRecord, worker: str, reason: str, *, retry: bool) -> None:
        self.journal.fail(record.id, worker, reason, retry=retry)
        final = self.journal.get(record.id)
        if final.state == "failed":
            log.warning("job %s (%s) failed: %s", record.id, record.key, reason)
            if final.deliver == "store":
                self._report(final, reason)

    def _report(self, record: JobRecord, reason: str) -> None:
        try:
            self.report(record, reason)
        except Exception as exc:  # Label Studio unreachable: the log is all that is left
            log.error(
                "job %s: could not report its failure to Label Studio: %s",
                record.id,
                short_reason(exc),
            )


def short_reason(exc: BaseException) -> str:
    """An exception as one line of at most 300 characters, for the journal and the log."""
    return one_line(exc)[:300]
