"""`xmem-label serve` (the ML backend under gunicorn) and `xmem-label import-videos` (video
files -> image-sequence tasks). Registered through setup.py's `xmem_label.commands` entry points.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import cv2
from gunicorn.app.base import BaseApplication

from xmem_label.model import InputError, open_frames
from xmem_label.model.xmem.allocator import keep_freed_memory

from . import formats
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
        "BASIC_AUTH_PASS, MODEL_DIR.",
    )
    parser.add_argument("--host", default=os.environ.get("HOST_BIND", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")))
    parser.add_argument("--engine", choices=("xmem", "flow"),
                        default=os.environ.get("XMEM_LABEL_ENGINE", "xmem"))
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes; each loads its own engine (default 1)")
    parser.add_argument("--threads", type=int, default=8, help="HTTP threads per process")
    parser.add_argument("--job-threads", type=int, default=1,
                        help="propagations run at once per process (default 1)")
    parser.add_argument("--queue", type=int, default=16,
                        help="propagations that may wait; more are refused with 503")
    parser.add_argument("--sync-seconds", type=float, default=60.0,
                        help="how long /predict waits before storing results through the API "
                        "instead (Label Studio gives up after 100 s)")
    parser.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    for name, value in (("workers", args.workers), ("threads", args.threads),
                        ("job-threads", args.job_threads), ("queue", args.queue)):
        if value < 1:
            raise InputError(f"--{name} must be at least 1")
    keep_freed_memory()  # before gunicorn forks and starts threads (see allocator.py)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] %(message)s")
    logging.getLogger("label_studio_sdk").setLevel(logging.WARNING)  # a line per frame otherwise
    os.environ.update({
        "XMEM_LABEL_ENGINE": args.engine,
        "XMEM_LABEL_JOB_THREADS": str(args.job_threads),
        "XMEM_LABEL_QUEUE": str(args.queue),
        "XMEM_LABEL_SYNC_SECONDS": str(args.sync_seconds),
    })
    _Gunicorn({
        "bind": f"{args.host}:{args.port}",
        "workers": args.workers,
        "threads": args.threads,
        "worker_class": "gthread",
        "timeout": int(args.sync_seconds) + 60,
        "accesslog": "-",
        "control_socket_disable": True,  # several backends may run on one machine
    }).run()
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
    parser.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL"),
                        help="Label Studio address (default: $LABEL_STUDIO_URL)")
    parser.add_argument("--token", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                        help="API token (default: $LABEL_STUDIO_API_KEY)")
    parser.add_argument("--document-root", type=Path,
                        default=os.environ.get("LOCAL_FILES_DOCUMENT_ROOT"),
                        help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT "
                        "(default: $LOCAL_FILES_DOCUMENT_ROOT)")
    parser.add_argument("--folder", default="xmem-label",
                        help="sub-folder of the document root for the frames")
    parser.set_defaults(run=_import_videos)


def _import_videos(args: argparse.Namespace) -> int:
    if not args.document_root:
        raise InputError("give --document-root (Label Studio's LOCAL_FILES_DOCUMENT_ROOT)")
    try:
        studio = LabelStudio(args.url or "", args.token or "")
        config = formats.parse_label_config(studio.project(args.project)["label_config"])
        if not isinstance(config, formats.SequenceConfig):
            raise InputError(f"project {args.project} is not an image-sequence project "
                             '(<Image valueList="$frames"/> + <BrushLabels>)')
        root = args.document_root.resolve()
        storage_dir = root / args.folder / f"project-{args.project}"
        tasks = [_write_frames(video, storage_dir, root, config) for video in args.videos]
        _ensure_local_storage(studio, args.project, storage_dir)
        studio.call("POST", f"/api/projects/{args.project}/import", json=tasks)
    except StudioError as exc:
        raise InputError(str(exc)) from None
    for task in tasks:
        print(f"{task['video']}: {len(task[config.frames_key])} frames")
    print(f"created {len(tasks)} task(s) in project {args.project}")
    return 0


def _write_frames(video: Path, storage_dir: Path, root: Path, config) -> dict:
    """Every frame of `video` as JPEG in storage_dir/<stem>/; the task pointing at them."""
    folder = storage_dir / video.stem
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
    studio.call("POST", "/api/storages/localfiles", json={
        "project": project, "path": str(storage_dir), "title": "xmem-label frames",
        "use_blob_urls": False,
    })
