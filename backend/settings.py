"""The backend's configuration: what the operator set (environment and `xmem-label serve`
flags), with defaults from manifest.yml. Read once per process; nothing a request carries
changes it, so no request decides where the backend connects or sends its token.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from pathlib import Path

from xmem_label.model import InputError
from xmem_label.model.settings import manifest


@dataclasses.dataclass(frozen=True)
class BackendSettings:
    """Everything the backend reads from its environment.

    label_studio_url / api_key: the one Label Studio this backend talks to and its token
    (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY). basic_auth: (user, password) every route but
    /health requires (BASIC_AUTH_USER, BASIC_AUTH_PASS); None only when the operator ran
    without credentials on loopback. local_files_root: LOCAL_FILES_DOCUMENT_ROOT, to read
    /data/local-files/ media from disk. state_dir: MODEL_DIR, the job journal and work files.
    queue_url: XMEM_LABEL_QUEUE_URL, a Redis address (redis://, rediss://, unix://) when jobs
    go through RQ to workers on any host; empty for the embedded SQLite journal (one machine).
    pass_cache_bytes: XMEM_LABEL_PASS_CACHE_GB, the cap of the tasks' pass caches in
    `pass_cache_dir` (least recently used tasks are evicted past it).
    """

    label_studio_url: str
    api_key: str
    basic_auth: tuple[str, str] | None
    local_files_root: Path | None
    state_dir: Path
    engine: str = "xmem"
    job_threads: int = 1
    sync_seconds: float = 60.0
    http_threads: int = 8
    max_request_bytes: int = 64 << 20
    max_download_bytes: int = 2048 << 20
    max_frame_pixels: int = 4096 * 4096
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    download_timeout: float = 600.0
    job_lease_seconds: float = 30.0
    job_attempts: int = 3
    max_queued_jobs: int = 64
    queue_url: str = ""
    pass_cache_bytes: int = 10 * 10**9

    @property
    def pass_cache_dir(self) -> Path:
        """Each task's propagation passes, kept between jobs so a correction costs a segment."""
        return self.state_dir / "passes"

    @property
    def label_studio_origin(self) -> tuple[str, str, int]:
        return origin_of(self.label_studio_url)

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "xmem-label-jobs.sqlite"

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> BackendSettings:
        env = os.environ if environ is None else environ
        limits = manifest()["label_studio_backend"]
        url = env.get("LABEL_STUDIO_URL", "").strip().rstrip("/")
        if url:
            origin_of(url)  # refuses a malformed address at start-up
        user, password = env.get("BASIC_AUTH_USER", ""), env.get("BASIC_AUTH_PASS", "")
        if bool(user) != bool(password):
            raise InputError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        root = env.get("LOCAL_FILES_DOCUMENT_ROOT")
        return cls(
            label_studio_url=url,
            api_key=env.get("LABEL_STUDIO_API_KEY", "").strip(),
            basic_auth=(user, password) if user else None,
            local_files_root=Path(root).resolve() if root else None,
            state_dir=Path(
                env.get("MODEL_DIR") or Path.home() / ".cache" / "xmem-label" / "backend"
            ),
            engine=env.get("XMEM_LABEL_ENGINE", manifest()["default_engine"]),
            job_threads=_number(env, "XMEM_LABEL_JOB_THREADS", 1, int, minimum=0),
            sync_seconds=_number(env, "XMEM_LABEL_SYNC_SECONDS", 60.0, float, minimum=0),
            http_threads=_number(env, "XMEM_LABEL_HTTP_THREADS", 8, int, minimum=1),
            max_request_bytes=_number(
                env, "XMEM_LABEL_MAX_REQUEST_MB", limits["max_request_mb"], int, minimum=1
            )
            << 20,
            max_download_bytes=_number(
                env, "XMEM_LABEL_MAX_DOWNLOAD_MB", limits["max_download_mb"], int, minimum=1
            )
            << 20,
            max_frame_pixels=_number(
                env, "XMEM_LABEL_MAX_FRAME_PIXELS", limits["max_frame_pixels"], int, minimum=1
            ),
            connect_timeout=float(limits["connect_timeout_s"]),
            read_timeout=_number(
                env, "XMEM_LABEL_READ_TIMEOUT", limits["read_timeout_s"], float, minimum=0.1
            ),
            download_timeout=_number(
                env, "XMEM_LABEL_DOWNLOAD_TIMEOUT", limits["download_timeout_s"], float, minimum=0.1
            ),
            job_lease_seconds=_number(
                env, "XMEM_LABEL_JOB_LEASE", limits["job_lease_s"], float, minimum=0.5
            ),
            job_attempts=int(limits["job_attempts"]),
            max_queued_jobs=_number(
                env, "XMEM_LABEL_QUEUE", limits["max_queued_jobs"], int, minimum=1
            ),
            queue_url=queue_url(env.get("XMEM_LABEL_QUEUE_URL", "")),
            pass_cache_bytes=int(
                _number(env, "XMEM_LABEL_PASS_CACHE_GB", limits["pass_cache_gb"], float, minimum=0)
                * 10**9
            ),
        )


def queue_url(url: str) -> str:
    """A Redis address for the job queue, or "" (the embedded journal); InputError for anything
    else, at start-up rather than at the first job."""
    url = url.strip()
    scheme = urllib.parse.urlsplit(url).scheme
    if url and scheme not in ("redis", "rediss", "unix"):
        # The address is not echoed: it may carry the Redis password.
        raise InputError(
            f"XMEM_LABEL_QUEUE_URL must be a redis://, rediss:// or unix:// address "
            f"(scheme {scheme[:16]!r})"
        )
    return url


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) address; InputError for anything else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"not an http(s) address: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"not a valid port in {url!r}") from None
    return parts.scheme, parts.hostname.lower(), port


def _number(env, name: str, default, kind: type, *, minimum: float):
    raw = env.get(name)
    if raw is None or raw == "":
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise InputError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise InputError(f"{name} must be at least {minimum}")
    return value
