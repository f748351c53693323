"""Starting the servers the backend talks to, on loopback, for the end-to-end tests
(tests/backend/) and the benchmarks (benchmarks/): a real Label Studio (from its own venv) with
what a backend on 127.0.0.1 needs, and a private `redis-server`. One copy of this code, so the
tests and the benchmarks start the same servers; nothing here is used in production.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

# What a backend on a loopback or private address needs from Label Studio (backend/README.md,
# step 1), plus a fresh data dir, served local files and a legacy token.
LABEL_STUDIO_SETTINGS = {
    "LOCAL_FILES_SERVING_ENABLED": "true",
    "ML_BLOCK_LOCAL_IP": "false",
    "SSRF_PROTECTION_ENABLED": "false",
    "LATEST_VERSION_CHECK": "false",
    "COLLECT_ANALYTICS": "false",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_up(
    url: str, seconds: float, process: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Until `url` answers 200; RuntimeError (with the log's tail) when `process` exits first
    or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited early:\n{_tail(log)}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {seconds:.0f} s:\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log and log.exists() else ""


def stop(process: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def xmem_label_command() -> str:
    """The `xmem-label` console script of this Python's environment."""
    executable = shutil.which("xmem-label", path=str(Path(sys.executable).parent))
    if executable is None:
        raise RuntimeError("the xmem-label console script is not installed (pip install -e .)")
    return executable


def start_label_studio(
    binary: str | Path,
    work: Path,
    token: str,
    *,
    user: str = "dev@example.com",
    password: str = "dev-password-123",
    seconds: float = 300,
) -> tuple[subprocess.Popen, str, Path]:
    """Label Studio (1.23.2) on a free loopback port with a fresh data dir under `work`, the
    legacy API token `token`, local files served from `work/media`, and the settings that let
    it call a backend on 127.0.0.1. Returns (process, url, media folder); stop it with stop()."""
    if not Path(binary).is_file():
        raise FileNotFoundError(f"no Label Studio at {binary}")
    media = work / "media"
    media.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT", "DEBUG")}
    env.update(
        LABEL_STUDIO_SETTINGS,
        LABEL_STUDIO_BASE_DATA_DIR=str(work / "data"),
        LOCAL_FILES_DOCUMENT_ROOT=str(media),
        LABEL_STUDIO_USERNAME=user,
        LABEL_STUDIO_PASSWORD=password,
        LABEL_STUDIO_USER_TOKEN=token,
    )
    log = work / "label-studio.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                str(binary),
                "start",
                "--no-browser",
                "--internal-host",
                "127.0.0.1",
                "--port",
                str(port),
                "--enable-legacy-api-token",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(f"{url}/health", seconds, process, log)
    except BaseException:
        stop(process)
        raise
    return process, url, media


def start_redis(work: Path, seconds: float = 20) -> tuple[subprocess.Popen, str]:
    """A private `redis-server` (the Debian package) on a free loopback port, without
    persistence, for the job queue past one machine. Returns (process, redis:// url)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.ping()
            return process, url
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop(process)
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.1)
