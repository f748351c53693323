"""Past one machine: jobs on RQ and a real `redis-server` (the Debian package, started here on
a free 127.0.0.1 port), run by real worker processes.

The first tests use real `queues.run_worker` processes whose propagation and Label Studio are
stand-ins (tests/backend/queue_fake_runtime.py), to check the queue itself in seconds: one key
is one job across processes, every job runs once on two workers, `kill -9` of a worker's
process group hands its job to the other, bad input fails at once, a crash is retried, then
reported. The end-to-end tests run the product: two web replicas (one of them gunicorn with two
processes), each with its own MODEL_DIR as on separate hosts, two `xmem-label worker`
processes, and a real Label Studio 1.23.2.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests

from xmem_label.backend import devserver
from xmem_label.backend.formats import is_first_batch
from xmem_label.backend.queues import RedisQueue

from .conftest import BACKEND_AUTH, TOKEN, free_port, run_backend, stop, xmem_label_command
from .test_label_studio_e2e import (
    SEQUENCE_CONFIG,
    add_task,
    brush,
    chair,
    clip_urls,
    wait_for_prediction,
)

pytestmark = pytest.mark.e2e
FAKE_WORKER = Path(__file__).with_name("queue_fake_runtime.py")
LEASE = 2.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A private redis-server: no persistence, loopback only."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (tests/run.sh installs it: apt redis-server)")
    process, url = devserver.start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        stop(process)


@pytest.fixture
def queue(redis_url):
    queue = RedisQueue(redis_url, lease_seconds=LEASE, max_attempts=3)
    queue.redis.flushdb()
    return queue


def start_fake_workers(redis_url: str, count: int) -> list[subprocess.Popen]:
    workers = [
        subprocess.Popen(
            [sys.executable, str(FAKE_WORKER), redis_url, str(LEASE)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # kill -9 of its group kills the worker, as a host would
        )
        for _ in range(count)
    ]
    return workers


def stop_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {seconds} s")


def ran(queue: RedisQueue, key: str) -> list[int]:
    return [int(pid) for pid in queue.redis.lrange(f"test:ran:{key}", 0, -1)]


def stored(queue: RedisQueue, key: str) -> int:
    return queue.redis.llen(f"test:stored:{key}")


def reported(queue: RedisQueue, key: str) -> list[str]:
    return [r.decode() for r in queue.redis.lrange(f"test:reported:{key}", 0, -1)]


def _submit_many(url: str, keys: list[str]) -> list[str]:
    queue = RedisQueue(url, lease_seconds=LEASE)
    return [queue.submit(key, "webhook", "1", 1, {}, "store")[0].id for key in keys]


# ----- the queue with stand-in jobs ----------------------------------------------------------


def test_one_key_is_one_job_across_processes(queue, redis_url):
    """Four processes submit the same 10 keys at once (as web replicas receiving one repeated
    webhook would): 10 jobs, each enqueued once."""
    keys = [f"webhook:1:{n}:1:t" for n in range(10)]
    with concurrent.futures.ProcessPoolExecutor(4) as pool:
        answers = list(pool.map(_submit_many, [redis_url] * 4, [keys] * 4))
    for per_key in zip(*answers, strict=True):
        assert len(set(per_key)) == 1
    assert queue.queue.count == 10
    assert sorted(queue.queue.get_job_ids()) == sorted(answers[0])


def test_jobs_run_once_on_two_workers_and_replies_reach_the_caller(queue, redis_url):
    workers = start_fake_workers(redis_url, 2)
    try:
        stores = [
            queue.submit(f"s{n}", "webhook", "1", n, {"sleep": 0.05}, "store")[0] for n in range(20)
        ]
        replies = [
            queue.submit(f"r{n}", "predict", "1", n, {"value": n}, "reply")[0] for n in range(10)
        ]
        for n, record in enumerate(replies):
            done = queue.wait(record.id, 30)
            assert done.state == "done" and done.result["prediction"] == {"value": n}
        for record in stores:
            assert queue.wait(record.id, 30).state == "done"
        pids = [pid for n in range(20) for pid in ran(queue, f"s{n}")]
        assert len(pids) == 20 and set(pids) == {w.pid for w in workers}  # once each, both ran
        assert all(stored(queue, f"s{n}") == 1 for n in range(20))
        assert all(stored(queue, f"r{n}") == 0 for n in range(10))  # the caller had them
        final = {"queued": 0, "running": 0, "done": 30, "failed": 0}
        wait_until(lambda: queue.counts() == final, 10, f"counts {queue.counts()}")
    finally:
        stop_all(workers)


def test_hand_over_makes_the_worker_store_the_result(queue, redis_url):
    workers = start_fake_workers(redis_url, 1)
    try:
        record, _ = queue.submit("slow", "predict", "1", 1, {"sleep": 1.0}, "reply")
        wait_until(lambda: queue.get(record.id).state == "running", 20, "job started")
        assert queue.hand_over(record.id)  # the request gives up while the job runs
        done = queue.wait(record.id, 20)
        assert done.state == "done" and done.result == {"prediction_id": 1, "timings": {"total": 0}}
        assert stored(queue, "slow") == 1
        quick, _ = queue.submit("quick", "predict", "1", 2, {}, "reply")
        assert queue.wait(quick.id, 20).state == "done"
        assert not queue.hand_over(quick.id)  # finished: the caller uses the result
        assert stored(queue, "quick") == 0
    finally:
        stop_all(workers)


def test_a_killed_workers_job_completes_on_the_other(queue, redis_url):
    workers = start_fake_workers(redis_url, 2)
    try:
        record, _ = queue.submit("long", "webhook", "1", 1, {"sleep": 3.0}, "store")
        first = wait_until(lambda: ran(queue, "long"), 20, "job started")[0]
        victim = next(w for w in workers if w.pid == first)
        os.killpg(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        victim.wait()
        done = queue.wait(record.id, 30)
        took = time.monotonic() - killed
        assert done.state == "done", done
        (survivor,) = [w.pid for w in workers if w is not victim]
        assert ran(queue, "long") == [first, survivor]
        assert stored(queue, "long") == 1 and done.attempts == 2
        # one lease to notice, the sweep period, then the job's own 3 s
        assert took < LEASE + LEASE / 2 + 3.0 + 3.0, took
        print(f"kill -9 of the worker: job done on the other {took:.1f} s later")
    finally:
        stop_all(workers)


def test_bad_input_fails_at_once_and_is_reported_once(queue, redis_url):
    workers = start_fake_workers(redis_url, 1)
    try:
        record, _ = queue.submit("bad", "webhook", "1", 1, {"bad": "no keyframe"}, "store")
        done = queue.wait(record.id, 20)
        assert done.state == "failed" and done.error == "no keyframe" and done.attempts == 1
        assert ran(queue, "bad") == [workers[0].pid] and reported(queue, "bad") == ["no keyframe"]
        assert record.id in queue.queue.failed_job_registry.get_job_ids()  # RQ's trace too
        again, created = queue.submit("bad", "webhook", "1", 1, {}, "store")
        assert created and again.id != record.id  # a failed key is submitted again
        assert queue.wait(again.id, 20).state == "done"
    finally:
        stop_all(workers)


def test_a_crashing_job_is_tried_three_times_then_reported(queue, redis_url):
    workers = start_fake_workers(redis_url, 1)
    try:
        record, _ = queue.submit("crash", "webhook", "1", 1, {"crash": "boom"}, "store")
        done = wait_until(
            lambda: (r := queue.get(record.id)).state == "failed" and r, 30, "job failed"
        )
        assert done.attempts == 3 and len(ran(queue, "crash")) == 3
        time.sleep(0.3)
        assert reported(queue, "crash") == ["boom"]
        reply, _ = queue.submit("crash-reply", "predict", "1", 1, {"crash": "bang"}, "reply")
        failed = queue.wait(reply.id, 30)
        assert failed.state == "failed" and failed.error == "bang"
        assert reported(queue, "crash-reply") == []  # the waiting request answers with it
    finally:
        stop_all(workers)


def test_a_job_that_kills_every_worker_is_reported_once(queue, redis_url):
    """Three workers killed in turn while running one job: RQ's cleanup (run by the next
    worker's sweep) fails it instead of a fourth run, and its reason is reported once."""
    record, _ = queue.submit("deadly", "webhook", "1", 1, {"sleep": 60}, "store")
    for attempt in range(1, 4):
        (worker,) = start_fake_workers(redis_url, 1)
        wait_until(lambda: len(ran(queue, "deadly")) == attempt, 30, f"run {attempt}")  # noqa: B023
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    sweeper = start_fake_workers(redis_url, 1)
    try:
        done = wait_until(
            lambda: (r := queue.get(record.id)).state == "failed" and r, 30, "job failed"
        )
        assert done.error == "the worker running it stopped 3 times" and done.attempts == 3
        wait_until(lambda: reported(queue, "deadly"), 10, "failure reported")
        time.sleep(LEASE)
        assert reported(queue, "deadly") == [done.error] and len(ran(queue, "deadly")) == 3
    finally:
        stop_all(sweeper)


