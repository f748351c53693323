"""A bounded load test of the Label Studio ML backend (backend/README.md, "Jobs survive
crashes" and "Many machines").

    python -m benchmarks.backend_load [--clip tests/data/vos/chair] [--frames N] [--k 1,2]
                                      [--start-redis | --queue-url redis://...]
                                      [--ls-bin PATH | --ls-url URL --token T --document-root D]

Two job back-ends: the embedded SQLite journal (default: web and worker processes share one
MODEL_DIR), or, with `--start-redis` (a private `redis-server` on a free loopback port) or
`--queue-url` (a Redis the benchmark may empty: it flushes the database before each run), the
RQ queue: web and worker processes then share nothing but Redis and Label Studio (each worker
has its own MODEL_DIR, as on other hosts).

Against a real Label Studio 1.23.2 (started here, or `--ls-url` of a running one) and real
backend processes, engine `flow`:

1. For each K in `--k` (fresh project, fresh MODEL_DIR): `xmem-label serve --workers 2
   --job-threads 0` (two web processes, no job threads) plus K `xmem-label worker` processes
   sharing one job journal (or `--queue-url` on both), connected by `xmem-label connect`
   (credentials on the model and the webhook). The project uses backend/README.md's config;
   every task holds the clip's frames and a brush keyframe (its ground-truth mask) on frame 0.
2. Load: `--predicts` /predict requests with credentials, shaped as Label Studio sends them,
   `--concurrency` at a time, and at the same time `--webhooks` annotations created through
   Label Studio's API (each fires the real webhook), while /health is polled every
   `--health-interval` seconds until the journal is empty.
3. Printed: status counts per route (webhook statuses from the backend's access log), whether
   every job ran exactly once (journal counts from /metrics, attempts from the journal; every
   webhook task ends with exactly one prediction of the backend's model version; every /predict
   answer holds a result covering every frame, or its prediction was stored through the API),
   /health p50/p99/max, jobs per minute, and the peak RSS (VmHWM) summed over the backend's
   processes.
4. Kill: a fresh backend with two workers and `--lease` seconds of job lease; a webhook job on
   a longer clip (`--kill-frames`); once /metrics shows it running, the worker holding it (the
   journal's `worker` column, host:pid:thread) gets SIGKILL. Printed: which worker took the job
   over, the time from the kill to the job's completion and to the stored prediction, and that
   the task holds exactly one prediction.

Loopback only; every wait has a deadline; every process started here is stopped at the end.
The machine is shared (2 cores, other jobs running): figures are noisy.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import math
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis
import requests

from benchmarks.common import painted_region
from benchmarks.label_studio import (
    BACKEND_AUTH,
    TOKEN,
    add_label_studio_options,
    backend_environment,
    connect,
    free_port,
    start_label_studio,
    stop,
    wait_up,
    xmem_label_command,
)
from xmem_label.backend import devserver
from xmem_label.model import read_label_mask

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLIP = ROOT / "tests" / "data" / "vos" / "chair"
CONFIG = """<View>
  <Image name="image" valueList="$frames"/>
  <BrushLabels name="mask" toName="image"><Label value="Chair"/><Label value="Person"/>
  </BrushLabels>
  <RectangleLabels name="prompt" toName="image" smart="true"><Label value="Chair"/>
  </RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Chair"/></KeyPointLabels>
  <TextArea name="xmem_status" toName="image" rows="1" readonly="true"/>
</View>"""
FAILED_VERSION = "xmem-label-failed"
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/[^ ?"]*)[^"]*" (?P<status>\d{3}) ')


# ----- Label Studio --------------------------------------------------------------------------


class Studio:
    """The Label Studio server: REST calls with its token, one HTTP session per thread."""

    def __init__(self, url: str, token: str, media_root: Path):
        self.url = url.rstrip("/")
        self.token = token
        self.media_root = media_root
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._local.session.headers["Authorization"] = f"Token {self.token}"
        return self._local.session

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        return self._session().request(method, self.url + path, timeout=120, **kwargs)

    def api(self, method: str, path: str, **kwargs):
        reply = self.request(method, path, **kwargs)
        if reply.status_code >= 300:
            raise SystemExit(
                f"Label Studio: {method} {path} -> {reply.status_code} {reply.text[:300]}"
            )
        return reply.json() if reply.content else None

    def predictions(self, task_id: int) -> list[dict]:
        return self.api("GET", "/api/predictions", params={"task": task_id})


class Clip:
    """The clip's first frames and the ground-truth mask of frame 0 as a brush keyframe."""

    def __init__(self, folder: Path, frames: int):
        paths = sorted((folder / "frames").iterdir())
        self.paths = paths[:frames] if frames > 0 else paths
        mask = read_label_mask(sorted((folder / "masks").iterdir())[0]) == 1
        self.height, self.width = mask.shape
        self.keyframe = painted_region(mask, "Chair")


