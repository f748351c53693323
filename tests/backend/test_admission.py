"""Several jobs at once within a memory budget (backend/jobs.py, backend/journal.py): admission
in submission order on real SQLite files, the runner's threads with fake jobs, the estimate,
the budget setting, and two /predict jobs through the HTTP app with the flow engine."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import torch

from xmem_label.backend.app import create_app
from xmem_label.backend.jobs import JobRunner, JobShape, estimate_job_bytes, job_shape
from xmem_label.backend.journal import Journal
from xmem_label.backend.model import Runtime
from xmem_label.backend.settings import BackendSettings, job_memory
from xmem_label.model import InputError

from .test_app import config, keyframe_task, make_settings

MB = 10**6


def submit(journal: Journal, key: str, memory: int):
    return journal.submit(key, "predict", "7", 5, {"key": key}, "reply", memory=memory)[0]


def test_jobs_are_admitted_in_order_while_they_fit(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    first, second, small = (submit(journal, k, m) for k, m in (("a", 600), ("b", 600), ("c", 1)))
    assert journal.claim("w1", memory_budget=1000).id == first.id
    # the second does not fit beside the first, and the small one behind it does not overtake
    assert journal.claim("w2", memory_budget=1000) is None
    assert journal.complete(first.id, "w1", {}) == "reply"
    assert journal.claim("w2", memory_budget=1000).id == second.id
    assert journal.claim("w3", memory_budget=1000).id == small.id  # 601 <= 1000


def test_a_job_over_the_whole_budget_runs_alone(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    small, big, after = (submit(journal, k, m) for k, m in (("a", 10), ("b", 5000), ("c", 10)))
    assert journal.claim("w1", memory_budget=1000).id == small.id
    assert journal.claim("w2", memory_budget=1000) is None  # not beside another job
    journal.complete(small.id, "w1", {})
    assert journal.claim("w2", memory_budget=1000).id == big.id  # nothing runs: it does
    assert journal.claim("w1", memory_budget=1000) is None  # and nothing beside it
    journal.complete(big.id, "w2", {})
    assert journal.claim("w1", memory_budget=1000).id == after.id


def test_a_dead_workers_job_holds_no_memory_and_runs_again(tmp_path):
    """Nothing is lost: a job whose worker died (lease passed) no longer counts as running,
    and it is the oldest runnable job, so it is claimed again first."""
    journal = Journal(tmp_path / "jobs.db", lease_seconds=0.2)
    crashed, waiting = submit(journal, "a", 800), submit(journal, "b", 800)
    assert journal.claim("dead", memory_budget=1000).id == crashed.id
    assert journal.claim("w2", memory_budget=1000) is None
    time.sleep(0.3)
    again = journal.claim("w2", memory_budget=1000)
    assert (again.id, again.attempts) == (crashed.id, 2)
    assert journal.claim("w3", memory_budget=1000) is None
    journal.complete(crashed.id, "w2", {})
    assert journal.claim("w3", memory_budget=1000).id == waiting.id


def test_without_a_budget_every_job_is_claimable(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    ids = {submit(journal, key, 10**12).id for key in "abc"}
    assert {journal.claim(f"w{n}").id for n in range(3)} == ids


def test_a_version_1_journal_is_migrated_with_its_jobs(tmp_path):
    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE,"
        " kind TEXT NOT NULL, project TEXT NOT NULL, task_id INTEGER, payload TEXT NOT NULL,"
        " state TEXT NOT NULL, deliver TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " result TEXT, error TEXT, worker TEXT, lease_until REAL,"
        " unreported INTEGER NOT NULL DEFAULT 0, queued REAL NOT NULL, created REAL NOT NULL,"
        " updated REAL NOT NULL);"
        "INSERT INTO jobs (key, kind, project, payload, state, deliver, queued, created,"
        " updated) VALUES ('old', 'predict', '7', '{}', 'queued', 'reply', 1, 1, 1);"
        "PRAGMA user_version = 1;"
    )
    conn.close()
    journal = Journal(path)
    record = journal.claim("w", memory_budget=1)
    assert (record.key, record.memory) == ("old", 0)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2


class FakeJobs:
    """execute() that holds each job `seconds` and records what ran at once, and the torch
    threads each job's thread had."""

    def __init__(self, journal: Journal, seconds: float):
        self.journal = journal
        self.seconds = seconds
        self.overtaken: list[str] = []  # jobs still queued when a younger one started
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.started: list[str] = []
        self.peak = 0
        self.together: list[set[str]] = []
        self.threads: dict[str, int] = {}
        self.done = threading.Semaphore(0)

    def execute(self, record) -> dict:
        with self.lock:
            self.running[record.key] = record.memory
            self.started.append(record.key)
            self.peak = max(self.peak, sum(self.running.values()))
            self.together.append(set(self.running))
        self.overtaken += [
            f"job-{older - 1}"
            for older in range(1, int(record.id))
            if self.journal.get(older).state == "queued"
        ]
        self.threads[record.key] = torch.get_num_threads()
        time.sleep(self.seconds)
        with self.lock:
            del self.running[record.key]
        self.done.release()
        return {"prediction": {}, "timings": {}}


