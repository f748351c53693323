"""Running jobs: `run_job`, the one path every job takes (execute, deliver or store, fail or
retry, report), and `JobRunner`, the threads that claim the embedded journal's jobs and run
them while renewing their lease. The threads run inside each `xmem-label serve` process (the
embedded default, `--job-threads`) and in `xmem-label worker` processes; all share one journal
(journal.py). Past one machine, RQ workers run the same `run_job` (queues.py).

Several jobs run at once while they fit a memory budget (`XMEM_LABEL_JOB_MEMORY`): each job is
submitted with an estimate of its peak memory (`estimate_job_bytes`, from the engine, its
precision, the frame size and the number of objects, calibrated on measured peaks by
`python -m benchmarks.parallel_clips --calibrate`), and the journal admits the oldest waiting
job only while the estimates of the running jobs plus its own stay within the budget (a job
bigger than the whole budget runs alone). Admission is in submission order: a job that does
not fit yet is not overtaken, so none is starved.

Cores: torch's intra-op threads are a setting of the calling thread (OpenMP's), so each job
thread sets its own, once, to cores / job threads (at least 1): jobs running side by side never
ask for more threads than there are cores. The number is fixed by the configuration, not by
how many jobs happen to run: XMem's output differs slightly between thread counts (oneDNN's
reductions: up to 0.007 in probability between 1 and 2 threads on the synthetic weights),
and a job's result must not depend on the load. OpenCV (the flow engine) needs nothing: its
pool runs one parallel region at a time and a region started meanwhile runs in its caller's
thread.

What a job means is the caller's: `execute(record)` computes a result, `store(record, result)`
stores it through Label Studio when no request waits for it, and `report(record, reason)`
leaves a failed job's reason where the annotator sees it. Failures are sorted here:
`XMemLabelError` (bad input, no weights) fails the job at once; anything else (Label Studio
unreachable, a crash) is retried up to the journal's attempt limit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from xmem_label.model import XMemLabelError
from xmem_label.model.errors import one_line

from .journal import JobRecord, Journal
from .settings import machine_cores

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.2


class JobStore(Protocol):
    """The small interface model.py and run_job use, with two implementations:
    journal.Journal (embedded SQLite, one machine, the default) and queues.RedisQueue (RQ on
    Redis, web replicas and workers on any hosts). Job logic lives in run_job, once."""

    max_attempts: int

    def submit(
        self,
        key: str,
        kind: str,
        project: str,
        task_id: int | None,
        payload: dict,
        deliver: str,
        *,
        memory: int = 0,
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


# ----- memory estimate ---------------------------------------------------------------------

MB = 10**6
# A job's frame size when its request does not say (a video task's boxes carry none).
UNKNOWN_SIZE = (1920, 1080)
UNKNOWN_FRAMES = 300
XMEM_SHORT_SIDE = 480  # the engine's default internal size (manifest.yml xmem.size)
# Measured peaks of one job above its process with the engine loaded (benchmarks.parallel_clips
# --calibrate: peak RSS - RSS loaded + what loading left free in the C heap, which a job beside
# another cannot reuse), rounded up. XMem: (fixed, per object at 854x480 internal) by
# precision: its network runs at 480 pixels on the short side whatever the source, so the
# frame size counts there through its aspect ratio. Both engines also hold frames,
# probabilities and masks at the source size (per pixel, and per pixel and object), and the
# prediction's regions (per object and frame, at 854x480).
XMEM_BYTES = {
    "fp32": (900 * MB, 250 * MB),
    "bf16": (150 * MB, 230 * MB),
    "fp16": (150 * MB, 230 * MB),
    "int8": (200 * MB, 230 * MB),
}
FLOW_BYTES = 25 * MB
SOURCE_BYTES_PER_PIXEL = 120
SOURCE_BYTES_PER_OBJECT_PIXEL = 120
REGION_BYTES_PER_OBJECT_FRAME = 100_000
MAX_SIDE = 1 << 16  # larger sides are refused anyway (frame pixel limit)
MAX_ESTIMATE = 1 << 62  # any budget's job-alone size, within SQLite's 64-bit integers


@dataclasses.dataclass(frozen=True)
class JobShape:
    """What a job's memory depends on besides the engine: frame size, objects, frames."""

    width: int
    height: int
    objects: int
    frames: int