def test_a_worker_runs_only_the_backends_jobs(queue, redis_url, tmp_path):
    """A job written straight into the queue that names another function is failed unrun."""
    victim = tmp_path / "keep-me"
    victim.write_text("x")
    foreign = queue.queue.enqueue_call("os.remove", args=[str(victim)])
    workers = start_fake_workers(redis_url, 1)
    try:
        wait_until(lambda: foreign.get_status(refresh=True) == "failed", 20, "refused")
        assert victim.exists()
        record, _ = queue.submit("after", "webhook", "1", 1, {}, "store")
        assert queue.wait(record.id, 20).state == "done"  # the worker goes on
    finally:
        stop_all(workers)


# ----- the product: Label Studio, two web replicas, two workers --------------------------------


def start_workers(label_studio, tmp_path_factory, redis_url: str, count: int) -> list:
    """`xmem-label worker --engine flow --queue-url ...` processes, each with its own MODEL_DIR
    (nothing shared but Redis and Label Studio, as on other hosts)."""
    workers = []
    for number in range(count):
        log = tmp_path_factory.mktemp("worker") / f"worker-{number}.log"
        env = dict(
            os.environ,
            LABEL_STUDIO_URL=label_studio.url,
            LABEL_STUDIO_API_KEY=TOKEN,
            OMP_NUM_THREADS="1",
            MODEL_DIR=str(tmp_path_factory.mktemp("worker-model-dir")),
            XMEM_LABEL_JOB_LEASE=str(LEASE),
        )
        env.pop("LOCAL_FILES_DOCUMENT_ROOT", None)
        with open(log, "w") as out:
            process = subprocess.Popen(
                [xmem_label_command(), "worker", "--engine", "flow", "--queue-url", redis_url],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        workers.append((process, log))
    return workers


@pytest.fixture(scope="module")
def cluster(label_studio, tmp_path_factory, redis_url):
    """Replica A (gunicorn, 2 web processes) and replica B (1), two workers, one project
    connected to A."""
    redis.Redis.from_url(redis_url).flushdb()
    env = {"XMEM_LABEL_QUEUE_URL": redis_url, "XMEM_LABEL_JOB_LEASE": str(LEASE)}
    replica_a = run_backend(label_studio, tmp_path_factory, "--workers", "2", env=env)
    replica_b = run_backend(label_studio, tmp_path_factory, env=env)
    workers = start_workers(label_studio, tmp_path_factory, redis_url, 2)
    try:
        urls = [next(replica_a), next(replica_b)]
        project_id = label_studio.project("redis-queue", SEQUENCE_CONFIG)
        project = {"id": project_id, "urls": clip_urls(label_studio, project_id)}
        label_studio.connect(project_id, urls[0])
        yield {
            "replicas": urls,
            "workers": workers,
            "project": project,
            "queue": RedisQueue(redis_url, lease_seconds=LEASE),
        }
    finally:
        for process, log in workers:
            stop(process)
            print(log.read_text()[-3000:])
        for generator in (replica_b, replica_a):
            generator.close()


def predict_on(replica: str, project: dict, task: dict) -> requests.Response:
    return requests.post(
        f"{replica}/predict",
        auth=BACKEND_AUTH,
        timeout=120,
        json={
            "tasks": [task],
            "project": f"{project['id']}.0",
            "label_config": SEQUENCE_CONFIG,
            "params": {"context": None},
        },
    )


def test_replicas_enqueue_and_workers_run_each_job_once(label_studio, cluster):
    """/predict on both replicas and webhooks from Label Studio: each job ran once, each
    webhook's task holds one prediction, each /predict answered with its masks."""
    project, queue = cluster["project"], cluster["queue"]
    urls = project["urls"][:4]
    webhook_tasks = [
        add_task(label_studio, project, urls, [brush(0, "Chair", chair(0))]) for _ in range(4)
    ]
    predict_tasks = [add_task(label_studio, project, urls, None) for _ in range(4)]
    for task_id in predict_tasks:
        label_studio.api(
            "POST",
            f"/api/tasks/{task_id}/annotations",
            json={"result": [brush(0, "Chair", chair(0))]},
        )
    for task_id in webhook_tasks + predict_tasks:
        wait_for_prediction(label_studio, task_id, seconds=120)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda n: predict_on(
                    cluster["replicas"][n % 2],
                    project,
                    label_studio.api("GET", f"/api/tasks/{predict_tasks[n]}"),
                ),
                range(4),
            )
        )
    for reply in replies:
        assert reply.status_code == 200, reply.text
        (result,) = reply.json()["results"]
        assert {r.get("item_index") for r in result["result"]} - {None} == set(range(4))
    time.sleep(1.0)
    for task_id in webhook_tasks + predict_tasks:
        assert len(label_studio.predictions(task_id)) == 1, task_id  # the webhook's, once

    def all_finished():  # RQ marks a job finished just after its result is delivered
        ids = queue.queue.finished_job_registry.get_job_ids()
        return ids if len(ids) >= 12 else None

    finished = wait_until(all_finished, 30, "12 jobs finished")
    records = [queue.get(job_id) for job_id in finished]
    assert len(records) == 12 and {r.kind for r in records} == {"webhook", "predict"}
    assert all(r.attempts == 1 and r.state == "done" for r in records)
    assert len({r.key for r in records}) == 12
    assert len({r.worker for r in records}) == 2  # both workers took jobs