def run_fake(
    tmp_path, memories: list[int], budget: int, seconds: float = 0.3, threads: int = 3
) -> FakeJobs:
    journal = Journal(tmp_path / "jobs.db")
    jobs = FakeJobs(journal, seconds)
    runner = JobRunner(
        journal,
        jobs.execute,
        lambda r, x: x,
        lambda r, x: None,
        threads=threads,
        memory_budget=budget,
        cores=2,
    )
    for number, memory in enumerate(memories):
        submit(journal, f"job-{number}", memory)
    runner.start()
    try:
        for _ in memories:
            assert jobs.done.acquire(timeout=30)
    finally:
        runner.stop()
    assert journal.counts()["done"] == len(memories)
    return jobs


def test_the_runner_keeps_running_jobs_within_the_budget_in_order(tmp_path):
    memories = [400, 400, 900, 100, 100, 300]
    jobs = run_fake(tmp_path, memories, budget=1000)
    assert jobs.overtaken == []  # in submission order
    assert sorted(jobs.started) == [f"job-{n}" for n in range(len(memories))]
    assert jobs.peak <= 1000
    assert {"job-0", "job-1"} in jobs.together  # the first two ran side by side


def test_the_runner_runs_a_job_over_the_budget_alone(tmp_path):
    jobs = run_fake(tmp_path, [100, 5000, 100], budget=1000)
    assert jobs.peak == 5000  # alone: never 5100


def test_job_threads_share_the_cores_whatever_runs(tmp_path):
    """2 cores: with 2 job threads every job runs on one torch thread, alone or not (a job's
    result must not depend on the load); with 1 job thread, on both."""
    two = run_fake(tmp_path / "two", [1, 1, 10**6], budget=1000, seconds=0.1, threads=2)
    assert two.threads == {"job-0": 1, "job-1": 1, "job-2": 1}
    one = run_fake(tmp_path / "one", [1], budget=1000, seconds=0.1, threads=1)
    assert one.threads == {"job-0": 2}


def brush(frame: int, label: str, width: int = 854, height: int = 480) -> dict:
    return {
        "type": "brushlabels",
        "item_index": frame,
        "original_width": width,
        "original_height": height,
        "value": {"format": "rle", "rle": [0], "brushlabels": [label]},
    }


def test_job_shape_counts_objects_by_label_and_rank():
    regions = [
        brush(0, "Chair"),
        brush(0, "Chair"),  # a second chair on frame 0
        brush(9, "Chair"),  # a chair again on a later keyframe: not a third object
        brush(9, "Person"),
        {"type": "textarea", "value": {"text": ["note"]}},
        "not a region",
    ]
    assert job_shape(regions, 40) == JobShape(854, 480, 3, 40)
    tracks = [
        {"type": "videorectangle", "value": {"labels": ["Car"], "sequence": []}},
        {"type": "videorectangle", "value": {"labels": ["Car"], "sequence": []}},
    ]
    assert job_shape(tracks, None) == JobShape(1920, 1080, 2, 300)  # size unknown: assumed


