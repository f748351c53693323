"""Jobs past one machine: the journal's jobs (journal.py) on RQ and Redis, so that web replicas on
any host enqueue and `xmem-label worker` processes on any host run them.

Why RQ: it is what Label Studio itself uses for its own background jobs (an admin running Label
Studio at scale already runs Redis and knows it), it is small, and it has what a job that must
not be lost needs: a job enters the `StartedJobRegistry` when a worker takes it, `Retry`
re-runs a failed one, and `StartedJobRegistry.cleanup()` re-queues (while retries are left) or
fails an *abandoned* one, whose worker died. huey acknowledges a job when it is taken (a killed
worker loses it), Dramatiq's Redis broker re-queues a dead worker's messages only on its
heartbeat sweep, Celery would bring its own broker/result-backend configuration for what is
one queue here.

What this module adds to RQ, and only this:
- a short lease: RQ's forking worker renews a running job's registry entry every
  `job_monitoring_interval`, but for `interval + 60` s, so a killed worker's job waits a
  minute at least. `LeasedWorker` (RQ's SimpleWorker: the engine is loaded once per process and
  jobs run in it; forking per job is no option here: measured, a child forked from a process
  that had run one torch op on CPU hangs in its first op, libgomp's pool does not survive
  fork) renews it every lease/3
  from a thread, for `XMEM_LABEL_JOB_LEASE` seconds, and every worker calls RQ's registry
  cleanup every lease/2 (one at a time, under RQ's maintenance key): a killed worker's job runs
  again on another worker about one lease after the kill;
- idempotency: the journal's keys (a repeated webhook, a retried request) map to one RQ job id
  through a Redis WATCH/MULTI transaction, so two web replicas submitting the same key make one
  job; a failed key is submitted again as a new job;
- delivery: "reply" while a `/predict` request waits for the result, "store" once it gave up
  (`hand_over`), decided by one `HSETNX` so the worker and the request never both (or neither)
  deliver it. The job's state is RQ's status plus this small hash (result, error, delivery).

Jobs are serialized as JSON, not pickle (no code runs when a job is read), and a worker runs
only jobs that call `run_queued_job` (RQ imports whatever function a job names: anything else
is failed unrun). Still, whoever can write to Redis can queue work with the backend's Label
Studio token: keep Redis private to the backend's hosts, with a password
(`redis://:<password>@host:6379/0`). Every call has connect and read timeouts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

from redis import Redis
from redis.exceptions import WatchError
from rq import Callback, Queue, Retry, SimpleWorker, get_current_job
from rq.exceptions import AbandonedJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.worker import WorkerStatus

from .jobs import report_safely, run_job
from .journal import DELIVERIES, JobNotFound, JobRecord, _one_line

log = logging.getLogger(__name__)

QUEUE_NAME = "xmem-label"
PREFIX = "xmem-label:"
RUN_JOB = "xmem_label.backend.queues.run_queued_job"
ON_FAILURE = "xmem_label.backend.queues.on_job_failure"
# No deadline of RQ's own: downloads have their timeouts, and a long clip on CPU may take hours.
JOB_TIMEOUT_SECONDS = 24 * 3600
_FAILED = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)

# The worker process's Runtime (model.Runtime), set by run_worker: RQ calls run_queued_job by
# name, in the worker, and the job needs the engine and Label Studio client loaded there.
_runtime: Any = None


class JobFailed(Exception):
    """Raised from a job to hand its failure to RQ (retry, or the FailedJobRegistry)."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class RedisQueue:
    """The journal's interface (submit, wait, hand_over, get, counts, ...; and complete,
    mark_stored, fail for `jobs.run_job`) on an RQ queue in Redis. Finished jobs, their
    payloads and idempotency keys are kept `keep_seconds` (a day: Redis holds them in memory,
    where the journal keeps a week on disk)."""

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        keep_seconds: float = 86400.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ):
        if lease_seconds <= 0 or max_attempts < 1:
            raise ValueError("lease_seconds must be positive and max_attempts at least 1")
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = int(max_attempts)
        self.keep_seconds = int(keep_seconds)
        self.redis = Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=read_timeout,
            health_check_interval=30,
        )
        self.queue = Queue(QUEUE_NAME, connection=self.redis, serializer=JSONSerializer)

    # -- keys --------------------------------------------------------------------------------

    @staticmethod
    def _state_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def _idempotency_key(key: str) -> str:
        return f"{PREFIX}key:{_digest(key)}"

    # -- submitting and waiting (web processes) ------------------------------------------------

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
    ) -> tuple[JobRecord, bool]:
        """Enqueue a job; (record, True). If a job with this key exists and is not failed,
        return it with False: two replicas submitting one key at once make one job (the
        mapping key is WATCHed, and the mapping and the RQ job are written in one MULTI).
        `memory` (the job's estimate) is not used: an RQ worker runs one job at a time, so
        the jobs at once on a host are its worker processes."""
        if deliver not in DELIVERIES:
            raise ValueError(f"deliver must be one of {DELIVERIES}, not {deliver!r}")
        mapping = self._idempotency_key(key)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(mapping)
                    existing = _text(pipe.get(mapping))
                    if existing is not None:
                        try:
                            record = self.get(existing)
                        except JobNotFound:  # expired, or the enqueue never committed
                            record = None
                        if record is not None and record.state != "failed":
                            return record, False
                    job_id = f"xl-{uuid.uuid4().hex}"
                    pipe.multi()
                    pipe.set(mapping, job_id, ex=self.keep_seconds)
                    state = self._state_key(job_id)
                    pipe.hset(state, mapping={"key": key, "initial": deliver})
                    if deliver == "store":
                        pipe.hset(state, "deliver", "store")
                    pipe.expire(state, self.keep_seconds)
                    self.queue.enqueue_call(
                        RUN_JOB,
                        kwargs={
                            "key": key,
                            "kind": kind,
                            "project": project,
                            "task_id": task_id,
                            "payload": payload,
                        },
                        job_id=job_id,
                        timeout=JOB_TIMEOUT_SECONDS,
                        result_ttl=self.keep_seconds,
                        failure_ttl=self.keep_seconds,
                        retry=Retry(max=self.max_attempts - 1) if self.max_attempts > 1 else None,
                        on_failure=Callback(ON_FAILURE),
                        description=f"xmem-label {kind} job for task {task_id}",  # no URLs
                        pipeline=pipe,
                    )
                    pipe.execute()
                    break
                except WatchError:  # another replica wrote this key meanwhile: look again
                    continue
        return self.get(job_id), True

    def get(self, job_id: str) -> JobRecord:
        """The job as it is now; JobNotFound (a KeyError) if there is none."""
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            raise JobNotFound(job_id) from None
        return self._record(job)

    def _record(self, job: Job) -> JobRecord:
        state = {_text(k): _text(v) for k, v in self.redis.hgetall(self._state_key(job.id)).items()}
        status = job.get_status(refresh=False)
        result = json.loads(state["result"]) if state.get("result") else None
        if status == JobStatus.FINISHED:
            name = "done"
        elif status in _FAILED:
            name = "failed"
        elif state.get("deliver") == "reply" and result is not None:
            name = "done"  # the result is the waiting request's; RQ is finishing the job
        elif status == JobStatus.STARTED:
            name = "running"
        else:
            name = "queued"
        kwargs = job.kwargs
        created = job.created_at.timestamp() if job.created_at else time.time()
        ended = job.ended_at or job.started_at
        return JobRecord(
            id=job.id,
            key=kwargs["key"],
            kind=kwargs["kind"],
            project=kwargs["project"],
            task_id=kwargs["task_id"],
            payload=kwargs["payload"],
            state=name,
            deliver=state.get("deliver") or "reply",
            attempts=int(state.get("runs") or 0),
            result=result,
            error=state.get("error"),
            created=created,
            updated=ended.timestamp() if ended else created,
            worker=job.worker_name,
        )

    def wait(self, job_id: str, timeout: float, poll: float = 0.1) -> JobRecord:
        """Poll until the job is done or failed, or `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.get(job_id)
            remaining = deadline - time.monotonic()
            if record.state in ("done", "failed") or remaining <= 0:
                return record
            time.sleep(min(poll, remaining))

    def hand_over(self, job_id: str) -> bool:
        """The waiting request gives up: the worker stores the result through the API. False
        when the worker has already claimed the reply: the result is in the record."""
        record = self.get(job_id)
        if record.state in ("done", "failed"):
            return False
        state = self._state_key(job_id)
        with self.redis.pipeline() as pipe:
            pipe.hsetnx(state, "deliver", "store")
            pipe.hget(state, "deliver")
            pipe.expire(state, self.keep_seconds)
            _, deliver, _ = pipe.execute()
        return _text(deliver) == "store"

    # -- outcomes (the worker running the job, through jobs.run_job) -------------------------

    def _ours(self, job_id: str, worker: str) -> bool:
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return False
        return job.get_status(refresh=False) == JobStatus.STARTED and job.worker_name == worker

    def complete(self, job_id: str, worker: str, result: dict) -> str:
        """ "reply" (the waiting request takes `result`), "store" (nobody waits: store it
        through the API, then `mark_stored`) or "lost" (no longer this worker's job)."""
        if not self._ours(job_id, worker):
            return "lost"
        text = json.dumps(result)
        state = self._state_key(job_id)
        with self.redis.pipeline() as pipe:  # MULTI: the result is there when "reply" is
            pipe.hset(state, "result", text)
            pipe.hsetnx(state, "deliver", "reply")
            pipe.hget(state, "deliver")
            pipe.expire(state, self.keep_seconds)
            pipe.set(f"{PREFIX}latest", text, ex=self.keep_seconds)
            _, _, deliver, _, _ = pipe.execute()
        return _text(deliver) or "reply"

    def mark_stored(self, job_id: str, worker: str, result: dict | None = None) -> bool:
        """The result is stored in Label Studio; keep the small `result` (prediction id)."""
        if not self._ours(job_id, worker):
            return False
        text = json.dumps(result)
        with self.redis.pipeline() as pipe:
            pipe.hset(self._state_key(job_id), "result", text)
            pipe.set(f"{PREFIX}latest", text, ex=self.keep_seconds)
            pipe.execute()
        return True

    def fail(self, job_id: str, worker: str, error: str, *, retry: bool = False) -> bool:
        """Keep the reason; run_queued_job then raises, and RQ retries (attempts left) or
        fails the job. False if the job is not this worker's."""
        if not self._ours(job_id, worker):
            return False
        self.redis.hset(self._state_key(job_id), "error", _one_line(error))
        return True

    # -- status --------------------------------------------------------------------------------

    def latest_result(self) -> dict | None:
        """The result of the job that finished last, on any host (for /metrics)."""
        text = self.redis.get(f"{PREFIX}latest")
        return None if text is None else json.loads(text)

    def counts(self) -> dict[str, int]:
        """Jobs per state (queued, running, done, failed); nothing else. Done and failed
        count the jobs RQ still keeps (keep_seconds)."""
        options = {"queue": self.queue, "serializer": JSONSerializer}
        return {
            "queued": self.queue.count,
            "running": StartedJobRegistry(**options).get_job_count(cleanup=False),
            "done": FinishedJobRegistry(**options).get_job_count(cleanup=False),
            "failed": FailedJobRegistry(**options).get_job_count(cleanup=False),
        }

    # -- projects ----------------------------------------------------------------------------

    def register_project(self, project: str) -> None:
        """Remember that `project` called /setup with valid credentials, for every replica."""
        self.redis.set(f"{PREFIX}project:{project}", str(time.time()))

    def is_project_registered(self, project: str) -> bool:
        return bool(self.redis.exists(f"{PREFIX}project:{project}"))

    # -- abandoned jobs --------------------------------------------------------------------------

    def cleanup_abandoned(self) -> None:
        """RQ's StartedJobRegistry.cleanup: jobs whose lease passed (their worker died) are
        queued again while retries are left, else failed (on_job_failure reports them). One
        caller at a time, under RQ's maintenance key, held for one lease at most (a worker
        killed while holding it delays the next sweep by that much only)."""
        hold = max(1, math.ceil(self.lease_seconds))
        if not self.redis.set(self.queue.registry_cleaning_key, 1, nx=True, ex=hold):
            return
        try:
            StartedJobRegistry(
                queue=self.queue, serializer=JSONSerializer, death_penalty_class=TimerDeathPenalty
            ).cleanup()
        finally:
            self.queue.release_maintenance_lock()


class LeasedWorker(SimpleWorker):
    """RQ's SimpleWorker whose running job's registry entry lives `lease_seconds` and is renewed
    every lease/3 by a thread (RQ's own `maintain_heartbeats`), instead of job timeout + 60 s
    without renewal: a dead worker's job is found one lease after its death."""

    lease_seconds: float = 30.0

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return max(1, math.ceil(self.lease_seconds))

    def execute_job(self, job: Job, queue: Queue) -> None:
        if not is_ours(job):
            self._refuse(job, queue)
            return
        execution = self.prepare_execution(job)
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease_seconds / 3):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception as exc:  # Redis briefly away: try again next time
                    log.warning("job %s: lease not renewed: %s", job.id, exc)

        renewer = threading.Thread(target=renew, name="xmem-label-lease", daemon=True)
        renewer.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            renewer.join()
        self.set_state(WorkerStatus.IDLE)

    def _refuse(self, job: Job, queue: Queue) -> None:
        log.error("refused job %s: it names %r, not %s", job.id, job.func_name[:100], RUN_JOB)
        job.retries_left = 0
        job._failure_callback_name = None  # run nothing it names
        execution = self.prepare_execution(job)
        self.handle_job_failure(
            job, queue, exc_string="refused: not an xmem-label job", execution=execution
        )
        self.set_state(WorkerStatus.IDLE)


