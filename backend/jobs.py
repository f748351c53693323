"""A bounded background queue, so propagation never holds an HTTP worker past Label Studio's
timeouts (webhook 1 s, predict 100 s).

A job computes a prediction. Whoever submitted it may wait for the result for a while (batch
`/predict` answers inline when propagation is quick); if it stops waiting, it hands the job a
`store` callback and the worker stores the result through Label Studio's API when done.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every slot of the queue is taken; the caller should retry later (HTTP 503)."""


class Job:
    """One unit of background work and its outcome."""

    def __init__(self, name: str, work: Callable[[], Any]):
        self.name = name
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._store: Callable[[Any], None] | None = None

    def wait(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds; True when the job has finished."""
        return self._done.wait(timeout)

    def hand_over(self, store: Callable[[Any], None]) -> bool:
        """Have the worker call `store(result)` when the job succeeds. False when the job has
        already finished: the caller then has the outcome and must use it itself."""
        with self._lock:
            if self._done.is_set():
                return False
            self._store = store
            return True

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # reported through .error and the log, never lost
            self.error = exc
        with self._lock:
            self._done.set()
            store = self._store
        if self.error is not None:
            if store is not None:
                log.warning("%s failed: %s", self.name, self.error)
            return
        if store is not None:
            store(self.result)


class JobQueue:
    """`workers` threads taking jobs from a queue of at most `capacity` waiting jobs."""

    def __init__(self, workers: int = 1, capacity: int = 16):
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=capacity)
        self.capacity = capacity
        self.counts = collections.Counter()
        self.recent_errors: collections.deque[str] = collections.deque(maxlen=20)
        self.running = 0
        self._lock = threading.Lock()
        for number in range(workers):
            name = f"xmem-label-job-{number}"
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def submit(
        self, name: str, work: Callable[[], Any], store: Callable[[Any], None] | None = None
    ) -> Job:
        """Queue `work`; with `store`, the worker hands it the result (see Job.hand_over)."""
        job = Job(name, work)
        if store is not None:
            job.hand_over(store)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.counts["refused"] += 1
            raise QueueFull(
                f"the backend is busy ({self.capacity} propagations waiting); retry later"
            ) from None
        self.counts["submitted"] += 1
        return job

    def stats(self) -> dict[str, Any]:
        return {
            "waiting": self._queue.qsize(),
            "running": self.running,
            "capacity": self.capacity,
            **self.counts,
            "recent_errors": list(self.recent_errors),
        }

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                self.running += 1
            try:
                job.run()
            except Exception as exc:  # a failing store callback must not kill the worker
                job.error = exc
                log.exception("%s: storing the result failed", job.name)
            finally:
                with self._lock:
                    self.running -= 1
                self.counts["failed" if job.error else "finished"] += 1
                if job.error is not None:
                    self.recent_errors.append(f"{job.name}: {job.error}")