def make_project(studio: Studio, clip: Clip, title: str) -> tuple[int, list[str]]:
    """A project with the README's config, whose Local Storage serves the clip's frames."""
    project = studio.api("POST", "/api/projects", json={"title": title, "label_config": CONFIG})
    # Opening a task must not start a propagation (backend/README.md, "Opening a task").
    studio.api(
        "PATCH",
        f"/api/projects/{project['id']}",
        json={"show_collab_predictions": False, "evaluate_predictions_automatically": False},
    )
    folder = studio.media_root / f"backend-load-{project['id']}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in clip.paths:
        shutil.copy(path, folder / path.name)
    studio.api(
        "POST",
        "/api/storages/localfiles",
        json={
            "project": project["id"],
            "path": str(folder),
            "title": "clip",
            "use_blob_urls": False,
        },
    )
    urls = [
        f"/data/local-files/?d={(folder / p.name).relative_to(studio.media_root).as_posix()}"
        for p in clip.paths
    ]
    return project["id"], urls


def export_tasks(studio: Studio, project_id: int) -> list[dict]:
    """Every task with its annotations, as Label Studio serializes them (the export never calls
    the backend)."""
    return studio.api(
        "GET",
        f"/api/projects/{project_id}/export",
        params={"exportType": "JSON", "download_all_tasks": "true", "download_resources": "false"},
    )


# ----- the backend's processes ---------------------------------------------------------------


