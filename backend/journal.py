"""A durable job journal on SQLite, so an accepted propagation job survives `kill -9` of the
process that accepted it or of the process running it.

A job is a row, written before the HTTP request that asked for it is acknowledged. Its states:

    queued --claim--> running --complete/mark_stored--> done
                         |  \\--fail------------------> failed
                         |   \\--fail(retry=True)-----> queued   (while attempts < max_attempts)
                         \\--lease expires-----------> claimable again (its worker died)

A running job carries a lease (a deadline) and its worker's name. A live worker renews the
lease; one that was killed cannot, so once the lease has passed any worker may claim the job
again. Every claim counts an attempt: a job whose lease expires after `max_attempts` attempts
is not run again (it would likely kill the next worker too) but becomes failed, and
`abandoned()` hands it out once so that somebody reports it.

A job carries an estimate of its peak memory in bytes (`memory`, jobs.estimate_job_bytes).
`claim` with a memory budget takes the oldest runnable job only while the running jobs'
estimates plus its own stay within the budget, or when nothing runs (a job bigger than the
budget runs alone); otherwise it takes nothing, so younger jobs never overtake it (no
starvation) and several processes on the machine share one budget (the sum is read from the
journal inside the claim's write transaction).

Each job has a unique idempotency key (e.g. the webhook's task, annotation and update time):
a repeated webhook or a retried request finds the existing job instead of making a second one.
Only a failed job is queued again by a new submission with its key.

`deliver` says who takes the result: "reply" while an HTTP request waits for it, "store" once
that request has given up (`hand_over`), and then the worker stores the result through Label
Studio's API itself. Both changes happen in one write transaction, so they never race.

Why SQLite: everything runs on one machine (gunicorn worker processes and `xmem-label worker`
processes), where a file needs no extra server to install, secure and keep running. WAL mode
lets readers (status pages, `wait` polling) go on while one writer commits, and every change of
state is a `BEGIN IMMEDIATE` transaction: it takes the write lock before reading, so two
processes never both see a job as free (`busy_timeout` makes the other one wait its turn).
Connections are opened per call: nothing is shared between threads, and nothing is carried
across gunicorn's fork.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

STATES = ("queued", "running", "done", "failed")
DELIVERIES = ("reply", "store")
ERROR_LENGTH = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    project TEXT NOT NULL,
    task_id INTEGER,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    deliver TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    worker TEXT,
    lease_until REAL,
    unreported INTEGER NOT NULL DEFAULT 0,
    memory INTEGER NOT NULL DEFAULT 0,
    queued REAL NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, queued, id);
CREATE INDEX IF NOT EXISTS jobs_unreported ON jobs (unreported) WHERE unreported = 1;
CREATE TABLE IF NOT EXISTS projects (
    project TEXT PRIMARY KEY,
    registered REAL NOT NULL
);
"""
_SCHEMA_VERSION = 2
# Changes from an older journal file to this version, applied in the creating transaction.
_MIGRATIONS = {1: ("ALTER TABLE jobs ADD COLUMN memory INTEGER NOT NULL DEFAULT 0",)}


class JobNotFound(KeyError):
    """No job has this id (it never existed, or it was pruned)."""


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """One row of the journal, as read at one moment (or one RQ job: then `id` is RQ's job id,
    a string)."""

    id: int | str
    key: str
    kind: str
    project: str
    task_id: int | None
    payload: dict
    state: str
    deliver: str
    attempts: int
    result: dict | None
    error: str | None
    created: float
    updated: float
    worker: str | None = None
    lease_until: float | None = None
    memory: int = 0


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        key=row["key"],
        kind=row["kind"],
        project=row["project"],
        task_id=row["task_id"],
        payload=json.loads(row["payload"]),
        state=row["state"],
        deliver=row["deliver"],
        attempts=row["attempts"],
        result=None if row["result"] is None else json.loads(row["result"]),
        error=row["error"],
        created=row["created"],
        updated=row["updated"],
        worker=row["worker"],
        lease_until=row["lease_until"],
        memory=row["memory"],
    )


def _one_line(error: str) -> str:
    """Errors end up in logs and status pages: one line, bounded."""
    line = " ".join(str(error).split())
    return line if len(line) <= ERROR_LENGTH else line[: ERROR_LENGTH - 3] + "..."