def is_ours(job: Job) -> bool:
    """RQ stores the name of the function a job calls, and the worker imports whatever it
    names: a job that names anything but run_queued_job (and its failure callback) was not
    enqueued by the backend, and is failed without running it."""
    return (
        job.func_name == RUN_JOB
        and getattr(job, "_failure_callback_name", None) in (None, ON_FAILURE)
        and getattr(job, "_success_callback_name", None) is None
        and getattr(job, "_stopped_callback_name", None) is None
    )


def run_queued_job(
    key: str, kind: str, project: str, task_id: int | None, payload: dict
) -> dict[str, str]:
    """What RQ runs: the same `jobs.run_job` as the journal's threads. A failure is raised to
    RQ so that it retries the job (attempts left) or keeps it in its FailedJobRegistry."""
    job = get_current_job()
    if job is None or _runtime is None:
        raise RuntimeError("run_queued_job runs inside `xmem-label worker` only")
    queue: RedisQueue = _runtime.journal
    queue.redis.hincrby(RedisQueue._state_key(job.id), "runs", 1)  # killed runs count too
    record = queue.get(job.id)
    outcome = run_job(
        queue, record, job.worker_name, _runtime.execute, _runtime.store, _runtime.report
    )
    if outcome in ("retry", "failed"):
        if outcome == "failed":
            job.retries_left = 0  # final (bad input, or out of attempts): RQ must not retry
        raise JobFailed(queue.get(job.id).error or "the job failed")
    return {"outcome": outcome}


