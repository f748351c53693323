"""The HTTP side of the backend: the routes Label Studio 1.23 calls on an ML backend.

    GET  /health, /     {"status": "UP", ...}             (open; touches no engine or journal)
    POST /setup         {"model_version": ...}            (registers the project)
    POST /predict       {"results": [one per task]}       (batch and interactive)
    POST /webhook       201 {"status": "queued", ...}     (annotation created/updated)
    GET  /metrics       job counts and last timings (no URLs, no tokens)
    GET  /versions      {"versions": [...]}

Every route but /health requires HTTP basic auth when credentials are configured (Label
Studio's model connection sends them; its webhook carries them as a custom `Authorization`
header). Bad input is answered with HTTP 4xx and {"error": "<reason>"}; nothing is stored then.
Serve with `xmem-label serve` or `gunicorn 'xmem_label.backend.app:create_app()'`.
"""

from __future__ import annotations

import hmac
import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from xmem_label.model import InputError, WeightsError

from .jobs import QueueFull
from .model import NotPermitted, Runtime, XMemLabelModel, project_key
from .settings import BackendSettings
from .studio import StudioError

log = logging.getLogger(__name__)

OPEN_ROUTES = {"/health", "/"}
RETRY_AFTER_SECONDS = 30


def create_app(runtime: Runtime | None = None) -> Flask:
    """The Flask app; `runtime` defaults to one configured from the environment and started
    (engine loading, job threads)."""
    runtime = runtime or Runtime(BackendSettings.from_environment()).start()
    settings = runtime.settings
    app = Flask(__name__, instance_path=str(settings.state_dir))
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes

    @app.before_request
    def check_basic_auth():
        if settings.basic_auth is None or request.path in OPEN_ROUTES:
            return None
        user, password = settings.basic_auth
        auth = request.authorization
        if (
            auth is None
            or not hmac.compare_digest((auth.username or "").encode(), user.encode())
            or not hmac.compare_digest((auth.password or "").encode(), password.encode())
        ):
            log.warning(
                "refused %s %s from %s: no valid credentials",
                request.method,
                request.path,
                request.remote_addr,
            )
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
        # hostname and access_token in the body are ignored: where the backend connects and
        # which token it uses are the operator's settings only.
        model = XMemLabelModel(runtime, project_key(data.get("project")), _text(data.get("schema")))
        model.setup()
        return jsonify(model_version=model.model_version)

    @app.post("/predict")
    def predict():
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list):
            raise InputError("the request has no task list")
        params = data.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        model = XMemLabelModel(runtime, data.get("project"), _text(data.get("label_config")))
        return jsonify(model.predict(tasks, context=context))

    @app.post("/webhook")
    def webhook():
        data = body()
        event = data.get("action")
        if event not in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            return jsonify(status="ignored", event=str(event)[:64]), 200
        project = data.get("project") or {}
        if not isinstance(project, dict):
            raise InputError("project must be a JSON object")
        # The label config is read back from Label Studio when the job runs; the payload's is
        # only used to refuse an unsupported project at once.
        model = XMemLabelModel(runtime, project, _text(project.get("label_config")))
        return jsonify(model.fit(event, data)), 201

    @app.get("/metrics")
    def metrics():
        return jsonify(
            jobs=runtime.journal.counts(),
            last_timings=(runtime.journal.latest_result() or {}).get("timings", {}),
            engine=runtime.engines.name,
            engine_loaded=runtime.engines.loaded,
        )

    @app.get("/versions")
    def versions():
        return jsonify(versions=[runtime.engines.model_version()])

    @app.errorhandler(InputError)
    def bad_input(exc):
        log.info("refused %s: %s", request.path, exc)
        return jsonify(error=str(exc)), 400

    @app.errorhandler(NotPermitted)
    def not_permitted(exc):
        log.warning("refused %s from %s: %s", request.path, request.remote_addr, exc)
        return jsonify(error=str(exc)), 403

    @app.errorhandler(QueueFull)
    @app.errorhandler(WeightsError)
    def unavailable(exc):
        return jsonify(error=str(exc)), 503, {"Retry-After": str(RETRY_AFTER_SECONDS)}

    if settings.queue_url:
        from redis.exceptions import ConnectionError as QueueDown
        from redis.exceptions import TimeoutError as QueueSlow

        @app.errorhandler(QueueDown)
        @app.errorhandler(QueueSlow)
        def queue_unreachable(exc):
            # Nothing was accepted: the caller retries (the address may hold a password).
            log.error("%s %s: the job queue (Redis) is unreachable", request.method, request.path)
            return (
                jsonify(error="the job queue is unreachable; retry later"),
                503,
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )

    @app.errorhandler(StudioError)
    def studio_failed(exc):
        return jsonify(error=str(exc)), 502

    @app.errorhandler(HTTPException)
    def http_error(exc):  # 404, 405, 413 ... as JSON with the reason, like every other answer
        return jsonify(error=exc.description), exc.code

    return app


def _text(value: object) -> str:
    """A label config from a request: a string, or nothing."""
    return value if isinstance(value, str) else ""
