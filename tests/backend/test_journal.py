"""The durable job journal (backend/journal.py) on real SQLite files, with real threads, real
processes and a real `kill -9`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from xmem_label.backend.journal import JobNotFound, Journal


def submit(journal: Journal, key: str, deliver: str = "reply", **payload):
    return journal.submit(key, "predict", "7", 5, {"key": key, **payload}, deliver)


def fill(journal: Journal, count: int) -> list[int]:
    return [submit(journal, f"job-{number}")[0].id for number in range(count)]


# Run in another interpreter: claims jobs from the journal given as argv[1].
CLAIMER = """
import json, sys, time
from pathlib import Path
from xmem_label.backend.journal import Journal
journal = Journal(sys.argv[1], lease_seconds=float(sys.argv[3]))
mode = sys.argv[2]
if mode == "drain":
    ready = Path(sys.argv[4])  # a barrier: start claiming once both processes are ready
    (ready / sys.argv[5]).touch()
    while len(list(ready.iterdir())) < 2:
        time.sleep(0.01)
    ids = []
    while (job := journal.claim("proc-" + sys.argv[5])) is not None:
        ids.append(job.id)
        time.sleep(0.002)  # hold each job a moment, as a worker does: the claimers overlap
    print(json.dumps(ids), flush=True)
else:
    job = journal.claim("victim")
    print(json.dumps([job.id, job.attempts]), flush=True)
    time.sleep(600)