class Backend:
    """`xmem-label serve --workers W --job-threads 0` plus K `xmem-label worker` processes on
    one MODEL_DIR; each in its own process group."""

    def __init__(
        self,
        studio: Studio,
        work: Path,
        *,
        serve_workers: int,
        workers: int,
        lease: float,
        queue: int | None,
        sync_seconds: float,
        queue_url: str | None = None,
    ):
        self.work = work
        self.queue_url = queue_url
        self.redis_queue = None
        if queue_url:
            from xmem_label.backend.queues import RedisQueue

            redis.Redis.from_url(queue_url, socket_timeout=10).flushdb()  # a fresh run
            self.redis_queue = RedisQueue(queue_url, lease_seconds=lease)
        self.model_dir = work / "model-dir"
        self.journal_path = self.model_dir / "xmem-label-jobs.sqlite"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = backend_environment(
            studio.url,
            studio.token,
            MODEL_DIR=str(self.model_dir),
            XMEM_LABEL_JOB_LEASE=str(lease),
            OMP_NUM_THREADS="1",
        )
        queue_options = ["--queue", str(queue)] if queue else []
        if queue_url:
            queue_options += ["--queue-url", queue_url]
        self.serve_log = work / "serve.log"
        self.serve = self._start(
            [
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--engine",
                "flow",
                "--workers",
                str(serve_workers),
                "--job-threads",
                "0",
                "--sync-seconds",
                str(sync_seconds),
                *queue_options,
            ],
            self.serve_log,
        )
        self.workers = [
            self._start(
                ["worker", "--engine", "flow", "--job-threads", "1", *queue_options],
                work / f"worker-{number}.log",
                # with Redis, nothing on disk is shared: each worker as on a host of its own
                MODEL_DIR=str(work / f"worker-{number}-model-dir") if queue_url else None,
            )
            for number in range(workers)
        ]
        self.http = requests.Session()
        self.http.auth = BACKEND_AUTH

    def _start(self, arguments: list[str], log: Path, **env: str | None) -> subprocess.Popen:
        environment = dict(self.env, **{k: v for k, v in env.items() if v is not None})
        with open(log, "w") as out:
            return subprocess.Popen(
                [xmem_label_command(), *arguments],
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def get(self, path: str) -> dict:
        reply = self.http.get(self.url + path, timeout=60)
        reply.raise_for_status()
        return reply.json()

    def wait_ready(self, seconds: float = 120) -> None:
        wait_up(f"{self.url}/health", seconds)
        deadline = time.monotonic() + seconds
        for number, worker in enumerate(self.workers):
            log = self.work / f"worker-{number}.log"
            ready = "Listening on" if self.queue_url else "job thread"  # RQ's line, or ours
            while ready not in log.read_text():
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"worker {number} did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)

    def groups(self) -> list[int]:
        return [process.pid for process in (self.serve, *self.workers)]

    def pids(self) -> list[int]:
        """Every live process in the backend's process groups (gunicorn's master and its
        workers, the job workers)."""
        groups, found = set(self.groups()), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) in groups and fields[0] != "Z":
                found.append(int(entry.name))
        return found

    def peak_rss_mb(self) -> dict[str, list[float]]:
        """VmHWM (each process's peak resident set, MB) of the backend's processes, by role:
        gunicorn's master, its web workers, the job workers."""
        roles: dict[str, list[float]] = {"serve master": [], "web": [], "job worker": []}
        workers = {process.pid for process in self.workers}
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            if match:
                role = (
                    "serve master"
                    if pid == self.serve.pid
                    else "job worker"
                    if pid in workers
                    else "web"
                )
                roles[role].append(int(match.group(1)) / 1024)
        return roles

    def pss_mb(self) -> float:
        """Proportional set size now, summed: pages shared after gunicorn's fork count once."""
        total_kb = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
                total_kb += int(match.group(1)) if match else 0
        return total_kb / 1024

    def journal(self) -> list[dict]:
        """Every job: the journal's rows, or the RQ queue's jobs in the same shape."""
        if self.redis_queue is not None:
            return self._redis_jobs()
        conn = sqlite3.connect(self.journal_path, timeout=30)
        try:
            conn.row_factory = sqlite3.Row
            return [
                dict(row)
                for row in conn.execute(
                    "SELECT id, kind, task_id, state, deliver, attempts, worker, error, created,"
                    " updated FROM jobs ORDER BY id"
                )
            ]
        finally:
            conn.close()

    def _redis_jobs(self) -> list[dict]:
        queue = self.redis_queue.queue
        ids = {
            *queue.get_job_ids(),
            *queue.intermediate_queue.get_job_ids(),  # taken by a worker, not yet started
            *queue.started_job_registry.get_job_ids(cleanup=False),
            *queue.finished_job_registry.get_job_ids(cleanup=False),
            *queue.failed_job_registry.get_job_ids(cleanup=False),
        }
        rows = [self._redis_row(job_id) for job_id in ids]
        return sorted((row for row in rows if row), key=lambda row: row["created"])

    def job(self, job_id) -> dict:
        """One job's row, by id (a job moving between RQ's lists is always found)."""
        if self.redis_queue is not None:
            return self._redis_row(job_id)
        return next(row for row in self.journal() if row["id"] == job_id)

    def _redis_row(self, job_id: str) -> dict | None:
        from xmem_label.backend.journal import JobNotFound

        try:
            record = self.redis_queue.get(job_id)
        except JobNotFound:
            return None
        return {
            "id": record.id,
            "kind": record.kind,
            "task_id": record.task_id,
            "state": record.state,
            "deliver": record.deliver,
            "attempts": record.attempts,
            "worker": record.worker,
            "error": record.error,
            "created": record.created,
            "updated": record.updated,
        }

    def access_counts(self) -> dict[str, collections.Counter]:
        """Status counts per route from gunicorn's access log."""
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for line in self.serve_log.read_text(errors="replace").splitlines():
            match = ACCESS_LINE.search(line)
            if match:
                counts[f"{match['method']} {match['path']}"][match["status"]] += 1
        return counts

    def stop(self) -> None:
        """SIGTERM to each process group started here, then SIGKILL to what is left."""
        for group in self.groups():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
        for process in (self.serve, *self.workers):
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}"
            for log in sorted(self.work.glob("*.log"))
        )


# ----- measuring -----------------------------------------------------------------------------


