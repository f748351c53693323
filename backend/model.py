"""The backend's model, shaped like label-studio-ml 2.x's `LabelStudioMLBase`: a fresh instance
per request for one project and label config, with `setup()`, `predict(tasks, context)` and
`fit(event, data)`. What lives across requests (the engine, loaded once per process; the job
queue; what each project's /setup said) is in `Runtime`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from xmem_label.model import Engine, InputError, WeightsError, XMemLabelError, load_engine

from . import formats
from .jobs import Job, JobQueue, QueueFull
from .propagation import Outcome, SequenceRequest, VideoRequest, run_sequence, run_video
from .studio import LabelStudio, StudioError

log = logging.getLogger(__name__)

VERSION = "0.1.0"
TRAINING_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}


class EngineHolder:
    """The propagation engine of this process, loaded on first use (so /health and /setup
    answer at once) and shared by every project."""

    def __init__(self, name: str, **options: Any):
        self.name = name
        self.options = options
        self._engine: Engine | None = None
        self._error: XMemLabelError | None = None
        self._lock = threading.Lock()

    def get(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = load_engine(self.name, **self.options)
            return self._engine

    def warm_up(self) -> None:
        """Start loading in the background (weights read while the first /setup returns)."""
        def load():
            try:
                self.get()
            except XMemLabelError as exc:  # reported again on the first predict
                log.warning("engine %s did not load: %s", self.name, exc)

        threading.Thread(target=load, name="xmem-label-engine-load", daemon=True).start()

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def model_version(self) -> str:
        """`xmem-label-<version>-<engine>-<checkpoint>-<settings digest>` once loaded (the digest
        covers engine.describe(): weights' sha256 and every setting); before that, a
        provisional `...-<engine>-loading`."""
        if self._engine is None:
            return f"xmem-label-{VERSION}-{self.name}-loading"
        description = self._engine.describe()
        weights = description.get("weights")
        checkpoint = Path(weights).stem if weights else "no-weights"
        digest = hashlib.sha256(
            json.dumps(description, sort_keys=True, default=str).encode()
        ).hexdigest()[:8]
        return f"xmem-label-{VERSION}-{description.get('engine', self.name)}-{checkpoint}-{digest}"


class Runtime:
    """Process-wide state: engine, job queue, per-project connection details, counters."""

    def __init__(
        self,
        engine: str = "xmem",
        workers: int = 1,
        queue_capacity: int = 16,
        sync_seconds: float = 60.0,
    ):
        self.engines = EngineHolder(engine)
        self.jobs = JobQueue(workers=workers, capacity=queue_capacity)
        self.sync_seconds = sync_seconds
        self.connections: dict[str, tuple[str | None, str | None]] = {}
        self.configs: dict[tuple[str, str], formats.ProjectConfig] = {}
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_environment(cls) -> Runtime:
        return cls(
            engine=os.environ.get("XMEM_LABEL_ENGINE", "xmem"),
            workers=int(os.environ.get("XMEM_LABEL_JOB_THREADS", "1")),
            queue_capacity=int(os.environ.get("XMEM_LABEL_QUEUE", "16")),
            sync_seconds=float(os.environ.get("XMEM_LABEL_SYNC_SECONDS", "60")),
        )

    def studio(self, project_id: str | None) -> LabelStudio:
        hostname, token = self.connections.get(str(project_id), (None, None))
        return LabelStudio.from_environment(hostname, token)


def project_key(project: Any) -> str:
    """Label Studio sends the project as "<id>.<created timestamp>" to /predict and /setup and
    as an object to /webhook; the id identifies it."""
    if isinstance(project, dict):
        project = project.get("id")
    return str(project or "").split(".")[0]


class XMemLabelModel:
    """One project's view of the backend (the LabelStudioMLBase 2.x class shape)."""

    def __init__(self, runtime: Runtime, project_id: Any, label_config: str):
        self.runtime = runtime
        self.project_id = project_key(project_id)
        self.label_config = label_config
        # Keyed by project and config hash: a project whose config changed gets a fresh parse,
        # and no project is ever answered with another's config.
        key = (self.project_id, hashlib.sha256((label_config or "").encode()).hexdigest())
        if key not in runtime.configs:
            runtime.configs[key] = formats.parse_label_config(label_config)
        self.config = runtime.configs[key]
        self.setup()

    def setup(self) -> None:
        self.model_version = self.runtime.engines.model_version()

    # ----- predict ------------------------------------------------------------------------------

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> dict:
        """One prediction per task, same order; a task whose propagation outlasts the sync
        window (or failed) gets [] and, when done, its prediction is stored through the API.

        Returns {"results": [...], "errors": [...]}. Raises InputError when no task can be
        predicted (every reason joined), so nothing is stored.
        """
        if not tasks:
            raise InputError("the request has no tasks")
        if context and context.get("result") and isinstance(self.config, formats.VideoConfig):
            raise InputError("video projects take keyframes from submitted annotations only")
        errors: list[dict] = []
        jobs: list[tuple[dict, Job | None]] = []
        busy = None
        for task in tasks:
            try:
                work = self._work_for(task, context)
                job = self.runtime.jobs.submit(f"task {task.get('id')}", work)
            except (XMemLabelError, QueueFull) as exc:
                busy = exc if isinstance(exc, QueueFull) else busy
                errors.append({"task": task.get("id"), "reason": str(exc)})
                jobs.append((task, None))
                continue
            jobs.append((task, job))
        if all(job is None for _, job in jobs):
            if busy is not None:
                raise busy  # 503: retry later
            raise InputError("; ".join(f"task {e['task']}: {e['reason']}" for e in errors))

        deadline = time.monotonic() + self.runtime.sync_seconds
        results, queued = [], 0
        for task, job in jobs:
            results.append([])
            if job is None:
                continue
            finished = job.wait(max(0.0, deadline - time.monotonic()))
            if not finished and job.hand_over(self._store_for(task.get("id"))):
                queued += 1
                errors.append({"task": task.get("id"), "reason": "still running: stored when done"})
            elif isinstance(job.error, WeightsError):
                raise job.error  # the server cannot predict at all: 503
            elif isinstance(job.error, (XMemLabelError, StudioError)):
                errors.append({"task": task.get("id"), "reason": str(job.error)})
            elif job.error is not None:
                raise job.error
            else:
                self._note(job.result)
                results[-1] = job.result.prediction
        if not queued and all(result == [] for result in results):
            raise InputError("; ".join(f"task {e['task']}: {e['reason']}" for e in errors))
        return {"results": results, "errors": errors}

    def _work_for(self, task: dict, context: dict | None):
        """Check a task's input now (so bad input is refused before anything runs) and return
        the propagation to run in the background."""
        config = self.config
        media = formats.task_media(task, config)
        task_id = task.get("id")
        studio = self.runtime.studio(self.project_id)
        if isinstance(config, formats.SequenceConfig):
            prompts = formats.prompts_from_context(context, config) if context else []
            if prompts:
                request = SequenceRequest(task_id, media, prompts=prompts)
            else:
                request = SequenceRequest(task_id, media, keyframes=self._task_keyframes(task))
            return lambda: run_sequence(request, config, self.runtime.engines.get(), studio,
                                        self.runtime.engines.model_version())
        annotation = formats.latest_annotation(task)
        if annotation is None:
            raise InputError(f"no keyframe: task {task_id} has no submitted annotation")
        results = annotation.get("result") or []
        if not any(r.get("from_name") == config.box_name for r in results):
            raise InputError(f"no keyframe: the annotation has no {config.box_name} box")
        request = VideoRequest(task_id, media, results)
        return lambda: run_video(request, config, self.runtime.engines.get(), studio,
                                 self.runtime.engines.model_version())

    def _task_keyframes(self, task: dict) -> formats.BrushKeyframes:
        annotation = formats.latest_annotation(task)
        if annotation is None:
            raise InputError(f"no keyframe: task {task.get('id')} has no submitted annotation")
        frames = formats.task_media(task, self.config)
        return formats.brush_keyframes(annotation.get("result") or [], self.config, len(frames))

    def _store_for(self, task_id: int):
        studio = self.runtime.studio(self.project_id)

        def store(outcome: Outcome) -> None:
            studio.store_prediction(task_id, outcome.prediction)
            self._note(outcome)
            log.info("task %s: prediction stored (%s)", task_id, outcome.timings.as_dict())

        return store

    def _note(self, outcome: Outcome) -> None:
        self.runtime.last_timings = outcome.timings.as_dict()

    # ----- fit (webhook) ------------------------------------------------------------------------

    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """On a submitted or updated annotation, re-propagate from it in the background and
        store the prediction through the API. Other events are acknowledged and ignored.

        The task and annotation are read back from Label Studio (the webhook carries no
        credentials, so its payload only says which task to look at); the payload itself is
        checked first so bad input is refused at once.
        """
        if event not in TRAINING_EVENTS:
            return {"status": "ignored", "event": event}
        task, annotation = data.get("task") or {}, data.get("annotation") or {}
        task_id, annotation_id = task.get("id"), annotation.get("id")
        if task_id is None or annotation_id is None:
            raise InputError(f"{event} without task or annotation id")
        self._work_for({**task, "annotations": [annotation]}, None)  # validates, runs nothing
        studio = self.runtime.studio(self.project_id)

        def work() -> Outcome:
            fresh = studio.task(task_id)
            fresh["annotations"] = [studio.call("GET", f"/api/annotations/{annotation_id}").json()]
            return self._work_for(fresh, None)()

        self.runtime.jobs.submit(f"task {task_id} ({event})", work, store=self._store_for(task_id))
        return {"status": "queued", "task": task_id}