def on_job_failure(job: Job, connection: Redis, kind: type, value: Any, traceback: Any) -> None:
    """RQ's failure callback. For a job abandoned by its workers (killed) with no retries left,
    leave the reason where the annotator sees it; other failures were reported by run_job."""
    if kind is not AbandonedJobError or (job.retries_left or 0) > 0:
        return
    attempts = _runtime.journal.max_attempts if _runtime is not None else "several"
    reason = f"the worker running it stopped {attempts} times"
    connection.hset(RedisQueue._state_key(job.id), "error", reason)
    log.warning("job %s abandoned: %s", job.id, reason)
    if _runtime is None:
        return
    record = _runtime.journal.get(job.id)
    if record.deliver == "store":  # else the waiting request has answered already
        report_safely(_runtime.report, record, reason)


def run_worker(runtime: Any) -> None:
    """Run jobs from the Redis queue in this process until SIGTERM / SIGINT (RQ's warm
    shutdown: the running job finishes first). `runtime` is a started model.Runtime."""
    global _runtime
    _runtime = runtime
    queue: RedisQueue = runtime.journal
    stopping = threading.Event()

    def sweep() -> None:
        while not stopping.wait(queue.lease_seconds / 2):
            try:
                queue.cleanup_abandoned()
            except Exception as exc:
                log.warning("abandoned-job sweep failed: %s", exc)

    sweeper = threading.Thread(target=sweep, name="xmem-label-sweep", daemon=True)
    sweeper.start()
    worker = LeasedWorker(
        [queue.queue],
        connection=queue.redis,
        serializer=JSONSerializer,
        name=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
        # Redis read timeout of the worker's connection: RQ sets it to its blocking wait
        # (worker_ttl - 15 s) + 10 s; 60 keeps every call under a minute.
        worker_ttl=60,
    )
    worker.lease_seconds = queue.lease_seconds
    try:
        worker.work(logging_level="INFO")
    finally:
        stopping.set()
        sweeper.join(5)


__all__ = ["LeasedWorker", "RedisQueue", "run_queued_job", "run_worker", "on_job_failure"]