class HealthPoller:
    """GET /health every `interval` seconds in a thread; latencies and failures."""

    def __init__(self, url: str, interval: float):
        self.url, self.interval = url, interval
        self.latencies: list[float] = []
        self.failures: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _poll(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                status = session.get(self.url, timeout=5).status_code
            except requests.RequestException as exc:
                self.failures[type(exc).__name__] += 1
            else:
                if status == 200:
                    self.latencies.append(time.perf_counter() - started)
                else:
                    self.failures[str(status)] += 1
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - started)))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def status_label(status: int, retry_after: bool) -> str:
    if status == 503:
        return "503+Retry-After" if retry_after else "503 without Retry-After"
    return str(status)


def wait_until(condition, seconds: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {seconds:.0f} s")
        time.sleep(poll)


def covers_every_frame(result: list[dict], frames: int) -> bool:
    return {
        region.get("item_index") for region in result if region.get("type") == "brushlabels"
    } == set(range(frames))


# ----- the load run --------------------------------------------------------------------------


def load_run(args, studio: Studio, clip: Clip, workers: int, work: Path) -> dict:
    print(
        f"\n=== K = {workers} worker(s): serve --workers {args.serve_workers} --job-threads 0 "
        f"+ {workers} x `xmem-label worker` ==="
    )
    project_id, urls = make_project(studio, clip, f"backend-load-k{workers}")
    # /predict tasks carry a submitted keyframe before the backend is connected (no webhook
    # for them); webhook tasks get theirs during the load.
    studio.api(
        "POST",
        f"/api/projects/{project_id}/import",
        json=[
            {"data": {"frames": urls}, "annotations": [{"result": [clip.keyframe]}]}
            for _ in range(args.predicts)
        ],
    )
    studio.api(
        "POST",
        f"/api/projects/{project_id}/import",
        json=[{"data": {"frames": urls}} for _ in range(args.webhooks)],
    )
    tasks = sorted(export_tasks(studio, project_id), key=lambda task: task["id"])
    predict_tasks = [task for task in tasks if task["annotations"]]
    webhook_tasks = [task for task in tasks if not task["annotations"]]
    assert len(predict_tasks) == args.predicts and len(webhook_tasks) == args.webhooks

    backend = Backend(
        studio,
        work,
        serve_workers=args.serve_workers,
        workers=workers,
        lease=args.lease,
        queue=args.queue,
        sync_seconds=args.sync_seconds,
        queue_url=args.queue_url,
    )
    try:
        backend.wait_ready()
        connect(project_id, backend.url, studio.url, studio.token)
        version = backend.get("/versions")["versions"][0]
        return drive_load(
            args,
            studio,
            backend,
            project_id,
            predict_tasks,
            webhook_tasks,
            version,
            len(urls),
            clip.keyframe,
        )
    except BaseException:
        print(backend.log_tails())
        raise
    finally:
        backend.stop()


def drive_load(
    args, studio, backend, project_id, predict_tasks, webhook_tasks, version, frames, keyframe
) -> dict:
    def predict(task: dict) -> dict:
        started = time.perf_counter()
        try:
            reply = requests.post(
                f"{backend.url}/predict",
                auth=BACKEND_AUTH,
                timeout=120,
                json={
                    "tasks": [task],
                    "project": f"{project_id}.0",
                    "label_config": CONFIG,
                    "params": {"context": None},
                },
            )
        except requests.RequestException as exc:
            return {"task": task["id"], "status": type(exc).__name__, "seconds": 0.0}
        body = (
            reply.json()
            if reply.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        return {
            "task": task["id"],
            "seconds": time.perf_counter() - started,
            "status": status_label(reply.status_code, "Retry-After" in reply.headers),
            "results": body.get("results"),
            "errors": body.get("errors"),
        }

    def annotate(task: dict) -> dict:
        started = time.perf_counter()
        try:
            reply = studio.request(
                "POST", f"/api/tasks/{task['id']}/annotations", json={"result": [keyframe]}
            )
        except requests.RequestException as exc:
            return {"task": task["id"], "status": type(exc).__name__, "seconds": 0.0}
        return {
            "task": task["id"],
            "status": str(reply.status_code),
            "seconds": time.perf_counter() - started,
        }

    load_started = time.time()
    clock = time.perf_counter()
    with (
        HealthPoller(f"{backend.url}/health", args.health_interval) as health,
        concurrent.futures.ThreadPoolExecutor(args.concurrency) as predict_pool,
        concurrent.futures.ThreadPoolExecutor(args.webhook_concurrency) as annotate_pool,
    ):
        predicted = [predict_pool.submit(predict, task) for task in predict_tasks]
        annotated = [annotate_pool.submit(annotate, task) for task in webhook_tasks]
        predicts = [future.result() for future in predicted]
        annotations = [future.result() for future in annotated]
        requests_done = time.perf_counter() - clock
        accepted_webhooks = sum(a["status"] == "201" for a in annotations)

        def drained():
            rows = backend.journal()
            webhook_jobs = sum(row["kind"] == "webhook" for row in rows)
            busy = any(row["state"] in ("queued", "running") for row in rows)
            return rows if webhook_jobs >= accepted_webhooks and not busy else None

        rows = wait_until(drained, args.drain_timeout, "the journal did not drain")
        drained_after = time.perf_counter() - clock
    metrics_reply = backend.get("/metrics")
    metrics = metrics_reply["jobs"]
    rss = backend.peak_rss_mb()
    pss = backend.pss_mb()
    rss_mb = sum(sum(values) for values in rss.values())
    access = backend.access_counts()

    print(
        f"load: {len(predicts)} /predict ({args.concurrency} at a time) + {len(annotations)} "
        f"annotations through Label Studio ({args.webhook_concurrency} at a time); requests "
        f"answered after {requests_done:.1f} s, journal empty after {drained_after:.1f} s"
    )
    print("status counts:")
    for route, replies in (
        ("POST /predict (client)", predicts),
        ("POST /api/tasks/N/annotations", annotations),
    ):
        print(f"  {route + ':':<33}{dict(collections.Counter(r['status'] for r in replies))}")
    for route in ("POST /predict", "POST /webhook", "POST /setup", "GET /health"):
        print(f"  {route + ' (access log):':<33}{dict(access.get(route, {}))}")
    with_result = [p["seconds"] for p in predicts if (p.get("results") or [[]])[0]]
    handed_over = [
        p["seconds"]
        for p in predicts
        if any("stored when done" in str(e.get("reason")) for e in p.get("errors") or [])
    ]
    for what, seconds in (
        ("answered with the result", with_result),
        ('handed over ("still running: stored when done")', handed_over),
    ):
        if seconds:
            print(
                f"  /predict {what}: {len(seconds)}, latency median "
                f"{statistics.median(seconds):.2f} s, max {max(seconds):.2f} s"
            )

    # --- exactly once ---
    done = [row for row in rows if row["state"] == "done"]
    failed = [row for row in rows if row["state"] == "failed"]
    attempts = collections.Counter(row["attempts"] for row in rows)
    by_kind = collections.Counter((row["kind"], row["state"]) for row in rows)
    print(
        f"jobs: /metrics {metrics}; journal {dict(by_kind)}; attempts per job "
        f"{dict(sorted(attempts.items()))}"
    )
    for row in failed:
        print(f"  failed job {row['id']} ({row['kind']}, task {row['task_id']}): {row['error']}")
    print(
        f"  /metrics last_timings (a web process's own; jobs run in the workers): "
        f"{metrics_reply.get('last_timings')}"
    )
    per_worker = collections.Counter(row["worker"].split(":")[1] for row in done if row["worker"])
    print(f"  jobs per worker pid: {dict(per_worker)}")

    problems = []
    webhook_ok = 0
    for task in webhook_tasks:
        stored = studio.predictions(task["id"])
        ours = [p for p in stored if p["model_version"] == version]
        if len(ours) == 1 and len(stored) == 1 and covers_every_frame(ours[0]["result"], frames):
            webhook_ok += 1
        else:
            problems.append(f"webhook task {task['id']}: {[p['model_version'] for p in stored]}")
    answered = stored_through_api = 0
    for reply in predicts:
        stored = studio.predictions(reply["task"])
        ours = [p for p in stored if p["model_version"] == version]
        result = (reply.get("results") or [[]])[0]  # a prediction, or [] when not answered
        if reply["status"] == "200" and result:
            if (
                result.get("model_version") == version
                and not stored
                and covers_every_frame(result.get("result") or [], frames)
            ):
                answered += 1  # Label Studio stores the answer; the backend stored nothing
            else:
                problems.append(f"predict task {reply['task']}: answered, and {len(stored)} stored")
        elif (
            reply["status"] == "200"
            and len(ours) == 1
            and len(stored) == 1
            and (covers_every_frame(ours[0]["result"], frames))
        ):
            stored_through_api += 1
        elif reply["status"].startswith("503") and not stored:
            pass  # refused before a job was made; Label Studio logs it
        else:
            problems.append(
                f"predict task {reply['task']}: {reply['status']} "
                f"{reply.get('errors')}, stored {[p['model_version'] for p in stored]}"
            )
    refused = sum(p["status"].startswith("503") for p in predicts)
    jobs_expected = len(predicts) - refused + accepted_webhooks
    once = (
        not problems
        and not failed
        and set(attempts) == {1}
        and len(done) == jobs_expected
        and metrics["done"] == jobs_expected
    )
    print(
        f"exactly once: {'yes' if once else 'NO'} ({len(done)} jobs done of {jobs_expected} "
        f"accepted, {len(failed)} failed); webhook tasks with exactly one prediction of "
        f"{version}: {webhook_ok}/{len(webhook_tasks)}; /predict answered with a result "
        f"(nothing stored by the backend): {answered}, stored through the API: "
        f"{stored_through_api}, refused 503: {refused}"
    )
    for problem in problems[:10]:
        print(f"  problem: {problem}")

    # --- health, throughput, memory ---
    lat = health.latencies
    if lat:
        print(
            f"/health during the load: {len(lat)} answers, p50 {percentile(lat, 0.5) * 1e3:.0f} "
            f"ms, p99 {percentile(lat, 0.99) * 1e3:.0f} ms, max {max(lat) * 1e3:.0f} ms; "
            f"failures {dict(health.failures) or 0}"
        )
    finished = max(row["updated"] for row in done) if done else load_started
    minutes = (finished - load_started) / 60
    rate = len(done) / minutes if minutes > 0 else 0.0
    print(f"throughput: {len(done)} jobs in {minutes * 60:.1f} s = {rate:.1f} jobs/min")
    print(
        f"peak RSS (sum of VmHWM over the backend's processes): {rss_mb:.0f} MB = "
        + " + ".join(
            f"{role} {'/'.join(f'{mb:.0f}' for mb in values)}"
            for role, values in rss.items()
            if values
        )
        + f" (VmHWM counts pages shared after the fork in every process; Pss now, shared "
        f"pages split: {pss:.0f} MB)"
    )
    return {
        "workers": len(backend.workers),
        "rate": rate,
        "once": once,
        "rss": rss_mb,
        "health": (percentile(lat, 0.5), percentile(lat, 0.99), max(lat)) if lat else None,
        "statuses": collections.Counter(p["status"] for p in predicts),
        "webhooks": dict(access.get("POST /webhook", {})),
    }


# ----- the kill run --------------------------------------------------------------------------


def kill_run(args, studio: Studio, clip: Clip, work: Path) -> dict:
    print(f"\n=== kill -9 of a worker mid-job: serve + 2 workers, job lease {args.lease:g} s ===")
    project_id, urls = make_project(studio, clip, "backend-load-kill")
    long_clip = (urls * math.ceil(args.kill_frames / len(urls)))[: args.kill_frames]
    studio.api("POST", f"/api/projects/{project_id}/import", json=[{"frames": long_clip}])
    (task,) = export_tasks(studio, project_id)
    backend = Backend(
        studio,
        work,
        serve_workers=args.serve_workers,
        workers=2,
        lease=args.lease,
        queue=args.queue,
        sync_seconds=args.sync_seconds,
        queue_url=args.queue_url,
    )
    try:
        backend.wait_ready()
        connect(project_id, backend.url, studio.url, studio.token)
        version = backend.get("/versions")["versions"][0]
        studio.api(
            "POST", f"/api/tasks/{task['id']}/annotations", json={"result": [clip.keyframe]}
        )  # fires the webhook
        wait_until(
            lambda: backend.get("/metrics")["jobs"]["running"],
            60,
            "the webhook job never started",
            poll=0.05,
        )
        time.sleep(args.kill_after)  # into the job: media fetched, propagation under way
        (job,) = [row for row in backend.journal() if row["state"] == "running"]
        victim = int(job["worker"].split(":")[1])
        process = next((p for p in backend.workers if p.pid == victim), None)
        if process is None:
            raise SystemExit(
                f"job {job['id']} is held by {job['worker']}, not by a worker started here"
            )
        os.killpg(process.pid, signal.SIGKILL)  # the worker's whole process group
        killed = time.monotonic()
        process.wait()
        at_kill = backend.job(job["id"])
        print(
            f"job {job['id']} (webhook, task {task['id']}, {len(long_clip)} frames) seen "
            f"running on {job['worker']}; {args.kill_after:g} s later SIGKILL to pid {victim}; "
            f"right after the kill: {at_kill['state']} on {at_kill['worker']}, "
            f"{len(studio.predictions(task['id']))} prediction(s) on the task"
        )
        if at_kill["state"] != "running" or at_kill["worker"] != job["worker"]:
            raise SystemExit(
                "the job was not running on the killed worker: use a longer "
                "--kill-frames or a shorter --kill-after"
            )

        def finished():
            row = backend.job(job["id"])
            return row if row["state"] in ("done", "failed") else None

        row = wait_until(finished, args.drain_timeout, "the killed job was not taken up", poll=0.05)
        to_done = time.monotonic() - killed
        stored = wait_until(
            lambda: studio.predictions(task["id"]), 60, "no prediction stored", poll=0.1
        )
        to_stored = time.monotonic() - killed
        time.sleep(args.lease + 1)  # a late duplicate would show up by now
        stored = studio.predictions(task["id"])
        ours = [p for p in stored if p["model_version"] == version]
        one = (
            len(stored) == 1
            and len(ours) == 1
            and covers_every_frame(ours[0]["result"], len(long_clip))
        )
        taken_over = row["worker"] and int(row["worker"].split(":")[1]) != victim
        print(
            f"job {row['id']}: {row['state']} on {row['worker']} after {row['attempts']} "
            f"attempts; {to_done:.1f} s from the kill to done (lease {args.lease:g} s + "
            f"the rerun), {to_stored:.1f} s to the prediction visible in Label Studio"
        )
        print(
            f"task {task['id']}: {len(stored)} prediction(s) "
            f"{[p['model_version'] for p in stored]}; exactly one of the backend's version "
            f"covering all {len(long_clip)} frames: {'yes' if one else 'NO'}; taken over by "
            f"the other worker: {'yes' if taken_over else 'NO'}"
        )
        return {"to_done": to_done, "to_stored": to_stored, "one": one, "taken_over": taken_over}
    except BaseException:
        print(backend.log_tails())
        raise
    finally:
        backend.stop()


def peak_rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            return int(match.group(1)) / 1024
    return 0.0


# ----- main ----------------------------------------------------------------------------------


def main() -> None:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument(
        "--clip",
        type=Path,
        default=DEFAULT_CLIP,
        help="a folder with frames/*.jpg and masks/*.png (e.g. a DAVIS clip "
        "under /work/shared/data/vos)",
    )
    parser.add_argument(
        "--frames", type=int, default=0, help="use the clip's first N frames (0: all)"
    )
    parser.add_argument(
        "--k",
        default="1,2",
        help="comma-separated numbers of `xmem-label worker` processes; one "
        "load run (fresh project and MODEL_DIR) per number",
    )
    parser.add_argument(
        "--serve-workers",
        type=int,
        default=2,
        help="`xmem-label serve --workers` (web processes, no job threads)",
    )
    parser.add_argument("--predicts", type=int, default=40, help="/predict requests per run")
    parser.add_argument(
        "--concurrency", type=int, default=10, help="/predict requests in flight at once"
    )
    parser.add_argument(
        "--webhooks",
        type=int,
        default=20,
        help="annotations created through Label Studio per run (one webhook each)",
    )
    parser.add_argument(
        "--webhook-concurrency",
        type=int,
        default=4,
        help="annotation requests to Label Studio in flight at once",
    )
    parser.add_argument(
        "--health-interval", type=float, default=0.05, help="seconds between two GET /health"
    )
    parser.add_argument(
        "--lease",
        type=float,
        default=3.0,
        help="XMEM_LABEL_JOB_LEASE of every backend process (seconds)",
    )
    parser.add_argument(
        "--queue",
        type=int,
        default=None,
        help="the backend's --queue (jobs that may wait; None: manifest.yml's 64)",
    )
    parser.add_argument(
        "--sync-seconds",
        type=float,
        default=60.0,
        help="the backend's --sync-seconds (how long /predict waits)",
    )
    parser.add_argument(
        "--kill-frames",
        type=int,
        default=96,
        help="frames of the kill run's clip (the clip repeated): a job long "
        "enough to be killed while it runs",
    )
    parser.add_argument(
        "--kill-after",
        type=float,
        default=1.0,
        help="seconds between seeing the job running and the SIGKILL",
    )
    parser.add_argument("--no-kill", action="store_true", help="skip the kill run")
    queue_choice = parser.add_mutually_exclusive_group()
    queue_choice.add_argument(
        "--queue-url",
        default=None,
        help="run the jobs through RQ on this Redis (emptied before each run) instead of the "
        "embedded journal",
    )
    queue_choice.add_argument(
        "--start-redis",
        action="store_true",
        help="start a private redis-server (loopback, no persistence) and use it as --queue-url",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=240.0,
        help="seconds to wait for the jobs after the requests",
    )
    add_label_studio_options(parser)
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    if args.ls_url and not args.document_root:
        parser.error("--ls-url needs --document-root")
    if min(ks, default=1) < 1 or args.serve_workers < 1 or args.concurrency < 1:
        parser.error("--k, --serve-workers and --concurrency must be at least 1")
    clip = Clip(args.clip, args.frames)

    started = time.monotonic()
    load = os.getloadavg()
    print(
        f"backend load test: clip {args.clip.name}, {len(clip.paths)} frames "
        f"{clip.width}x{clip.height}, engine flow; {args.predicts} /predict + {args.webhooks} "
        f"webhooks per run; K = {ks}; lease {args.lease:g} s; {os.cpu_count()} CPUs, load "
        f"average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    ls_process = redis_process = None
    with tempfile.TemporaryDirectory(prefix="xmem-label-load-") as temporary:
        work = Path(temporary)
        try:
            if args.start_redis:
                redis_process, args.queue_url = devserver.start_redis(work / "redis")
            if args.queue_url:
                print("job back-end: RQ on Redis (--queue-url); workers share no MODEL_DIR")
            if args.ls_url:
                studio = Studio(args.ls_url, args.token, Path(args.document_root).resolve())
            else:
                ls_process, url, media = start_label_studio(args.ls_bin, work / "label-studio")
                studio = Studio(url, TOKEN, media)
                print(f"Label Studio up after {time.monotonic() - started:.0f} s")
            runs = []
            for k in ks:
                (work / f"k{k}").mkdir()
                runs.append(load_run(args, studio, clip, k, work / f"k{k}"))
            killed = None
            if not args.no_kill:
                (work / "kill").mkdir()
                killed = kill_run(args, studio, clip, work / "kill")
        finally:
            if redis_process is not None:
                print(f"redis-server peak RSS (VmHWM): {peak_rss_mb(redis_process.pid):.0f} MB")
            stop(redis_process)
            stop(ls_process)

    print("\n=== summary ===")
    for run in runs:
        health = run["health"]
        health_text = (
            f"/health p50/p99/max {health[0] * 1e3:.0f}/{health[1] * 1e3:.0f}/"
            f"{health[2] * 1e3:.0f} ms"
            if health
            else "/health: no answer"
        )
        print(
            f"K={run['workers']}: {run['rate']:.1f} jobs/min; exactly once: "
            f"{'yes' if run['once'] else 'NO'}; /predict {dict(run['statuses'])}; /webhook "
            f"{run['webhooks']}; {health_text}; peak RSS {run['rss']:.0f} MB"
        )
    if len(runs) > 1 and runs[0]["rate"]:
        print(
            f"K={runs[-1]['workers']} vs K={runs[0]['workers']}: "
            f"{runs[-1]['rate'] / runs[0]['rate']:.2f}x the jobs per minute"
        )
    if killed:
        print(
            f"kill -9 of a worker mid-job: taken over {'yes' if killed['taken_over'] else 'NO'}"
            f", done {killed['to_done']:.1f} s after the kill, prediction visible after "
            f"{killed['to_stored']:.1f} s, exactly one prediction: "
            f"{'yes' if killed['one'] else 'NO'}"
        )
    load = os.getloadavg()
    print(
        f"whole run {time.monotonic() - started:.0f} s; load average now {load[0]:.1f} "
        f"{load[1]:.1f} {load[2]:.1f}"
    )


if __name__ == "__main__":
    main()
