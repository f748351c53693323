"""The backend's model, shaped like label-studio-ml 2.x's `LabelStudioMLBase`: a fresh instance
per request for one project and label config, with `setup()`, `predict(tasks, context)` and
`fit(event, data)`. What lives across requests (settings, the Label Studio client, the engine
loaded once per process, the job journal and its runner) is in `Runtime`.

Every propagation is a job in the journal, recorded before the request is answered:
`/predict` waits for its jobs up to `sync_seconds` and then leaves them to be stored through
the API; a webhook's job is always stored that way. Request bodies are hints: a webhook names a
task and an annotation, and the job reads both back from the configured Label Studio.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from xmem_label.model import Engine, InputError, XMemLabelError, load_engine

from . import formats
from .jobs import JobRunner, JobStore, QueueFull, estimate_job_bytes, job_shape
from .journal import JobRecord, Journal
from .propagation import SequenceRequest, VideoRequest, run_sequence, run_video
from .settings import BackendSettings
from .studio import EncodedPrediction, LabelStudio, StudioError, encode

log = logging.getLogger(__name__)

VERSION = "0.1.0"
TRAINING_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}


class NotPermitted(Exception):
    """The request names something this backend does not serve (HTTP 403)."""


class EngineHolder:
    """The propagation engine of this process, loaded once at start in the background (so
    /health answers at once) and shared by every project. Its model version is known only once
    it is loaded, and never changes afterwards, restarts included."""

    def __init__(self, name: str, **options: Any):
        self.name = name
        self.options = options
        self._engine: Engine | None = None
        self._error: XMemLabelError | None = None
        self._lock = threading.Lock()

    def get(self) -> Engine:
        with self._lock:
            if self._engine is None:
                if self._error is not None:
                    raise self._error
                try:
                    self._engine = load_engine(self.name, **self.options)
                except XMemLabelError as exc:
                    self._error = exc
                    raise
            return self._engine

    def warm_up(self) -> None:
        """Start loading in the background."""

        def load():
            try:
                self.get()
            except XMemLabelError as exc:  # reported on every request that needs the engine
                log.warning("engine %s did not load: %s", self.name, exc)

        threading.Thread(target=load, name="xmem-label-engine-load", daemon=True).start()

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def model_version(self) -> str:
        """`xmem-label-<version>-<engine>-<checkpoint>-<settings digest>` (the digest covers
        engine.describe(): weights' sha256 and every setting). Waits for the engine to load."""
        description = self.get().describe()
        checkpoint = Path(description.weights).stem if description.weights else "no-weights"
        digest = _digest(description.as_dict())[:8]
        return f"xmem-label-{VERSION}-{description.engine}-{checkpoint}-{digest}"


class Runtime:
    """Process-wide state: settings, Label Studio, engine, journal, job runner."""

    def __init__(self, settings: BackendSettings, *, job_threads: int | None = None):
        self.settings = settings
        self.studio = LabelStudio(settings)
        self.engines = EngineHolder(settings.engine)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        # The job store: the embedded SQLite journal (one machine, no server), or RQ on Redis
        # (XMEM_LABEL_QUEUE_URL: web replicas and workers on any hosts). Both offer the same
        # calls, and both run jobs through jobs.run_job.
        self.journal: JobStore
        if settings.queue_url:
            from .queues import RedisQueue  # rq and redis are needed only then

            self.journal = RedisQueue(
                settings.queue_url,
                lease_seconds=settings.job_lease_seconds,
                max_attempts=settings.job_attempts,
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
            )
            job_threads = 0  # jobs run in `xmem-label worker` processes (queues.run_worker)
        else:
            self.journal = Journal(
                settings.journal_path,
                lease_seconds=settings.job_lease_seconds,
                max_attempts=settings.job_attempts,
            )
        # /predict requests that may wait for their jobs at once: the other HTTP threads stay
        # free for /health and for requests that answer at once.
        self.reply_slots = threading.BoundedSemaphore(max(1, settings.http_threads - 2))
        self.runner = JobRunner(
            self.journal,
            self.execute,
            self.store,
            self.report,
            threads=settings.job_threads if job_threads is None else job_threads,
            memory_budget=settings.job_memory_bytes,
        )

    def start(self) -> Runtime:
        self.engines.warm_up()
        self.runner.start()
        return self

    def job_memory(self, regions: list, frames: int | None) -> int:
        """A job's estimated peak memory (bytes) for admission under the budget, from the
        regions a person gave and the task's frame count (see jobs.estimate_job_bytes)."""
        precision = self.engines.options.get("precision", "fp32")
        return estimate_job_bytes(self.engines.name, precision, job_shape(regions, frames))

    # ----- jobs (called by the runner, in any process sharing the journal) ---------------------

    def execute(self, record: JobRecord) -> dict[str, Any]:
        """Run a job; for a webhook, return {"superseded": ...} instead of a prediction when
        the annotation changed while it ran (the newer version's own job stores its result,
        so an older result never replaces a newer one).

        A job nobody waits for stores a first batch of frames while the rest propagates
        (`run_sequence`'s first_batch); it is replaced by the job's prediction, and withdrawn
        when the job is superseded or fails."""
        first_batches: list[int] = []
        try:
            result = self._execute(record, first_batches)
        except BaseException:
            self._withdraw(first_batches)
            raise
        if "superseded" in result:
            self._withdraw(first_batches)
        return result

    def _execute(self, record: JobRecord, first_batches: list[int]) -> dict[str, Any]:
        payload = record.payload
        if record.kind == "webhook":
            project = self.studio.project(payload["project"])
            task = self.studio.task(payload["project"], payload["task"])
            if task is None:
                raise InputError(f"task {payload['task']} is not in project {payload['project']}")
            # The export holds the task's annotations: no read of its own for this one.
            annotation = next(
                (a for a in task.get("annotations") or [] if a.get("id") == payload["annotation"]),
                None,
            )
            if annotation is None:
                raise InputError(
                    f"annotation {payload['annotation']} of task {payload['task']} no longer exists"
                )
            task["annotations"] = [annotation]

            def current() -> bool:
                now = self.studio.annotation(payload["annotation"])
                return now is not None and now.get("updated_at") == annotation.get("updated_at")

            model = XMemLabelModel(self, record.project, project.get("label_config") or "")
            first_batch = self._first_batch(record, task, first_batches, current)
            outcome = model.propagation(task, None, first_batch)()
            prediction = encoded_if_current(outcome.prediction, current)
            if prediction is None:
                return {"superseded": payload["annotation"], "timings": outcome.timings.as_dict()}
            return {"prediction": prediction, "timings": outcome.timings.as_dict()}
        model = XMemLabelModel(self, record.project, payload["label_config"])
        first_batch = self._first_batch(record, payload["task"], first_batches, lambda: True)
        outcome = model.propagation(payload["task"], payload["context"], first_batch)()
        return {"prediction": outcome.prediction, "timings": outcome.timings.as_dict()}

    def _first_batch(
        self, record: JobRecord, task: dict, stored: list[int], current: Callable[[], bool]
    ) -> Callable[[dict], None] | None:
        """Store a first batch on a task that has no prediction yet (a correction keeps showing
        the previous one), when no request waits for the job (a waiting /predict answers with
        the whole) and its input is still current; its id goes to `stored`. A failure to store
        it is only logged: the job's prediction is what counts."""
        if task.get("predictions"):  # ids in Label Studio's export, objects elsewhere
            return None

        def store_first_batch(prediction: dict) -> None:
            if record.task_id is None or self.journal.get(record.id).deliver != "store":
                return
            try:
                if current():
                    stored.append(self.studio.create_prediction(record.task_id, prediction))
            except StudioError as exc:
                log.warning("task %s: first batch not stored: %s", record.task_id, exc)

        return store_first_batch

    def _withdraw(self, first_batches: list[int]) -> None:
        for prediction_id in first_batches:
            try:
                self.studio.delete_prediction(prediction_id)
            except StudioError as exc:
                log.warning("first batch %s not withdrawn: %s", prediction_id, exc)

    def store(self, record: JobRecord, result: dict[str, Any]) -> dict[str, Any]:
        """Store a finished job's prediction on its task; returns what the journal keeps."""
        if "superseded" in result:
            log.info(
                "task %s: annotation %s changed while its job ran; the newer job stores",
                record.task_id,
                result["superseded"],
            )
            return result
        prediction_id = self.studio.store_prediction(record.task_id, result["prediction"])
        log.info(
            "task %s: prediction %s stored (%s)", record.task_id, prediction_id, result["timings"]
        )
        return {"prediction_id": prediction_id, "timings": result["timings"]}

    def report(self, record: JobRecord, reason: str) -> None:
        """A failed job's reason, stored on its task (see LabelStudio.store_failure)."""
        if record.task_id is None:
            return
        label_config = record.payload.get("label_config")
        if label_config is None:
            label_config = self.studio.project(record.payload["project"]).get("label_config")
        try:
            config = formats.parse_label_config(label_config or "")
        except InputError:
            config = None
        self.studio.store_failure(
            record.task_id,
            reason,
            config.status_name if config else None,
            config.media_name if config else None,
        )


def encoded_if_current(prediction: dict, current: Callable[[], bool]) -> EncodedPrediction | None:
    """`prediction` encoded for storing, or None when `current()` says its annotation changed
    meanwhile. Label Studio answers the check while this thread encodes, so the two take the
    time of the longer (about 20 ms each for 100 frames at 854x480) instead of their sum,
    and the check still comes last before the prediction is stored."""
    with ThreadPoolExecutor(1, thread_name_prefix="xmem-label-check") as pool:
        checking = pool.submit(current)
        encoded = encode(prediction)
        return encoded if checking.result() else None


def project_key(project: Any) -> str:
    """Label Studio sends the project as "<id>.<created timestamp>" to /predict and /setup and
    as an object to /webhook; the id identifies it."""
    if isinstance(project, dict):
        project = project.get("id")
    return str(project or "").split(".")[0]


def _id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{what} must be a non-negative integer id")
    return value


def _digest(value: Any) -> str:
    """sha256 of a JSON value (keys sorted), for model versions and idempotency keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class XMemLabelModel:
    """One project's view of the backend (the LabelStudioMLBase 2.x class shape)."""

    def __init__(self, runtime: Runtime, project_id: Any, label_config: str):
        self.runtime = runtime
        self.project_id = project_key(project_id)
        self.label_config = label_config
        # Parsed per config text (cached in formats): a project whose config changed gets a
        # fresh parse, and no project is answered with another's config.
        self.config = formats.parse_label_config(label_config)
        self.model_version = ""

    def setup(self) -> None:
        """Remember that this project connected (its webhooks are accepted from now on)."""
        self.runtime.journal.register_project(self.project_id)
        self.model_version = self.runtime.engines.model_version()

    # ----- predict ------------------------------------------------------------------------------

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> dict:
        """One prediction per task, same order; a task whose propagation outlasts the sync
        window gets [] and, when done, its prediction is stored through the API.

        Returns {"results": [...], "errors": [...]}. Raises InputError when no task can be
        predicted (every reason joined), so nothing is stored.
        """
        if not tasks:
            raise InputError("the request has no tasks")
        if not all(isinstance(task, dict) for task in tasks):
            raise InputError("every task must be a JSON object")
        if context is not None and not isinstance(context, dict):
            raise InputError("params.context must be a JSON object")
        journal = self.runtime.journal
        capacity = self.runtime.settings.max_queued_jobs
        if journal.counts()["queued"] + len(tasks) > capacity:
            raise QueueFull(f"the backend is busy ({capacity} propagations waiting); retry later")
        version = self.runtime.engines.model_version()  # raises WeightsError: 503
        errors: list[dict] = []
        records: list[JobRecord | None] = []
        for task in tasks:
            try:
                self.propagation(task, context)  # checks the input now; runs nothing
                task_id = task.get("id")
                key = "predict:" + _digest(
                    [
                        self.project_id,
                        task_id,
                        self.label_config,
                        version,
                        task.get("data"),
                        task.get("annotations"),
                        context,
                    ]
                )
                payload = {"label_config": self.label_config, "task": task, "context": context}
                record, _ = journal.submit(
                    key,
                    "predict",
                    self.project_id,
                    task_id if isinstance(task_id, int) else None,
                    payload,
                    "reply",
                    memory=self._job_memory(task, context),
                )
            except XMemLabelError as exc:
                errors.append({"task": task.get("id"), "reason": str(exc)})
                record = None
            records.append(record)
        if all(record is None for record in records):
            raise InputError("; ".join(f"task {e['task']}: {e['reason']}" for e in errors))

        may_wait = self.runtime.reply_slots.acquire(blocking=False)
        try:
            deadline = time.monotonic() + (self.runtime.settings.sync_seconds if may_wait else 0)
            results, answered_elsewhere = [], 0
            for task, record in zip(tasks, records, strict=True):
                results.append([])
                if record is None:
                    continue
                record = journal.wait(record.id, max(0.0, deadline - time.monotonic()))
                if record.state in ("queued", "running") and journal.hand_over(record.id):
                    answered_elsewhere += 1
                    errors.append(
                        {"task": task.get("id"), "reason": "still running: stored when done"}
                    )
                    continue
                record = journal.get(record.id)
                if record.state == "failed":
                    errors.append({"task": task.get("id"), "reason": record.error})
                elif record.result and "prediction" in record.result:
                    results[-1] = record.result["prediction"]
                else:  # the same request came before and its result went through the API
                    answered_elsewhere += 1
                    errors.append(
                        {"task": task.get("id"), "reason": "already stored through the API"}
                    )
        finally:
            if may_wait:
                self.runtime.reply_slots.release()
        if not answered_elsewhere and all(result == [] for result in results):
            raise InputError("; ".join(f"task {e['task']}: {e['reason']}" for e in errors))
        return {"results": results, "errors": errors}

    def propagation(
        self, task: dict, context: dict | None, first_batch: Callable[[dict], None] | None = None
    ):
        """Check a task's input now (so bad input is refused before anything runs) and return
        the propagation to run (`first_batch`: see run_sequence)."""
        config = self.config
        media = formats.task_media(task, config)
        task_id = task.get("id")
        runtime = self.runtime
        if isinstance(config, formats.SequenceConfig):
            prompts = formats.prompts_from_context(context, config) if context else []
            if prompts:
                request = SequenceRequest(task_id, media, prompts=prompts)
            else:
                request = SequenceRequest(task_id, media, keyframes=self._task_keyframes(task))
            return lambda: run_sequence(
                request,
                config,
                runtime.engines.get(),
                runtime.studio,
                runtime.engines.model_version(),
                first_batch=first_batch,
            )
        if context and context.get("result"):
            raise InputError("video projects take keyframes from submitted annotations only")
        annotation = formats.latest_annotation(task)
        if annotation is None:
            raise InputError(f"no keyframe: task {task_id} has no submitted annotation")
        results = annotation.get("result") or []
        if not any(r.get("from_name") == config.box_name for r in results):
            raise InputError(f"no keyframe: the annotation has no {config.box_name} box")
        request = VideoRequest(task_id, media, results)
        return lambda: run_video(
            request, config, runtime.engines.get(), runtime.studio, runtime.engines.model_version()
        )

    def _job_memory(self, task: dict, context: dict | None) -> int:
        """The estimate of a /predict job (checked input): from its keyframes or prompts."""
        annotation = formats.latest_annotation(task) or {}
        regions = [
            region
            for given in (annotation.get("result"), (context or {}).get("result"))
            if isinstance(given, list)
            for region in given
        ]
        media = formats.task_media(task, self.config)
        return self.runtime.job_memory(regions, len(media) if isinstance(media, list) else None)

    def _task_keyframes(self, task: dict) -> formats.BrushKeyframes:
        annotation = formats.latest_annotation(task)
        if annotation is None:
            raise InputError(f"no keyframe: task {task.get('id')} has no submitted annotation")
        frames = formats.task_media(task, self.config)
        return formats.brush_keyframes(annotation.get("result") or [], self.config, len(frames))

    # ----- fit (webhook) ------------------------------------------------------------------------

    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """On a submitted or updated annotation, queue a re-propagation whose prediction is
        stored through the API. The payload only names the task and annotation: they must
        belong together and to a project that connected to this backend, as Label Studio
        itself says; anything else is refused."""
        if event not in TRAINING_EVENTS:
            return {"status": "ignored", "event": event}
        project_id = _id((data.get("project") or {}).get("id"), "project.id")
        task_id = _id((data.get("task") or {}).get("id"), "task.id")
        annotation_id = _id((data.get("annotation") or {}).get("id"), "annotation.id")
        journal = self.runtime.journal
        if not journal.is_project_registered(str(project_id)):
            raise NotPermitted(f"project {project_id} is not connected to this backend")
        studio = self.runtime.studio
        annotation = studio.annotation(annotation_id)
        if annotation is None or annotation.get("task") != task_id:
            belongs = False
        elif annotation.get("project") is not None:  # Label Studio names its project
            belongs = annotation["project"] == project_id
        else:
            belongs = studio.task(project_id, task_id) is not None
        if not belongs:
            raise NotPermitted(
                f"annotation {annotation_id} is not an annotation of task "
                f"{task_id} in project {project_id}"
            )
        key = (
            f"webhook:{project_id}:{task_id}:{annotation_id}:"
            f"{annotation.get('updated_at') or annotation.get('created_at')}"
        )
        payload = {"project": project_id, "task": task_id, "annotation": annotation_id}
        regions = annotation.get("result")
        memory = self.runtime.job_memory(regions if isinstance(regions, list) else [], None)
        record, created = journal.submit(
            key, "webhook", str(project_id), task_id, payload, "store", memory=memory
        )
        return {
            "status": "queued" if created else "already queued",
            "task": task_id,
            "job": record.id,
        }
