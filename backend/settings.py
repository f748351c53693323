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
    `pass_cache_dir` (least recently used tasks are evicted past it). job_threads:
    XMEM_LABEL_JOB_THREADS (`--job-threads`), the most jobs a process runs at once, each on
    cores / job_threads torch threads (default: 1 for XMem, which uses every core within a job;
    the cores for other engines, whose jobs gain little from threads). job_memory_bytes:
    XMEM_LABEL_JOB_MEMORY (`--job-memory`), the memory budget that the estimates of the jobs
    running at once on this machine stay within (None: no budget, as many as there are job
    threads).
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
    job_memory_bytes: int | None = None

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
        engine = env.get("XMEM_LABEL_ENGINE", manifest()["default_engine"])
        return cls(
            label_studio_url=url,
            api_key=env.get("LABEL_STUDIO_API_KEY", "").strip(),
            basic_auth=(user, password) if user else None,
            local_files_root=Path(root).resolve() if root else None,
            state_dir=Path(
                env.get("MODEL_DIR") or Path.home() / ".cache" / "xmem-label" / "backend"
            ),
            engine=engine,
            job_threads=_number(
                env, "XMEM_LABEL_JOB_THREADS", default_job_threads(engine), int, minimum=0
            ),
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
            job_memory_bytes=job_memory(
                env.get("XMEM_LABEL_JOB_MEMORY") or str(limits["job_memory"])
            ),
        )


def job_memory(value: str) -> int:
    """The jobs' memory budget in bytes from "<MB>" or "<percent>%" (of the memory available
    on this machine, or to its container, when the process starts); InputError otherwise."""
    text = value.strip()
    try:
        number = float(text[:-1] if text.endswith("%") else text)
    except ValueError:
        raise InputError(
            f"XMEM_LABEL_JOB_MEMORY={value[:32]!r} is neither megabytes nor a percentage"
        ) from None
    if not number > 0 or (text.endswith("%") and number > 100):
        raise InputError("XMEM_LABEL_JOB_MEMORY must be above 0 (and a percentage at most 100%)")
    if text.endswith("%"):
        return int(available_memory() * number / 100)
    return int(number * 10**6)


def available_memory() -> int:
    """Bytes this process could still take: Linux's MemAvailable, capped by the cgroup's
    limit less its usage (a container sees the host's MemAvailable); elsewhere the free
    physical pages."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # "max" (v2) means no limit
            available = min(available, max(0, int(limit) - usage))
        break
    return available


def default_job_threads(engine: str) -> int:
    """XMem: one job at a time on every core (it scales with torch threads: 1.89x from 1 to 2;
    two jobs on one core each gave the same frames/s on 2 cores). Other engines (flow: OpenCV,
    1.07x from a second thread): a job per core, their single-threaded stages overlapping."""
    return 1 if engine == "xmem" else machine_cores()


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