def test_a_killed_worker_hands_its_job_to_the_other(label_studio, cluster):
    """kill -9 of the worker (its whole process group) running a 96-frame webhook job: the
    other worker runs it; exactly one prediction is stored."""
    project, queue = cluster["project"], cluster["queue"]
    task = add_task(label_studio, project, project["urls"] * 12, None)
    label_studio.api(
        "POST", f"/api/tasks/{task}/annotations", json={"result": [brush(0, "Chair", chair(0))]}
    )

    def running():
        for job_id in queue.queue.started_job_registry.get_job_ids(cleanup=False):
            record = queue.get(job_id)
            if record.task_id == task and record.state == "running":
                return record
        return None

    record = wait_until(running, 60, "the webhook job started")
    pid = int(record.worker.split(":")[1])
    (victim,) = [p for p, _ in cluster["workers"] if p.pid == pid]
    os.killpg(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    victim.wait()
    # nothing stored but, perhaps, the killed job's first batch
    assert all(is_first_batch(p) for p in label_studio.predictions(task))
    prediction = wait_for_prediction(label_studio, task, seconds=120)
    took = time.monotonic() - killed
    assert len([r for r in prediction["result"] if r.get("item_index") == 95]) == 1
    done = queue.wait(record.id, 30)  # stored first, then marked done
    assert done.state == "done" and done.attempts == 2 and done.worker != record.worker
    time.sleep(2)
    assert [p["id"] for p in label_studio.predictions(task)] == [prediction["id"]]
    print(f"kill -9 of a worker mid-job: prediction stored {took:.1f} s later by the other")


def test_a_failed_job_leaves_its_reason_on_the_task(label_studio, cluster):
    """As with the journal: a webhook job that fails (a frame Label Studio cannot serve)
    stores an `xmem-label-failed` note with the reason in the status field."""
    project = cluster["project"]
    urls = project["urls"]
    task = add_task(
        label_studio,
        project,
        [*urls[:3], urls[3].replace("frame_", "missing_")],
        [brush(0, "Chair", chair(0))],
    )
    note = wait_for_prediction(label_studio, task, seconds=120)
    time.sleep(0.5)
    assert label_studio.predictions(task) == [note]
    assert note["model_version"] == "xmem-label-failed" and note["score"] == 0
    (status,) = note["result"]
    assert "Label Studio answered HTTP 404" in status["value"]["text"][0], status
    failed = wait_until(cluster["queue"].queue.failed_job_registry.get_job_ids, 30, "failed")
    assert [cluster["queue"].get(job_id).task_id for job_id in failed] == [task]


def test_an_unreachable_queue_is_a_503_with_retry_after(tmp_path):
    """Redis down: /predict and /webhook accept nothing and say when to retry; /health still
    answers (it touches no queue)."""
    import dataclasses

    from xmem_label.backend.app import create_app
    from xmem_label.backend.model import Runtime

    from .test_app import config, keyframe_task, make_settings

    settings = dataclasses.replace(
        make_settings(tmp_path), queue_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    client = create_app(Runtime(settings).start()).test_client()
    assert client.get("/health").status_code == 200
    setup = client.post("/setup", json={"project": "1.0", "schema": config("mask", "Chair")})
    predict = client.post(
        "/predict",
        json={
            "tasks": [keyframe_task(1, "mask", "Chair")],
            "project": "1.0",
            "label_config": config("mask", "Chair"),
        },
    )
    for reply in (setup, predict):
        assert reply.status_code == 503 and reply.headers["Retry-After"] == "30"
        assert reply.json == {"error": "the job queue is unreachable; retry later"}
