"""`xmem-label serve` (the ML backend under gunicorn) and `xmem-label import-videos` (video
files -> image-sequence tasks). Registered through setup.py's `xmem_label.commands` entry points.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import cv2
from gunicorn.app.base import BaseApplication

from xmem_label.model import InputError, open_frames
from xmem_label.model.allocator import keep_freed_memory
from xmem_label.model.engine import registered_engines

from . import formats
from .model import Runtime
from .settings import BackendSettings
from .studio import LabelStudio, StudioError

JPEG_QUALITY = 92


# ----- serve -----------------------------------------------------------------------------------


class _Gunicorn(BaseApplication):
    """gunicorn embedded: `xmem-label serve` is the same server as the gunicorn command line."""

    def __init__(self, options: dict):
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from .app import create_app

        return create_app()


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the Label Studio ML backend",
        description="Run the Label Studio ML backend (routes /health /setup /predict /webhook "
        "/metrics). Environment: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, BASIC_AUTH_USER, "
        "BASIC_AUTH_PASS, MODEL_DIR (see backend/README.md).",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other address "
        "needs BASIC_AUTH_USER and BASIC_AUTH_PASS)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")))
    _add_engine_options(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes; each loads its own engine (default 1)",
    )
    parser.add_argument("--threads", type=int, default=8, help="HTTP threads per process")
    parser.add_argument(
        "--sync-seconds",
        type=float,
        default=60.0,
        help="how long /predict waits before storing results through the API "
        "instead (Label Studio gives up after 100 s)",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="listen on a non-loopback address without credentials: anyone "
        "who reaches the port can run jobs with the backend's Label Studio token",
    )
    parser.set_defaults(run=_serve)


def add_worker_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run the Label Studio backend's jobs without serving HTTP",
        description="Take propagation jobs from the backend's job journal (MODEL_DIR) or, with "
        "--queue-url, from the Redis queue (any host), and run them; use beside `xmem-label "
        "serve --job-threads 0` (or serve with the same --queue-url).",
    )
    _add_engine_options(parser)
    parser.set_defaults(run=_worker)


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=tuple(registered_engines()),
        default=os.environ.get("XMEM_LABEL_ENGINE", "xmem"),
    )
    parser.add_argument(
        "--job-threads",
        type=int,
        default=None,
        help="most propagations run at once per process, each on cores / job-threads torch "
        "threads (default 1 with XMem, the cores with other engines; 0 in serve: leave them to "
        "`xmem-label worker` processes); fewer run when their memory estimates exceed "
        "--job-memory",
    )
    parser.add_argument(
        "--job-memory",
        default=None,
        help="memory budget of the propagations running at once on this machine: MB, or a "
        "percentage of the memory available at start (default $XMEM_LABEL_JOB_MEMORY, else "
        "manifest.yml's, 75%%); a job estimated above it runs alone",
    )
    parser.add_argument(
        "--queue",
        type=int,
        default=None,
        help="jobs that may wait; more are refused with 503 (default from manifest.yml)",
    )
    parser.add_argument(
        "--queue-url",
        default=None,
        help="Redis address of the job queue shared by web and worker processes on any hosts "
        "(redis://[:password@]host:6379/0; default $XMEM_LABEL_QUEUE_URL, else the embedded "
        "SQLite journal in MODEL_DIR, for one machine)",
    )


def _configure(args: argparse.Namespace, *, minimum_job_threads: int) -> BackendSettings:
    """The process's settings: the command's flags become the environment every gunicorn
    worker reads (settings.py), so the flags and the variables are one configuration."""
    keep_freed_memory()  # before gunicorn forks and threads start (see allocator.py)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] %(message)s")
    os.environ["XMEM_LABEL_ENGINE"] = args.engine
    if args.job_threads is not None:
        os.environ["XMEM_LABEL_JOB_THREADS"] = str(args.job_threads)
    if args.job_memory is not None:
        os.environ["XMEM_LABEL_JOB_MEMORY"] = args.job_memory
    if args.queue is not None:
        os.environ["XMEM_LABEL_QUEUE"] = str(args.queue)
    if args.queue_url is not None:
        os.environ["XMEM_LABEL_QUEUE_URL"] = args.queue_url
    settings = BackendSettings.from_environment()
    if settings.job_threads < minimum_job_threads:
        raise InputError(f"--job-threads must be at least {minimum_job_threads}")
    return settings


def _serve(args: argparse.Namespace) -> int:
    for name, value in (("workers", args.workers), ("threads", args.threads)):
        if value < 1:
            raise InputError(f"--{name} must be at least 1")
    os.environ["XMEM_LABEL_SYNC_SECONDS"] = str(args.sync_seconds)
    os.environ["XMEM_LABEL_HTTP_THREADS"] = str(args.threads)
    settings = _configure(args, minimum_job_threads=0)
    if settings.basic_auth is None:
        if not _is_loopback(args.host) and not args.insecure_no_auth:
            raise InputError(
                f"refusing to listen on {args.host} without credentials: set BASIC_AUTH_USER "
                "and BASIC_AUTH_PASS (and the same in Label Studio's model connection), or "
                "listen on 127.0.0.1"
            )
        print(
            f"xmem-label: no credentials set (BASIC_AUTH_USER, BASIC_AUTH_PASS): every route "
            f"is open to whoever reaches {args.host}:{args.port}",
            file=sys.stderr,
        )
    if settings.queue_url:
        print(
            "xmem-label: jobs go to the Redis queue; `xmem-label worker` processes with the "
            "same --queue-url run them (this server runs none)",
            file=sys.stderr,
        )
    if not settings.label_studio_url or not settings.api_key:
        print(
            "xmem-label: LABEL_STUDIO_URL or LABEL_STUDIO_API_KEY is not set: the backend "
            "cannot fetch media over HTTP, read webhook tasks or store predictions",
            file=sys.stderr,
        )
    _Gunicorn(
        {
            "bind": f"{args.host}:{args.port}",
            "workers": args.workers,
            "threads": args.threads,
            "worker_class": "gthread",
            "timeout": int(args.sync_seconds) + 60,
            "accesslog": "-",
            "control_socket_disable": True,  # several backends may run on one machine
        }
    ).run()
    return 0


def _worker(args: argparse.Namespace) -> int:
    settings = _configure(args, minimum_job_threads=1)
    if settings.queue_url:
        if args.job_threads not in (None, 1):
            raise InputError("with --queue-url a worker runs one job at a time: start more workers")
        from .queues import run_worker

        runtime = Runtime(settings).start()
        print("xmem-label worker: taking jobs from the Redis queue", file=sys.stderr)
        run_worker(runtime)  # until SIGTERM / SIGINT; RQ lets the running job finish
        return 0
    runtime = Runtime(settings).start()
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    print(
        f"xmem-label worker: {settings.job_threads} job thread(s) on {settings.journal_path}",
        file=sys.stderr,
    )
    stopping.wait()
    runtime.runner.stop()  # a job still running is taken up again when its lease expires
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


# ----- connect -----------------------------------------------------------------------------


def add_connect_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "connect",
        help="connect a Label Studio project to this backend, with credentials",
        description="Add the backend to a project's Model settings with basic auth "
        "(BASIC_AUTH_USER, BASIC_AUTH_PASS), and give the webhook Label Studio creates for it "
        "the same credentials as a header, since Label Studio sends webhooks without them.",
    )
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument(
        "--backend-url", required=True, help="the backend's address as Label Studio reaches it"
    )
    parser.add_argument("--title", default="xmem-label")
    _add_studio_options(parser)
    parser.set_defaults(run=_connect)


def _add_studio_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("LABEL_STUDIO_URL"),
        help="Label Studio address (default: $LABEL_STUDIO_URL)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("LABEL_STUDIO_API_KEY"),
        help="API token (default: $LABEL_STUDIO_API_KEY)",
    )


def _studio(args: argparse.Namespace) -> LabelStudio:
    """The Label Studio named by --url / --token (or their environment variables)."""
    if not args.url or not args.token:
        raise InputError("give --url and --token (or set LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)")
    return LabelStudio(
        BackendSettings.from_environment(
            {**os.environ, "LABEL_STUDIO_URL": args.url, "LABEL_STUDIO_API_KEY": args.token}
        )
    )


def _connect(args: argparse.Namespace) -> int:
    studio = _studio(args)
    auth = studio.settings.basic_auth
    if auth is None:
        raise InputError("set BASIC_AUTH_USER and BASIC_AUTH_PASS to the backend's credentials")
    backend_url = args.backend_url.rstrip("/")
    try:
        ml = studio.call(
            "POST",
            "/api/ml",
            json={
                "url": backend_url,
                "project": args.project,
                "title": args.title,
                "is_interactive": True,
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": auth[0],
                "basic_auth_pass": auth[1],
            },
        ).json()
        webhooks = studio.call("GET", "/api/webhooks/", params={"project": args.project}).json()
        webhook = next((w for w in webhooks if w.get("url") == f"{backend_url}/webhook"), None)
        if webhook is None:
            raise InputError(
                f"Label Studio made no webhook to {backend_url}/webhook: start it with "
                "SSRF_PROTECTION_ENABLED=false when the backend is on a private address"
            )
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        studio.call(
            "PATCH",
            f"/api/webhooks/{webhook['id']}/",
            json={"headers": {**(webhook.get("headers") or {}), "Authorization": f"Basic {token}"}},
        )
    except StudioError as exc:
        raise InputError(str(exc)) from None
    print(
        f"project {args.project}: model {ml['id']} at {backend_url} "
        f"(state {ml.get('state')}), webhook {webhook['id']} sends the credentials"
    )
    return 0


# ----- import-videos ---------------------------------------------------------------------------


def add_import_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-videos",
        help="turn video files into Label Studio image-sequence tasks",
        description="Write every frame of each video as JPEG under Label Studio's local-files "
        "root, add a Local Storage for them to the project, and create one image-sequence task "
        "per video (data.<frames key> = the frame URLs).",
    )
    parser.add_argument("videos", nargs="+", type=Path, help="video files (or image folders)")
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    _add_studio_options(parser)
    parser.add_argument(
        "--document-root",
        type=Path,
        default=os.environ.get("LOCAL_FILES_DOCUMENT_ROOT"),
        help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT (default: $LOCAL_FILES_DOCUMENT_ROOT)",
    )
    parser.add_argument(
        "--folder", default="xmem-label", help="sub-folder of the document root for the frames"
    )
    parser.set_defaults(run=_import_videos)


def _import_videos(args: argparse.Namespace) -> int:
    if not args.document_root:
        raise InputError("give --document-root (Label Studio's LOCAL_FILES_DOCUMENT_ROOT)")
    root = args.document_root.resolve()
    storage_dir = root / args.folder / f"project-{args.project}"
    folders = _frame_folders(args.videos, storage_dir)
    studio = _studio(args)
    try:
        config = formats.parse_label_config(studio.project(args.project)["label_config"])
        if not isinstance(config, formats.SequenceConfig):
            raise InputError(
                f"project {args.project} is not an image-sequence project "
                '(<Image valueList="$frames"/> + <BrushLabels>)'
            )
        tasks = [
            _write_frames(video, folder, root, config)
            for video, folder in zip(args.videos, folders, strict=True)
        ]
        _ensure_local_storage(studio, args.project, storage_dir)
        studio.call("POST", f"/api/projects/{args.project}/import", json=tasks)
    except StudioError as exc:
        raise InputError(str(exc)) from None
    for task in tasks:
        print(f"{task['video']}: {len(task[config.frames_key])} frames")
    print(f"created {len(tasks)} task(s) in project {args.project}")
    return 0


def _frame_folders(videos: list[Path], storage_dir: Path) -> list[Path]:
    """storage_dir/<stem>/ for each source; refused when two sources share a folder name (their
    frames would overwrite each other) or the folder already holds files, which this run did
    not write."""
    folders: dict[Path, Path] = {}
    for video in videos:
        folder = storage_dir / video.stem
        if folder in folders:
            raise InputError(
                f"{folders[folder]} and {video} would both be written to {folder}; "
                "import them in separate runs with different --folder values, or "
                "rename one"
            )
        if folder.exists() and any(folder.iterdir()):
            raise InputError(f"{folder} already holds files: remove it or choose another --folder")
        folders[folder] = video
    return list(folders)


def _write_frames(video: Path, folder: Path, root: Path, config) -> dict:
    """Every frame of `video` as JPEG in `folder`; the task pointing at them."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    source = open_frames(video)
    try:
        for index, frame in source.forward(0):
            path = folder / f"{index:05d}.jpg"
            cv2.imwrite(str(path), frame[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            urls.append(f"/data/local-files/?d={path.relative_to(root).as_posix()}")
    finally:
        source.close()
    if not urls:
        raise InputError(f"{video} has no frames")
    return {config.frames_key: urls, "video": video.name}


def _ensure_local_storage(studio: LabelStudio, project: int, storage_dir: Path) -> None:
    """A Local Storage whose path holds the frames, so Label Studio serves them."""
    storages = studio.call("GET", "/api/storages/localfiles", params={"project": project}).json()
    if any(str(storage_dir).startswith(s.get("path") or "\0") for s in storages):
        return
    studio.call(
        "POST",
        "/api/storages/localfiles",
        json={
            "project": project,
            "path": str(storage_dir),
            "title": "xmem-label frames",
            "use_blob_urls": False,
        },
    )