"""


def claimer(path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CLAIMER, str(path), *args], stdout=subprocess.PIPE, text=True
    )


def test_submit_is_idempotent_by_key(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    first, created = submit(journal, "webhook:task=5:annotation=9")
    assert created and first.state == "queued" and first.attempts == 0
    assert first.payload == {"key": "webhook:task=5:annotation=9"}
    again, created = journal.submit("webhook:task=5:annotation=9", "webhook", "8", 6, {}, "store")
    assert not created and again == first

    job = journal.claim("w")
    assert submit(journal, first.key) == (journal.get(job.id), False)
    assert journal.complete(job.id, "w", {"masks": 1}) == "reply"
    repeated, created = submit(journal, first.key)
    assert not created and repeated.state == "done" and repeated.result == {"masks": 1}
    assert journal.counts()["queued"] == 0


def test_failed_key_is_queued_again(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    record, _ = submit(journal, "k")
    journal.claim("w")
    journal.fail(record.id, "w", "out of\nmemory")
    failed = journal.get(record.id)
    assert failed.state == "failed" and failed.error == "out of memory" and failed.attempts == 1

    again, created = submit(journal, "k", deliver="store", fresh=True)
    assert created and again.id == record.id
    assert again.state == "queued" and again.attempts == 0 and again.error is None
    assert again.deliver == "store" and again.payload == {"key": "k", "fresh": True}


def test_claim_takes_the_oldest_and_counts_attempts(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    assert journal.claim("w") is None
    ids = fill(journal, 3)
    first = journal.claim("w")
    assert (first.id, first.state, first.worker, first.attempts) == (ids[0], "running", "w", 1)
    assert first.lease_until == pytest.approx(time.time() + 30, abs=5)
    assert [journal.claim("w").id for _ in range(2)] == ids[1:]
    assert journal.claim("w") is None


def test_threads_never_claim_the_same_job(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    ids = fill(journal, 200)
    claimed: list[list[int]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def drain(number: int) -> None:
        start.wait()
        while (job := journal.claim(f"thread-{number}")) is not None:
            claimed[number].append(job.id)
            time.sleep(0.001)  # hold each job a moment, as a worker does: the threads overlap

    threads = [threading.Thread(target=drain, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = [job_id for ids_ in claimed for job_id in ids_]
    assert sorted(together) == ids
    assert sum(1 for ids_ in claimed if ids_) >= 2  # they really competed
    assert journal.counts() == {"queued": 0, "running": 200, "done": 0, "failed": 0}


def test_processes_never_claim_the_same_job(tmp_path):
    path = tmp_path / "jobs.db"
    ids = fill(Journal(path), 200)
    ready = tmp_path / "ready"
    ready.mkdir()
    processes = [claimer(path, "drain", "30", str(ready), str(number)) for number in range(2)]
    claimed = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        claimed.append(json.loads(out))
    assert sorted(claimed[0] + claimed[1]) == ids
    assert all(claimed), "one process took every job: they did not run concurrently"
    running = Journal(path).get(ids[0])
    assert running.state == "running" and running.attempts == 1


def wait_for_claim(journal: Journal, worker: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while (job := journal.claim(worker)) is None:
        assert time.monotonic() < deadline, "the expired lease never freed the job"
        time.sleep(0.05)
    return job


def test_a_killed_workers_job_is_run_again_then_abandoned(tmp_path):
    path = tmp_path / "jobs.db"
    journal = Journal(path, lease_seconds=0.5, max_attempts=3)
    record, _ = submit(journal, "k")
    victim = claimer(path, "hold", "0.5")
    try:
        assert json.loads(victim.stdout.readline()) == [record.id, 1]
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        victim.stdout.close()
    assert victim.returncode == -signal.SIGKILL
    held = journal.get(record.id)
    assert (held.state, held.worker, held.attempts) == ("running", "victim", 1)

    second = wait_for_claim(journal, "survivor")
    assert (second.id, second.attempts, second.worker) == (record.id, 2, "survivor")
    assert time.time() >= held.lease_until
    third = wait_for_claim(journal, "survivor")  # this worker "dies" too: it never renews
    assert (third.id, third.attempts) == (record.id, 3)
    assert journal.abandoned() == []

    time.sleep(0.6)
    assert journal.claim("survivor") is None
    failed = journal.get(record.id)
    assert failed.state == "failed" and failed.error == "the worker running it stopped 3 times"
    abandoned = journal.abandoned()
    assert [job.id for job in abandoned] == [record.id]
    assert abandoned[0].error == failed.error
    assert journal.abandoned() == []
    assert journal.complete(record.id, "survivor", {}) == "lost"


def test_abandoned_finds_expired_jobs_without_a_claim(tmp_path):
    journal = Journal(tmp_path / "jobs.db", lease_seconds=0.2, max_attempts=1)
    record, _ = submit(journal, "k")
    journal.claim("w")
    time.sleep(0.3)
    assert [job.id for job in journal.abandoned()] == [record.id]
    assert journal.get(record.id).state == "failed"


def test_hand_over_after_complete_keeps_the_result_for_the_caller(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    record, _ = submit(journal, "k")
    journal.claim("w")
    assert journal.complete(record.id, "w", {"result": [1, 2]}) == "reply"
    assert journal.hand_over(record.id) is False
    done = journal.get(record.id)
    assert done.state == "done" and done.deliver == "reply" and done.result == {"result": [1, 2]}


def test_complete_after_hand_over_asks_the_worker_to_store(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    record, _ = submit(journal, "k")
    journal.claim("w")
    assert journal.hand_over(record.id) is True
    assert journal.complete(record.id, "w", {"result": [1]}) == "store"
    stored = journal.get(record.id)
    assert (stored.state, stored.deliver, stored.result) == ("running", "store", None)
    assert journal.mark_stored(record.id, "other") is False
    assert journal.mark_stored(record.id, "w", {"prediction": 41}) is True
    done = journal.get(record.id)
    assert (done.state, done.result) == ("done", {"prediction": 41})
    assert journal.hand_over(record.id) is False


def test_hand_over_and_complete_racing_agree(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    for number in range(20):
        record, _ = submit(journal, f"k{number}")
        journal.claim("w")
        outcome: dict[str, object] = {}
        start = threading.Barrier(2)

        def give_up(job_id=record.id, outcome=outcome, start=start) -> None:
            start.wait()
            outcome["hand_over"] = journal.hand_over(job_id)

        thread = threading.Thread(target=give_up)
        thread.start()
        start.wait()
        outcome["complete"] = journal.complete(record.id, "w", {"n": number})
        thread.join()
        final = journal.get(record.id)
        if outcome["complete"] == "reply":
            assert outcome["hand_over"] is False
            assert final.state == "done" and final.result == {"n": number}
        else:
            assert outcome == {"hand_over": True, "complete": "store"}
            assert final.state == "running" and final.deliver == "store"


def test_renew_keeps_the_job_and_only_its_worker_may(tmp_path):
    journal = Journal(tmp_path / "jobs.db", lease_seconds=0.5)
    record, _ = submit(journal, "k")
    journal.claim("a")
    for _ in range(8):  # 0.8 s, more than the lease, kept alive by renewals
        time.sleep(0.1)
        assert journal.renew(record.id, "a") is True
        assert journal.claim("b") is None
    assert journal.renew(record.id, "b") is False
    assert journal.get(record.id).worker == "a"

    taken = wait_for_claim(journal, "b")  # a stopped renewing
    assert (taken.id, taken.worker, taken.attempts) == (record.id, "b", 2)
    assert journal.renew(record.id, "a") is False
    assert journal.complete(record.id, "a", {}) == "lost"
    assert journal.complete(record.id, "b", {"ok": 1}) == "reply"
    assert journal.renew(record.id, "b") is False


def test_wait_returns_on_completion_and_on_timeout(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    record, _ = submit(journal, "k")
    journal.claim("w")
    started = time.monotonic()
    timed_out = journal.wait(record.id, timeout=0.3, poll=0.05)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert timed_out.state == "running"

    timer = threading.Timer(0.2, journal.complete, (record.id, "w", {"ok": True}))
    timer.start()
    started = time.monotonic()
    done = journal.wait(record.id, timeout=10, poll=0.05)
    timer.join()
    assert time.monotonic() - started < 5
    assert done.state == "done" and done.result == {"ok": True}


def test_wait_returns_on_failure(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    record, _ = submit(journal, "k")
    journal.claim("w")
    journal.fail(record.id, "w", "no frames")
    assert journal.wait(record.id, timeout=10).error == "no frames"


def test_fail_with_retry_queues_again_until_attempts_run_out(tmp_path):
    journal = Journal(tmp_path / "jobs.db", max_attempts=2)
    record, _ = submit(journal, "k")
    other, _ = submit(journal, "later")
    journal.claim("w")
    assert journal.fail(record.id, "w", "Label Studio timed out", retry=True) is True
    retried = journal.get(record.id)
    assert (retried.state, retried.attempts, retried.error) == (
        "queued",
        1,
        "Label Studio timed out",
    )
    assert journal.claim("w").id == other.id  # a retried job goes to the back
    assert journal.claim("w").attempts == 2
    assert journal.fail(record.id, "x", "not mine") is False
    journal.fail(record.id, "w", "timed out again", retry=True)
    failed = journal.get(record.id)
    assert (failed.state, failed.error) == ("failed", "timed out again")
    assert journal.abandoned() == []  # the worker reported this one itself


def test_counts_hold_only_state_counts(tmp_path):
    journal = Journal(tmp_path / "jobs.db")
    assert journal.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0}
    ids = fill(journal, 4)
    journal.claim("w")
    journal.claim("w")
    journal.complete(ids[0], "w", {"secret": "url"})
    journal.fail(ids[1], "w", "boom")
    journal.claim("w")
    counts = journal.counts()
    assert counts == {"queued": 1, "running": 1, "done": 1, "failed": 1}
    assert all(type(value) is int for value in counts.values())


def test_requeue_running_frees_a_restarted_process_jobs(tmp_path):
    journal = Journal(tmp_path / "jobs.db", max_attempts=2)
    ids = fill(journal, 3)
    journal.claim("host:41:0")
    journal.claim("host:41:1")
    journal.claim("host:417:0")
    assert journal.requeue_running("host:41:") == 2
    assert [journal.get(job_id).state for job_id in ids] == ["queued", "queued", "running"]
    assert journal.claim("host:42:0").attempts == 2
    assert journal.requeue_running("host:42:") == 0  # out of attempts: abandoned instead
    assert [job.id for job in journal.abandoned()] == [ids[0]]
    assert journal.requeue_running("%") == 0  # no LIKE wildcards


def test_the_journal_survives_a_restart(tmp_path):
    path = tmp_path / "state" / "jobs.db"
    journal = Journal(path)
    record, _ = submit(journal, "k")
    journal.register_project("7")
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    reopened = Journal(path)
    assert reopened.get(record.id) == record
    assert reopened.is_project_registered("7") and not reopened.is_project_registered("8")
    reopened.register_project("7")  # registering again is harmless
    assert reopened.is_project_registered("7")
    with pytest.raises(JobNotFound):
        reopened.get(record.id + 1)


def test_prune_forgets_old_finished_jobs(tmp_path):
    journal = Journal(tmp_path / "jobs.db", keep_rows=2, prune_every=0)
    ids = fill(journal, 6)
    for job_id in ids[:4]:
        journal.claim("w")
        journal.complete(job_id, "w", {})
    assert journal.prune() == 2  # keep_rows: the two newest finished stay
    remaining = [job_id for job_id in ids if _exists(journal, job_id)]
    assert remaining == ids[2:]
    journal.keep_seconds = 0.0  # now everything finished is old enough
    assert journal.prune() == 2
    assert journal.counts() == {"queued": 2, "running": 0, "done": 0, "failed": 0}


def test_submit_prunes_now_and_then(tmp_path):
    journal = Journal(tmp_path / "jobs.db", keep_rows=1, prune_every=3)
    first, second = fill(journal, 2)
    for job_id in (first, second):
        journal.claim("w")
        journal.complete(job_id, "w", {})
    submit(journal, "third")  # the third submit prunes
    assert not _exists(journal, first) and _exists(journal, second)


def _exists(journal: Journal, job_id: int) -> bool:
    try:
        journal.get(job_id)
    except JobNotFound:
        return False
    return True


def test_bad_deliver_is_refused(tmp_path):
    with pytest.raises(ValueError):
        Journal(tmp_path / "jobs.db").submit("k", "predict", "7", None, {}, "email")