def test_a_hostile_size_gives_a_bounded_estimate(tmp_path):
    huge = dict(brush(0, "Chair"), original_width=10**30, original_height=10**30)
    shape = job_shape([huge], 10**7)
    estimate = estimate_job_bytes("xmem", "fp32", shape)
    assert estimate <= 1 << 62
    journal = Journal(tmp_path / "jobs.db")
    assert submit(journal, "huge", estimate).memory == estimate  # fits SQLite's integers


def test_the_estimate_grows_with_what_a_job_holds():
    base = JobShape(854, 480, 1, 50)
    for engine, precision in (("flow", "fp32"), ("xmem", "fp32"), ("xmem", "int8")):
        one = estimate_job_bytes(engine, precision, base)
        assert one > 0
        assert estimate_job_bytes(engine, precision, JobShape(854, 480, 3, 50)) > one
        assert estimate_job_bytes(engine, precision, JobShape(1920, 1080, 1, 50)) > one
    exact = estimate_job_bytes("xmem", "fp32", base)
    assert exact > estimate_job_bytes("xmem", "int8", base) > estimate_job_bytes("flow", "", base)
    # XMem's network runs at 480 pixels on the short side: a wider frame costs more there
    assert estimate_job_bytes("xmem", "fp32", JobShape(1920, 480, 1, 50)) > exact


def test_the_budget_setting(monkeypatch):
    monkeypatch.setattr("xmem_label.backend.settings.available_memory", lambda: 8000 * MB)
    assert job_memory("4096") == 4096 * MB
    assert job_memory(" 50% ") == 4000 * MB
    for bad in ("", "lots", "0", "-5", "150%", "nan"):
        with pytest.raises(InputError, match="XMEM_LABEL_JOB_MEMORY"):
            job_memory(bad)
    settings = BackendSettings.from_environment({"XMEM_LABEL_JOB_MEMORY": "1500"})
    assert settings.job_memory_bytes == 1500 * MB
    default = BackendSettings.from_environment({})  # manifest.yml's 75 %
    assert default.job_memory_bytes == 6000 * MB


def test_job_threads_default_by_engine(monkeypatch):
    monkeypatch.setattr("xmem_label.backend.settings.machine_cores", lambda: 8)
    assert BackendSettings.from_environment({"XMEM_LABEL_ENGINE": "xmem"}).job_threads == 1
    assert BackendSettings.from_environment({"XMEM_LABEL_ENGINE": "flow"}).job_threads == 8
    explicit = {"XMEM_LABEL_ENGINE": "xmem", "XMEM_LABEL_JOB_THREADS": "3"}
    assert BackendSettings.from_environment(explicit).job_threads == 3


@pytest.mark.parametrize("budget, overlap", [(10**12, True), (1, False)])
def test_two_predict_jobs_run_at_once_when_they_fit(tmp_path, budget, overlap):
    """Two tasks in one /predict through the HTTP app (flow engine, frames from disk): side
    by side under a large budget, one after the other under a tiny one; both predicted."""
    runtime = Runtime(make_settings(tmp_path, job_threads=2, job_memory_bytes=budget))
    spans: dict[str, tuple[float, float]] = {}
    execute = runtime.runner.execute

    def timed(record):
        started = time.monotonic()
        time.sleep(0.5)  # long enough that jobs admitted together overlap
        result = execute(record)
        spans[record.key] = (started, time.monotonic())
        return result

    runtime.runner.execute = timed
    runtime.start()
    try:
        client = create_app(runtime).test_client()
        client.post("/setup", json={"project": "1.0", "schema": config("mask", "Chair")})
        tasks = [keyframe_task(task_id, "mask", "Chair") for task_id in (11, 12)]
        reply = client.post(
            "/predict",
            json={"tasks": tasks, "project": "1.0", "label_config": config("mask", "Chair")},
        )
    finally:
        runtime.runner.stop()
    assert reply.status_code == 200, reply.json
    assert [len(result["result"]) for result in reply.json["results"]] == [8, 8]
    (a_start, a_end), (b_start, b_end) = sorted(spans.values())
    assert (b_start < a_end) is overlap
    expected = estimate_job_bytes("flow", "fp32", JobShape(240, 160, 1, 8))
    memories = {runtime.journal.get(n).memory for n in (1, 2)}
    assert memories == {expected}
