"""The backend's HTTP app without a Label Studio server: frames are read from disk the way the
SDK does when LOCAL_FILES_DOCUMENT_ROOT is set, and storing through the API is recorded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk._extensions.label_studio_tools.core.utils import io as sdk_io

from xmem_label.backend import studio
from xmem_label.backend.app import create_app
from xmem_label.backend.jobs import JobQueue, QueueFull
from xmem_label.backend.model import Runtime
from xmem_label.backend.rle import mask_to_rle, rle_to_mask
from xmem_label.model import read_label_mask

DATA = Path(__file__).resolve().parents[1] / "data" / "vos"
FRAME_URLS = [f"/data/local-files/?d=chair/frames/frame_{i:06d}.jpg" for i in range(8)]


def config(brush: str, label: str) -> str:
    return (f'<View><Image name="image" valueList="$frames"/><BrushLabels name="{brush}" '
            f'toName="image"><Label value="{label}"/></BrushLabels></View>')


def keyframe_task(task_id: int, brush: str, label: str) -> dict:
    mask = read_label_mask(DATA / "chair" / "masks" / "frame_000000.png") == 1
    region = {"from_name": brush, "to_name": "image", "type": "brushlabels", "item_index": 0,
              "original_width": 240, "original_height": 160,
              "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}
    return {"id": task_id, "data": {"frames": FRAME_URLS},
            "annotations": [{"id": task_id, "result": [region]}]}


@pytest.fixture
def runtime(monkeypatch):
    # What LOCAL_FILES_DOCUMENT_ROOT does in the SDK (read once, when it is imported).
    monkeypatch.setattr(sdk_io, "LOCAL_FILES_DOCUMENT_ROOT", str(DATA))
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    return Runtime(engine="flow", sync_seconds=60)


@pytest.fixture
def client(runtime):
    app = create_app(runtime)
    client = app.test_client()
    for project in ("1.0", "2.0"):
        client.post("/setup", json={"project": project, "schema": config("mask", "Chair"),
                                    "hostname": "http://ls.invalid", "access_token": "t0123456"})
    return client


def test_health_and_setup_answer_at_once_without_loading_the_engine(monkeypatch):
    monkeypatch.setattr("xmem_label.backend.model.load_engine", lambda *a, **k: time.sleep(3))
    client = create_app(Runtime(engine="flow")).test_client()
    started = time.monotonic()
    assert client.get("/health").json["status"] == "UP"
    reply = client.post("/setup", json={"project": "7.1", "schema": config("mask", "Chair")})
    assert reply.status_code == 200 and reply.json["model_version"].endswith("flow-loading")
    assert time.monotonic() - started < 1.0


def test_projects_are_answered_with_their_own_config(client):
    """Two projects with different configs, asked in turns, each get their own names."""
    replies = {}
    for project, brush, label in (("1.0", "mask", "Chair"), ("2.0", "paint", "Seat"),
                                  ("1.0", "mask", "Chair")):
        reply = client.post("/predict", json={
            "tasks": [keyframe_task(5, brush, label)], "project": project,
            "label_config": config(brush, label), "params": {"context": None}})
        assert reply.status_code == 200, reply.json
        (prediction,) = reply.json["results"]
        replies[project] = prediction
        assert {r["from_name"] for r in prediction["result"]} == {brush}
        assert {r["value"]["brushlabels"][0] for r in prediction["result"]} == {label}
        assert {r["item_index"] for r in prediction["result"]} == set(range(8))
    masks = [rle_to_mask(r["value"]["rle"], 240, 160) for r in replies["1.0"]["result"]]
    assert all(mask.any() for mask in masks)


def test_slow_propagation_is_stored_through_the_api_when_done(runtime, monkeypatch):
    stored = []
    done = threading.Event()

    def store_prediction(self, task_id, prediction):
        stored.append((self.url, task_id, prediction))
        done.set()
        return 1

    monkeypatch.setattr(studio.LabelStudio, "store_prediction", store_prediction)
    runtime.sync_seconds = 0.0  # answer at once, whatever the propagation takes
    client = create_app(runtime).test_client()
    client.post("/setup", json={"project": "3.0", "schema": config("mask", "Chair"),
                                "hostname": "http://ls.example", "access_token": "t0123456"})
    reply = client.post("/predict", json={
        "tasks": [keyframe_task(9, "mask", "Chair")], "project": "3.0",
        "label_config": config("mask", "Chair"), "params": {"context": None}})
    assert reply.status_code == 200 and reply.json["results"] == [[]]
    assert "stored when done" in reply.json["errors"][0]["reason"]
    assert done.wait(120)
    (url, task_id, prediction), = stored
    assert (url, task_id) == ("http://ls.example", 9)
    assert len(prediction["result"]) == 8 and prediction["model_version"].startswith("xmem-label")


def test_webhook_events(client):
    ignored = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert ignored.status_code == 200 and ignored.json["status"] == "ignored"
    task = keyframe_task(4, "mask", "Chair")
    empty = client.post("/webhook", json={
        "action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": config("mask", "C")},
        "task": {**task, "annotations": None}, "annotation": {"id": 3, "result": []}})
    assert empty.status_code == 400 and "no keyframe" in empty.json["error"]


def test_basic_auth_guards_everything_but_the_webhook(monkeypatch, runtime):
    monkeypatch.setenv("BASIC_AUTH_USER", "ls")
    monkeypatch.setenv("BASIC_AUTH_PASS", "secret")
    client = create_app(runtime).test_client()
    assert client.get("/health").status_code == 401
    assert client.get("/health", auth=("ls", "wrong")).status_code == 401
    assert client.get("/health", auth=("ls", "secret")).status_code == 200
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}).status_code == 200


def test_bad_requests_get_reasons(client):
    assert "JSON object" in client.post("/predict", data="x").json["error"]
    reply = client.post("/predict", json={"tasks": [], "project": "1.0",
                                          "label_config": config("mask", "Chair")})
    assert reply.status_code == 400 and "no tasks" in reply.json["error"]
    task = keyframe_task(4, "mask", "Chair")
    task["annotations"][0]["result"][0]["value"]["rle"] = [1, 2, 3]
    reply = client.post("/predict", json={"tasks": [task], "project": "1.0",
                                          "label_config": config("mask", "Chair")})
    assert reply.status_code == 400 and "malformed brush RLE" in reply.json["error"]


def test_job_queue_is_bounded_and_hands_results_over():
    queue = JobQueue(workers=1, capacity=1)
    release = threading.Event()
    running = queue.submit("blocker", release.wait)
    time.sleep(0.2)  # the worker has taken it; one slot is free
    waiting = queue.submit("waiting", lambda: 42)
    with pytest.raises(QueueFull):
        queue.submit("refused", lambda: 0)
    received = []
    assert waiting.hand_over(received.append)
    release.set()
    assert running.wait(5) and waiting.wait(5)
    time.sleep(0.1)
    assert received == [42] and not waiting.hand_over(received.append)
    assert queue.stats()["refused"] == 1


def test_keyframe_is_returned_exactly_as_drawn(client):
    task = keyframe_task(6, "mask", "Chair")
    reply = client.post("/predict", json={"tasks": [task], "project": "1.0",
                                          "label_config": config("mask", "Chair")})
    (prediction,) = reply.json["results"]
    first = next(r for r in prediction["result"] if r["item_index"] == 0)
    assert first["id"] == "xl1k0"
    assert first["value"]["rle"] == task["annotations"][0]["result"][0]["value"]["rle"]
    assert prediction["score"] == min(r["score"] for r in prediction["result"])
    assert np.isclose(first["score"], 1.0)


def test_missing_weights_answer_503_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(sdk_io, "LOCAL_FILES_DOCUMENT_ROOT", str(DATA))
    monkeypatch.setenv("XMEM_LABEL_WEIGHTS", str(tmp_path / "missing.pth"))
    client = create_app(Runtime(engine="xmem")).test_client()
    client.post("/setup", json={"project": "1.0", "schema": config("mask", "Chair"),
                                "hostname": "http://ls.invalid", "access_token": "t0123456"})
    reply = client.post("/predict", json={
        "tasks": [keyframe_task(5, "mask", "Chair")], "project": "1.0",
        "label_config": config("mask", "Chair")})
    assert reply.status_code == 503
    assert "missing.pth" in reply.json["error"]
