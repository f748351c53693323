"""Talking back to the configured Label Studio: read tasks, fetch media, store predictions.

Its address and token come from the operator's configuration only (LABEL_STUDIO_URL,
LABEL_STUDIO_API_KEY; see settings.py), never from a request, so the token goes to that host
alone. Both kinds of token work: a legacy token is sent as `Token <t>`; a personal access token
(a JWT) is exchanged at `/api/token/refresh/` for a short-lived access token sent as
`Bearer <t>`. Every call has connect and read timeouts and follows no redirect.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import requests

from . import media
from .settings import BackendSettings

ACCESS_TOKEN_SECONDS = 240  # Label Studio's access tokens live 5 minutes
FAILED_VERSION = "xmem-label-failed"


class StudioError(Exception):
    """Label Studio could not be reached or refused a call (`status`: its HTTP status)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class EncodedPrediction(dict):
    """A prediction ({result, score, model_version}) with its JSON made once (`encode`), so
    that storing it sends that text instead of serialising a megabyte of RLE again at the
    moment it is stored. Not changed after encoding."""

    json: bytes


def encode(prediction: dict) -> EncodedPrediction:
    """Region by region, handing the interpreter to other threads between regions: a Label
    Studio call under way meanwhile (model.encoded_if_current) sends its request and reads
    its answer at once, not after one json.dumps over the whole prediction or the next switch
    interval (measured: a check of 18 ms and the encoding took 25 ms together this way, 32 ms
    with the regions encoded without yielding, 42 ms one after the other)."""
    texts = []
    for region in prediction["result"]:
        texts.append(json.dumps(region, allow_nan=False))
        time.sleep(0)
    regions = ",".join(texts)
    rest = json.dumps({k: v for k, v in prediction.items() if k != "result"}, allow_nan=False)
    encoded = EncodedPrediction(prediction)
    encoded.json = f'{{"result": [{regions}]{", " if rest != "{}" else ""}{rest[1:]}'.encode()
    return encoded