def estimate_job_bytes(engine: str, precision: str, shape: JobShape) -> int:
    """A job's peak memory over its process's loaded engine, from measured peaks (see the
    constants above); any engine but XMem is taken to cost what the flow engine costs."""
    pixels = shape.width * shape.height
    objects = max(1, shape.objects)
    if engine == "xmem":
        fixed, per_object = XMEM_BYTES.get(precision, XMEM_BYTES["fp32"])
        short, long = sorted((shape.width, shape.height))
        internal = XMEM_SHORT_SIDE**2 * long / max(1, short)
        network = fixed + per_object * objects * internal / (854 * 480)
    else:
        network = FLOW_BYTES
    source = (SOURCE_BYTES_PER_PIXEL + SOURCE_BYTES_PER_OBJECT_PIXEL * objects) * pixels
    regions = REGION_BYTES_PER_OBJECT_FRAME * objects * shape.frames * pixels / (854 * 480)
    return min(int(network + source + regions), MAX_ESTIMATE)


def job_shape(results: Iterable[Any], frames: int | None) -> JobShape:
    """A job's shape from the regions a person gave (an annotation's or a request's results):
    the frame size their `original_width`/`original_height` say (the frames' size: a keyframe
    of another size is refused), and the objects as the backend numbers them, by label and
    rank on a frame (a track of boxes is one object). Anything unreadable counts as unknown."""
    sizes: set[tuple[int, int]] = set()
    per_frame: dict[tuple[int, str], int] = {}
    for region in results:
        if not isinstance(region, dict) or not str(region.get("type", "")).endswith(
            ("labels", "videorectangle")
        ):
            continue
        width, height = region.get("original_width"), region.get("original_height")
        if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            sizes.add((min(width, MAX_SIDE), min(height, MAX_SIDE)))
        value = region.get("value") if isinstance(region.get("value"), dict) else {}
        label = next(
            (str(v) for k, v in value.items() if k.endswith("labels") and isinstance(v, list)), ""
        )
        frame = region.get("item_index")
        key = (frame if isinstance(frame, int) else 0, label)
        per_frame[key] = per_frame.get(key, 0) + 1
    objects: dict[str, int] = {}
    for (_, label), count in per_frame.items():
        objects[label] = max(objects.get(label, 0), count)
    width, height = max(sizes, key=lambda size: size[0] * size[1], default=UNKNOWN_SIZE)
    return JobShape(
        width, height, min(255, max(1, sum(objects.values()))), frames or UNKNOWN_FRAMES
    )


# ----- running jobs ------------------------------------------------------------------------


class JobRunner:
    """`threads` threads taking jobs from `journal` until `stop()`, running at once as many
    as fit `memory_budget` bytes (by their estimates; see the module's docstring)."""

    def __init__(
        self,
        journal: Journal,
        execute: Callable[[JobRecord], dict[str, Any]],
        store: Callable[[JobRecord, dict[str, Any]], dict[str, Any] | None],
        report: Callable[[JobRecord, str], None],
        *,
        threads: int,
        memory_budget: int | None = None,
        cores: int | None = None,
    ):
        self.journal = journal
        self.execute = execute
        self.store = store
        self.report = report
        self.threads = threads
        self.memory_budget = memory_budget
        self.cores = cores or machine_cores()
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

    @property
    def torch_threads(self) -> int:
        """Each job thread's torch intra-op threads: its share of the cores."""
        return max(1, self.cores // max(1, self.threads))

    def _work(self, worker: str) -> None:
        torch.set_num_threads(self.torch_threads)  # this thread's own (see the docstring)
        while not self._stop.is_set():
            try:
                record = self.journal.claim(worker, memory_budget=self.memory_budget)
                if record is None:
                    self._report_abandoned()
                    self._wait_for_work()
                    continue
                self._run(record, worker)
            except Exception:  # the journal itself failed (disk full, ...): keep the thread
                log.exception("job runner %s", worker)
                self._stop.wait(1.0)

    def _wait_for_work(self) -> None:
        """Until a job is submitted or ends in this process (the oldest waiting job may fit
        the budget now), or for the poll interval (other processes' jobs), or until stop()."""
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
            self.journal.submitted.set()  # wakes idle threads: a job may fit the budget now

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
