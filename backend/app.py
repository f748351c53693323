"""The HTTP side of the backend: the routes Label Studio 1.23 calls on an ML backend.

    GET  /health, /     {"status": "UP", ...}             (no engine load: answers at once)
    POST /setup         {"model_version": ...}            (remembers hostname + token)
    POST /predict       {"results": [one per task]}       (batch and interactive)
    POST /webhook       201 {"status": "queued"|"ignored"} (annotation created/updated)
    GET  /metrics       job queue and last timings
    GET  /versions      {"versions": [...]}

Bad input is answered with HTTP 4xx and {"error": "<reason>"}; nothing is stored then.
Serve with `xmem-label serve` or `gunicorn 'xmem_label.backend.app:create_app()'`.
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile

from flask import Flask, jsonify, request

from xmem_label.model import InputError, WeightsError

from .jobs import QueueFull
from .model import Runtime, XMemLabelModel, project_key
from .studio import StudioError

log = logging.getLogger(__name__)

# Label Studio's auto-created webhook sends no credentials (label_studio/ml/models.py), so
# /webhook stays open unless asked; it only makes the backend re-read a task from the API.
OPEN_ROUTES = {"/webhook"}


def create_app(runtime: Runtime | None = None) -> Flask:
    """The Flask app; `runtime` defaults to one configured from the environment."""
    runtime = runtime or Runtime.from_environment()
    # instance_path given: Flask cannot locate it for a module of the xmem_label namespace.
    app = Flask(__name__, instance_path=os.environ.get("MODEL_DIR") or tempfile.gettempdir())
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    open_routes = set() if os.environ.get("XMEM_LABEL_WEBHOOK_AUTH") == "1" else OPEN_ROUTES

    @app.before_request
    def check_basic_auth():
        if not user or not password or request.path in open_routes:
            return None
        auth = request.authorization
        if (
            auth is None
            or not hmac.compare_digest(auth.username or "", user)
            or not hmac.compare_digest(auth.password or "", password)
        ):
            reply = jsonify(error="basic auth required")
            reply.status_code = 401
            reply.headers["WWW-Authenticate"] = 'Basic realm="xmem-label"'
            return reply
        return None

    def body() -> dict:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise InputError("the request body must be a JSON object")
        return data

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(
            status="UP",
            model_class="XMemLabelModel",
            engine=runtime.engines.name,
            engine_loaded=runtime.engines.loaded,
        )

    @app.post("/setup")
    def setup():
        data = body()
        project = project_key(data.get("project"))
        runtime.connections[project] = (data.get("hostname"), data.get("access_token"))
        model = XMemLabelModel(runtime, project, data.get("schema") or "")
        if not runtime.engines.loaded:
            runtime.engines.warm_up()
        return jsonify(model_version=model.model_version)

    @app.post("/predict")
    def predict():
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list):
            raise InputError("the request has no task list")
        context = (data.get("params") or {}).get("context")
        model = XMemLabelModel(runtime, data.get("project"), data.get("label_config") or "")
        return jsonify(model.predict(tasks, context=context))

    @app.post("/webhook")
    def webhook():
        data = body()
        event = data.get("action")
        project = data.get("project") or {}
        if event not in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            return jsonify(status="ignored", event=event), 200
        model = XMemLabelModel(runtime, project, project.get("label_config") or "")
        return jsonify(model.fit(event, data)), 201

    @app.get("/metrics")
    def metrics():
        return jsonify(
            jobs=runtime.jobs.stats(),
            last_timings=runtime.last_timings,
            engine=runtime.engines.name,
            model_version=runtime.engines.model_version(),
        )

    @app.get("/versions")
    def versions():
        return jsonify(versions=[runtime.engines.model_version()])

    @app.errorhandler(InputError)
    def bad_input(exc):
        log.info("refused: %s", exc)
        return jsonify(error=str(exc)), 400

    @app.errorhandler(QueueFull)
    @app.errorhandler(WeightsError)
    def unavailable(exc):
        return jsonify(error=str(exc)), 503

    @app.errorhandler(StudioError)
    def studio_failed(exc):
        return jsonify(error=str(exc)), 502

    return app