class LabelStudio:
    """The configured Label Studio server, as the backend needs it."""

    def __init__(self, settings: BackendSettings):
        self.settings = settings
        self.url = settings.label_studio_url
        self.token = settings.api_key
        self._is_personal_token = self.token.count(".") == 2
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    @property
    def timeout(self) -> tuple[float, float]:
        return self.settings.connect_timeout, self.settings.read_timeout

    def _require_configuration(self) -> None:
        if not self.url or not self.token:
            raise StudioError(
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set for the "
                "backend to read tasks and store predictions"
            )

    # ----- auth -------------------------------------------------------------------------------

    def bearer(self) -> str:
        """A token valid now: the legacy token, or a fresh access token for a PAT."""
        self._require_configuration()
        if not self._is_personal_token:
            return self.token
        with self._lock:
            if self._access is None or self._access[1] < time.monotonic():
                try:
                    reply = requests.post(
                        f"{self.url}/api/token/refresh/",
                        json={"refresh": self.token},
                        timeout=self.timeout,
                        allow_redirects=False,
                    )
                except requests.RequestException:
                    raise StudioError("Label Studio did not answer the token refresh") from None
                if reply.status_code != 200:
                    raise StudioError(
                        f"Label Studio refused the access token (HTTP {reply.status_code})"
                    )
                self._access = (reply.json()["access"], time.monotonic() + ACCESS_TOKEN_SECONDS)
            return self._access[0]

    def headers(self) -> dict[str, str]:
        scheme = "Bearer" if self._is_personal_token else "Token"
        return {"Authorization": f"{scheme} {self.bearer()}"}

    # ----- REST ---------------------------------------------------------------------------------

    def call(
        self, method: str, path: str, extra_headers: dict[str, str] | None = None, **kwargs
    ) -> requests.Response:
        """One API call; StudioError when Label Studio does not answer or refuses it."""
        headers = {**self.headers(), **(extra_headers or {})}
        try:
            reply = requests.request(
                method,
                f"{self.url}{path}",
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
                **kwargs,
            )
        except requests.RequestException:
            raise StudioError(
                f"Label Studio did not answer {method} {path.split('?')[0]}"
            ) from None
        if reply.status_code >= 300:
            raise StudioError(
                f"Label Studio answered {method} {path.split('?')[0]} with "
                f"{reply.status_code}: {reply.text[:200]}",
                reply.status_code,
            )
        return reply

    def project(self, project_id: int) -> dict:
        return self.call("GET", f"/api/projects/{project_id}").json()

    def annotation(self, annotation_id: int) -> dict | None:
        """The annotation, or None when Label Studio has no such annotation."""
        try:
            return self.call("GET", f"/api/annotations/{annotation_id}").json()
        except StudioError as exc:
            if exc.status == 404:
                return None
            raise

    def task(self, project_id: int, task_id: int) -> dict | None:
        """A task with its data and annotations, read through the project export: unlike
        `GET /api/tasks/<id>`, it never makes Label Studio call this backend's /predict (which,
        with "use predictions to prelabel" on, would wait behind the job asking)."""
        tasks = self.call(
            "GET",
            f"/api/projects/{project_id}/export",
            params={
                "exportType": "JSON",
                "download_all_tasks": "true",
                "ids[]": [task_id],
                "download_resources": "false",
                "interpolate_key_frames": "false",
            },
        ).json()
        return next((task for task in tasks if task.get("id") == task_id), None)

    def store_prediction(self, task_id: int, prediction: dict) -> int:
        """Store `prediction` ({result, score, model_version}) on a task, replacing earlier
        predictions of the same model version and earlier failure notes there. Returns its id.

        Read back after the POST, so that of two stores racing for one task (two workers) the
        later-created one wins: every lower id of the version is visible to the higher one's
        read and deleted. Safe to repeat after a crash at any point."""
        new_id = self.create_prediction(task_id, prediction)
        versions = (prediction.get("model_version"), FAILED_VERSION)
        for old in self.call("GET", "/api/predictions", params={"task": task_id}).json():
            if old["id"] < new_id and old.get("model_version") in versions:
                self.delete_prediction(old["id"])
        return new_id

    def create_prediction(self, task_id: int, prediction: dict) -> int:
        """Add `prediction` to a task beside its others (a job's first batch); returns its id."""
        if isinstance(prediction, EncodedPrediction) and prediction:
            body = f'{{"task": {int(task_id)}, '.encode() + prediction.json[1:]
            created = self.call(
                "POST",
                "/api/predictions",
                extra_headers={"Content-Type": "application/json"},
                data=body,
            )
        else:
            created = self.call("POST", "/api/predictions", json={"task": task_id, **prediction})
        return created.json()["id"]

    def delete_prediction(self, prediction_id: int) -> None:
        """Delete a prediction; one already deleted (by a racing store) is fine."""
        try:
            self.call("DELETE", f"/api/predictions/{prediction_id}")
        except StudioError as exc:
            if exc.status != 404:
                raise

    def store_failure(
        self, task_id: int, reason: str, status_field: str | None, to_name: str | None
    ) -> None:
        """Leave a failed job's one-line reason on the task, where the annotator sees it: a
        prediction of version `xmem-label-failed` with a score of 0, holding the reason in the
        config's read-only status TextArea when it has one."""
        result = []
        if status_field and to_name:
            result.append(
                {
                    "from_name": status_field,
                    "to_name": to_name,
                    "type": "textarea",
                    "value": {"text": [f"xmem-label failed: {reason}"[:1000]]},
                }
            )
        self.store_prediction(
            task_id, {"result": result, "score": 0.0, "model_version": FAILED_VERSION}
        )

    # ----- media --------------------------------------------------------------------------------

    def download(self, url: object, task_id: object, destination: Path, what: str) -> Path:
        """A local copy of a task's media file, fetched under media.py's rules."""
        try:
            return media.fetch(url, task_id, destination, what, self.settings, self.headers)
        except media.MediaUnavailable as exc:
            raise StudioError(str(exc)) from None
