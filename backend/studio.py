"""Talking back to Label Studio: read tasks, download media, store predictions.

Where Label Studio is and which token to use comes from the environment (`LABEL_STUDIO_URL`,
`LABEL_STUDIO_API_KEY`) or, when those are unset, from what Label Studio sent to `/setup` for
the project (`hostname`, `access_token`). Both kinds of token work: a legacy token is sent as
`Token <t>`; a personal access token (a JWT) is exchanged at `/api/token/refresh/` for a
short-lived access token sent as `Bearer <t>`.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path

from xmem_label.model import InputError

ACCESS_TOKEN_SECONDS = 240  # Label Studio's access tokens live 5 minutes
HTTP_TIMEOUT = 30


class StudioError(Exception):
    """Label Studio could not be reached or refused a call."""


class LabelStudio:
    """A Label Studio server, as the backend needs it."""

    def __init__(self, url: str, token: str):
        if not url or not token:
            raise StudioError(
                "Label Studio's address or token is unknown: set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY, or connect the backend from a project (sends /setup)"
            )
        self.url = url.rstrip("/")
        self.token = token
        self._is_personal_token = token.count(".") == 2
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, hostname: str | None = None, token: str | None = None):
        """The server named by LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, else by /setup."""
        return cls(
            os.environ.get("LABEL_STUDIO_URL") or hostname or "",
            os.environ.get("LABEL_STUDIO_API_KEY") or token or "",
        )

    # ----- auth -------------------------------------------------------------------------------

    def bearer(self) -> str:
        """A token valid now: the legacy token, or a fresh access token for a PAT."""
        if not self._is_personal_token:
            return self.token
        with self._lock:
            if self._access is None or self._access[1] < time.monotonic():
                reply = requests.post(
                    f"{self.url}/api/token/refresh/", json={"refresh": self.token},
                    timeout=HTTP_TIMEOUT,
                )
                if reply.status_code != 200:
                    raise StudioError(f"Label Studio refused the access token: {reply.text[:200]}")
                self._access = (reply.json()["access"], time.monotonic() + ACCESS_TOKEN_SECONDS)
            return self._access[0]

    def headers(self) -> dict[str, str]:
        scheme = "Bearer" if self._is_personal_token else "Token"
        return {"Authorization": f"{scheme} {self.bearer()}"}

    # ----- REST ---------------------------------------------------------------------------------

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            reply = requests.request(
                method, f"{self.url}{path}", headers=self.headers(), timeout=HTTP_TIMEOUT, **kwargs
            )
        except requests.RequestException as exc:
            raise StudioError(f"Label Studio at {self.url} is unreachable: {exc}") from None
        if reply.status_code >= 400:
            raise StudioError(
                f"Label Studio answered {method} {path} with {reply.status_code}: "
                f"{reply.text[:200]}"
            )
        return reply

    def task(self, task_id: int) -> dict:
        return self.call("GET", f"/api/tasks/{task_id}").json()

    def project(self, project_id: int) -> dict:
        return self.call("GET", f"/api/projects/{project_id}").json()

    def store_prediction(self, task_id: int, prediction: dict) -> int:
        """Store `prediction` ({result, score, model_version}) on a task, replacing earlier
        predictions of the same model version there. Returns the new prediction's id."""
        earlier = self.call("GET", "/api/predictions", params={"task": task_id}).json()
        created = self.call("POST", "/api/predictions", json={"task": task_id, **prediction})
        for old in earlier:
            if old.get("model_version") == prediction.get("model_version"):
                self.call("DELETE", f"/api/predictions/{old['id']}")
        return created.json()["id"]

    # ----- media --------------------------------------------------------------------------------

    def download(self, url: str, task_id: int | None, folder: Path) -> Path:
        """A local copy of a task's media file (Label Studio storage URLs or plain http)."""
        folder.mkdir(parents=True, exist_ok=True)
        try:
            path = get_local_path(
                url,
                cache_dir=str(folder),
                hostname=self.url,
                access_token=self.bearer(),
                task_id=task_id,
            )
        except Exception as exc:  # requests, FileNotFoundError, ValueError, ... from the SDK
            raise InputError(f"cannot download {url}: {exc}") from None
        return Path(path)