class Journal:
    """Jobs and registered projects in one SQLite file, shared by threads and processes."""

    def __init__(
        self,
        path: str | Path,
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        busy_timeout: float = 30.0,
        keep_seconds: float = 7 * 86400.0,
        keep_rows: int = 10_000,
        prune_every: int = 100,
    ):
        if lease_seconds <= 0 or max_attempts < 1:
            raise ValueError("lease_seconds must be positive and max_attempts at least 1")
        self.path = Path(path)
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = int(max_attempts)
        self.busy_timeout = float(busy_timeout)
        self.keep_seconds = float(keep_seconds)
        self.keep_rows = int(keep_rows)
        self.prune_every = int(prune_every)
        self._submits = 0
        self._submits_lock = threading.Lock()
        # Set on every submit in this process, so this process's runner starts a job at once
        # instead of at its next poll (jobs from other processes wait for the poll).
        self.submitted = threading.Event()
        self._create()

    # -- connections -------------------------------------------------------------------------

    def _create(self) -> None:
        """Create the file readable by its owner only (payloads name tasks and media), then WAL
        mode (a property of the file, kept across restarts) and the tables."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        conn = self._connect()
        try:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise RuntimeError(f"{self.path}: SQLite cannot use WAL mode on this file")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > _SCHEMA_VERSION:
                    raise RuntimeError(
                        f"{self.path}: journal schema {version} is newer than this code's "
                        f"{_SCHEMA_VERSION}"
                    )
                if version:  # a file of an older version: its tables first (0 is a new file)
                    for old in range(version, _SCHEMA_VERSION):
                        for statement in _MIGRATIONS[old]:
                            conn.execute(statement)
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION:d}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves. synchronous=FULL:
        # a committed job also survives a power cut, not only a killed process.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the lock from its first read, so that what it read
        is still true when it writes (no other process can slip in between)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @staticmethod
    def _row(conn: sqlite3.Connection, job_id: int) -> sqlite3.Row | None:
        return conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    # -- jobs --------------------------------------------------------------------------------

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
        """Record a job (`memory`: its estimated peak in bytes); (record, True). If a job with
        this key exists and is queued, running or done, return it unchanged with False
        (idempotent: a repeated webhook or a retried request never makes a second job). A
        failed job with that key is queued again (attempts reset, the new payload, deliver
        and memory) and returned with True."""
        if deliver not in DELIVERIES:
            raise ValueError(f"deliver must be one of {DELIVERIES}, not {deliver!r}")
        memory = max(0, int(memory))
        text = json.dumps(payload)
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE key = ?", (key,)).fetchone()
            if row is not None and row["state"] != "failed":
                return _record(row), False
            if row is None:
                job_id = conn.execute(
                    "INSERT INTO jobs (key, kind, project, task_id, payload, state, deliver,"
                    " memory, queued, created, updated)"
                    " VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                    (key, kind, project, task_id, text, deliver, memory, now, now, now),
                ).lastrowid
            else:
                job_id = row["id"]
                conn.execute(
                    "UPDATE jobs SET kind = ?, project = ?, task_id = ?, payload = ?,"
                    " state = 'queued', deliver = ?, attempts = 0, result = NULL, error = NULL,"
                    " worker = NULL, lease_until = NULL, unreported = 0, memory = ?,"
                    " queued = ?, updated = ? WHERE id = ?",
                    (kind, project, task_id, text, deliver, memory, now, now, job_id),
                )
            record = _record(self._row(conn, job_id))
        self.submitted.set()
        with self._submits_lock:
            self._submits += 1
            due = self.prune_every > 0 and self._submits % self.prune_every == 0
        if due:
            self.prune()
        return record, True

    def _expire(self, conn: sqlite3.Connection, now: float) -> None:
        """Fail the running jobs whose lease has passed and which used up their attempts."""
        conn.execute(
            "UPDATE jobs SET state = 'failed',"
            " error = 'the worker running it stopped ' || attempts || ' times',"
            " lease_until = NULL, unreported = 1, updated = ?"
            " WHERE state = 'running' AND lease_until < ? AND attempts >= ?",
            (now, now, self.max_attempts),
        )

    def claim(self, worker: str, *, memory_budget: int | None = None) -> JobRecord | None:
        """Atomically take the oldest runnable job: queued, or running whose lease has expired
        (its worker died). Sets running, the lease, the worker name and attempts + 1. A job
        whose lease expired after max_attempts attempts is failed instead (see `abandoned`).

        With `memory_budget` (bytes), the oldest runnable job is taken only when nothing runs
        or the memory of the running jobs (live leases) plus its own is within the budget;
        else None, and no younger job is taken in its place."""
        now = time.time()
        with self._write() as conn:
            self._expire(conn, now)
            row = conn.execute(
                "SELECT id, memory FROM jobs WHERE state = 'queued'"
                " OR (state = 'running' AND lease_until < ?) ORDER BY queued, id LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            if memory_budget is not None:
                running, in_use = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(memory), 0) FROM jobs"
                    " WHERE state = 'running' AND lease_until >= ?",
                    (now,),
                ).fetchone()
                if running and in_use + row["memory"] > memory_budget:
                    return None
            conn.execute(
                "UPDATE jobs SET state = 'running', worker = ?, lease_until = ?,"
                " attempts = attempts + 1, updated = ? WHERE id = ?",
                (worker, now + self.lease_seconds, now, row["id"]),
            )
            return _record(self._row(conn, row["id"]))

    def abandoned(self) -> list[JobRecord]:
        """Jobs failed because their workers kept dying, each returned once, so that exactly
        one caller reports it (their requests have long gone)."""
        with self._write() as conn:
            self._expire(conn, time.time())
            rows = conn.execute("SELECT * FROM jobs WHERE unreported = 1 ORDER BY id").fetchall()
            conn.execute("UPDATE jobs SET unreported = 0 WHERE unreported = 1")
        return [_record(row) for row in rows]

    def renew(self, job_id: int, worker: str) -> bool:
        """Extend the lease of a job `worker` runs; False when it is no longer ours (another
        worker took it after our lease passed, or it finished): then drop the work."""
        now = time.time()
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE jobs SET lease_until = ?, updated = ?"
                " WHERE id = ? AND worker = ? AND state = 'running'",
                (now + self.lease_seconds, now, job_id, worker),
            ).rowcount
        return changed == 1

    def hand_over(self, job_id: int) -> bool:
        """The waiting request gives up: deliver becomes "store". False when the job has
        already finished (done or failed): the caller has the outcome and must use it."""
        with self._write() as conn:
            row = self._row(conn, job_id)
            if row is None:
                raise JobNotFound(job_id)
            if row["state"] in ("done", "failed"):
                return False
            conn.execute(
                "UPDATE jobs SET deliver = 'store', updated = ? WHERE id = ?",
                (time.time(), job_id),
            )
        return True

    def complete(self, job_id: int, worker: str, result: dict) -> str:
        """Deliver a result, atomically with respect to `hand_over`. "reply": the job is done
        with `result` for the waiting request. "store": the job stays running (lease renewed);
        the caller stores the result through Label Studio's API, then calls `mark_stored`.
        "lost": the job is no longer this worker's (its lease passed and another worker took
        it, or it finished); the caller drops the result. Only a "reply" is serialised into
        the journal: a stored prediction is megabytes of JSON nobody reads back from here."""
        now = time.time()
        with self._write() as conn:
            row = self._row(conn, job_id)
            if row is None or row["state"] != "running" or row["worker"] != worker:
                return "lost"
            if row["deliver"] == "store":
                conn.execute(
                    "UPDATE jobs SET lease_until = ?, updated = ? WHERE id = ?",
                    (now + self.lease_seconds, now, job_id),
                )
                return "store"
            conn.execute(
                "UPDATE jobs SET state = 'done', result = ?, lease_until = NULL, updated = ?"
                " WHERE id = ?",
                (json.dumps(result), now, job_id),
            )
        return "reply"

    def mark_stored(self, job_id: int, worker: str, result: dict | None = None) -> bool:
        """The worker stored the result in Label Studio: done. `result` stays small (e.g. the
        prediction's id), the real one lives in Label Studio. False if the job was not ours."""
        text = None if result is None else json.dumps(result)
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE jobs SET state = 'done', result = ?, lease_until = NULL, updated = ?"
                " WHERE id = ? AND worker = ? AND state = 'running'",
                (text, time.time(), job_id, worker),
            ).rowcount
        return changed == 1

    def fail(self, job_id: int, worker: str, error: str, *, retry: bool = False) -> bool:
        """With `retry` and attempts left: queued again (at the back), the error kept as the
        latest reason. Otherwise failed with `error`. False if the job was not ours."""
        line = _one_line(error)
        now = time.time()
        with self._write() as conn:
            row = self._row(conn, job_id)
            if row is None or row["state"] != "running" or row["worker"] != worker:
                return False
            if retry and row["attempts"] < self.max_attempts:
                conn.execute(
                    "UPDATE jobs SET state = 'queued', error = ?, worker = NULL,"
                    " lease_until = NULL, queued = ?, updated = ? WHERE id = ?",
                    (line, now, now, job_id),
                )
            else:
                conn.execute(
                    "UPDATE jobs SET state = 'failed', error = ?, lease_until = NULL,"
                    " updated = ? WHERE id = ?",
                    (line, now, job_id),
                )
        return True

    def get(self, job_id: int) -> JobRecord:
        """The job as it is now; JobNotFound (a KeyError) if there is none."""
        with self._read() as conn:
            row = self._row(conn, job_id)
        if row is None:
            raise JobNotFound(job_id)
        return _record(row)

    def wait(self, job_id: int, timeout: float, poll: float = 0.1) -> JobRecord:
        """Poll until the job is done or failed, or `timeout` seconds passed; the latest record.
        Polling, because the job may finish in another process."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.get(job_id)
            remaining = deadline - time.monotonic()
            if record.state in ("done", "failed") or remaining <= 0:
                return record
            time.sleep(min(poll, remaining))

    def latest_result(self) -> dict | None:
        """The result of the job that finished last, in any process (for /metrics)."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT result FROM jobs WHERE state = 'done' AND result IS NOT"
                " NULL ORDER BY updated DESC LIMIT 1"
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def counts(self) -> dict[str, int]:
        """Jobs per state, every state present; nothing else (safe for an unauthenticated
        health page: no payloads, no URLs)."""
        with self._read() as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(STATES, 0)
        counts.update({state: number for state, number in rows})
        return counts

    def requeue_running(self, worker_prefix: str) -> int:
        """A process restarted: the jobs its workers (names starting with `worker_prefix`)
        held are queued again now instead of when their leases pass. Those that used up their
        attempts fail as abandoned ones do. Returns how many were queued again."""
        now = time.time()
        mine = "state = 'running' AND substr(worker, 1, length(?)) = ?"
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'failed',"
                " error = 'the worker running it stopped ' || attempts || ' times',"
                f" lease_until = NULL, unreported = 1, updated = ? WHERE {mine}"
                " AND attempts >= ?",
                (now, worker_prefix, worker_prefix, self.max_attempts),
            )
            return conn.execute(
                "UPDATE jobs SET state = 'queued', worker = NULL, lease_until = NULL,"
                f" updated = ? WHERE {mine}",
                (now, worker_prefix, worker_prefix),
            ).rowcount

    def prune(self) -> int:
        """Forget finished jobs older than keep_seconds, and all but the newest keep_rows of
        them, so the file stays small. Unreported abandoned jobs are kept. Returns how many."""
        now = time.time()
        finished = "state IN ('done', 'failed') AND unreported = 0"
        with self._write() as conn:
            old = conn.execute(
                f"DELETE FROM jobs WHERE {finished} AND updated < ?",
                (now - self.keep_seconds,),
            ).rowcount
            extra = conn.execute(
                f"DELETE FROM jobs WHERE {finished} AND id NOT IN"
                f" (SELECT id FROM jobs WHERE {finished} ORDER BY updated DESC, id DESC LIMIT ?)",
                (self.keep_rows,),
            ).rowcount
        return old + extra

    # -- projects ----------------------------------------------------------------------------

    def register_project(self, project: str) -> None:
        """Remember that `project` called /setup with valid credentials (kept across restarts:
        the webhook handler accepts only registered projects). No credentials are stored."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO projects (project, registered) VALUES (?, ?)"
                " ON CONFLICT (project) DO UPDATE SET registered = excluded.registered",
                (project, time.time()),
            )

    def is_project_registered(self, project: str) -> bool:
        with self._read() as conn:
            row = conn.execute("SELECT 1 FROM projects WHERE project = ?", (project,)).fetchone()
        return row is not None


__all__ = ["DELIVERIES", "STATES", "Journal", "JobNotFound", "JobRecord"]
