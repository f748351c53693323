"""A real Label Studio 1.23.2 server and a real backend process, started once per test session.

Label Studio comes from its own venv (`$LABEL_STUDIO_BIN`, else .venv-ls in the repository); it
runs on 127.0.0.1 with a fresh SQLite data dir, a legacy API token, local
files served from a temporary document root, and the two settings that let it talk to a backend
on 127.0.0.1 (ML_BLOCK_LOCAL_IP, SSRF_PROTECTION_ENABLED). The backend is `xmem-label serve
--engine flow` as a user starts it, with basic-auth credentials, connected to each project by
`xmem-label connect` (which also gives the webhook the credentials), and reads media over HTTP
from Label Studio.
While developing, XMEM_LABEL_TEST_LS="<url> <document root>" reuses a server started the same
way (token TOKEN) instead of booting one (about a minute).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import requests

from xmem_label.backend import devserver
from xmem_label.backend.devserver import free_port, stop, xmem_label_command

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "xmemlabel0123456789abcdef0123456789abcd"
LS_CANDIDATES = [
    os.environ.get("LABEL_STUDIO_BIN", ""),
    str(ROOT / ".venv-ls/bin/label-studio"),
]
BACKEND_AUTH = ("label-studio", "backend-secret-7f3a")


def wait_for(url: str, process: subprocess.Popen, seconds: float, log: Path) -> None:
    devserver.wait_up(url, seconds, process, log)


class LabelStudioServer:
    """The running server: its address, token, media folder and a small REST helper."""

    def __init__(self, url: str, media_root: Path):
        self.url = url
        self.media_root = media_root
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Token {TOKEN}"

    def api(self, method: str, path: str, expect: int | tuple = (200, 201, 204), **kwargs):
        reply = self.http.request(method, self.url + path, timeout=120, **kwargs)
        expected = (expect,) if isinstance(expect, int) else expect
        assert reply.status_code in expected, f"{method} {path}: {reply.status_code} {reply.text}"
        return reply.json() if reply.content else None

    def project(self, title: str, label_config: str) -> int:
        project = self.api(
            "POST", "/api/projects", json={"title": title, "label_config": label_config}
        )
        # Opening a task must not start a propagation (see backend/README.md).
        self.api(
            "PATCH",
            f"/api/projects/{project['id']}",
            json={"show_collab_predictions": False, "evaluate_predictions_automatically": False},
        )
        return project["id"]

    def media_folder(self, project_id: int, name: str) -> Path:
        """A folder under the document root, served to `project_id` through a Local Storage."""
        folder = self.media_root / f"p{project_id}" / name
        folder.mkdir(parents=True, exist_ok=True)
        self.api(
            "POST",
            "/api/storages/localfiles",
            json={
                "project": project_id,
                "path": str(folder),
                "title": name,
                "use_blob_urls": False,
            },
        )
        return folder

    def url_of(self, path: Path) -> str:
        return f"/data/local-files/?d={path.relative_to(self.media_root).as_posix()}"

    def tasks(self, project_id: int) -> list[dict]:
        return self.api("GET", "/api/tasks", params={"project": project_id})["tasks"]

    def predictions(self, task_id: int) -> list[dict]:
        return self.api("GET", "/api/predictions", params={"task": task_id})

    def connect(self, project_id: int, backend_url: str) -> int:
        """`xmem-label connect`, as the README tells an admin; returns the ML backend's id."""
        subprocess.run(
            [
                xmem_label_command(),
                "connect",
                "--project",
                str(project_id),
                "--backend-url",
                backend_url,
                "--url",
                self.url,
                "--token",
                TOKEN,
            ],
            env=dict(os.environ, BASIC_AUTH_USER=BACKEND_AUTH[0], BASIC_AUTH_PASS=BACKEND_AUTH[1]),
            check=True,
            timeout=120,
        )
        (ml,) = [
            m
            for m in self.api("GET", "/api/ml", params={"project": project_id})
            if m["url"] == backend_url
        ]
        return ml["id"]

    def retrieve_predictions(self, project_id: int, task_ids: list[int]) -> dict:
        return self.api(
            "POST",
            f"/api/dm/actions?id=retrieve_tasks_predictions&project={project_id}",
            json={"selectedItems": {"all": False, "included": task_ids}},
        )


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudioServer:
    reuse = os.environ.get("XMEM_LABEL_TEST_LS")  # "<url> <document root>": while developing
    if reuse:
        url, media = reuse.split()
        yield LabelStudioServer(url, Path(media))
        return
    binary = next((c for c in LS_CANDIDATES if c and Path(c).is_file()), None)
    if binary is None:
        pytest.skip("label-studio 1.23.2 not installed (set LABEL_STUDIO_BIN)")
    process, url, media = devserver.start_label_studio(
        binary,
        tmp_path_factory.mktemp("label-studio"),
        TOKEN,
        user="e2e@example.com",
        password="e2e-password-123",
        seconds=240,
    )
    try:
        yield LabelStudioServer(url, media)
    finally:
        stop(process)


def run_backend(
    label_studio,
    tmp_path_factory,
    *options: str,
    env: dict | None = None,
    port: int | None = None,
    keep_process: bool = False,
):
    """`xmem-label serve --engine flow <options>` on a free port (or `port`), in its own
    process group; yields its address (and the process, with keep_process)."""
    executable = xmem_label_command()
    port = port or free_port()
    environment = dict(
        os.environ,
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=TOKEN,
        OMP_NUM_THREADS="1",
        MODEL_DIR=str(tmp_path_factory.mktemp("model-dir")),
        BASIC_AUTH_USER=BACKEND_AUTH[0],
        BASIC_AUTH_PASS=BACKEND_AUTH[1],
    )
    environment.update(env or {})
    environment.pop("LOCAL_FILES_DOCUMENT_ROOT", None)  # media go over HTTP, as on another host
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                executable,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--engine",
                "flow",
                "--threads",
                "4",
                *options,
            ],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", process, 60, log)
        yield (url, process) if keep_process else url
    finally:
        stop(process)
        print(log.read_text()[-4000:])


@pytest.fixture(scope="session")
def backend(label_studio, tmp_path_factory) -> str:
    """The backend as a user starts it."""
    yield from run_backend(label_studio, tmp_path_factory)


@pytest.fixture(scope="session")
def impatient_backend(label_studio, tmp_path_factory) -> str:
    """A backend that answers /predict before any propagation can finish (--sync-seconds 0),
    as a long clip would outlast Label Studio's 100 s: results go through the API."""
    yield from run_backend(label_studio, tmp_path_factory, "--sync-seconds", "0")
