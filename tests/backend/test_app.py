"""The backend's HTTP app without a Label Studio server: frames are read from disk through
LOCAL_FILES_DOCUMENT_ROOT, and storing through the API is recorded."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from xmem_label.backend import model, studio
from xmem_label.backend.app import create_app
from xmem_label.backend.model import Runtime
from xmem_label.backend.rle import mask_to_rle, rle_to_mask
from xmem_label.backend.settings import BackendSettings
from xmem_label.model import read_label_mask

DATA = Path(__file__).resolve().parents[1] / "data" / "vos"
FRAME_URLS = [f"/data/local-files/?d=chair/frames/frame_{i:06d}.jpg" for i in range(8)]


def config(brush: str, label: str) -> str:
    return (
        f'<View><Image name="image" valueList="$frames"/><BrushLabels name="{brush}" '
        f'toName="image"><Label value="{label}"/></BrushLabels></View>'
    )


def keyframe_task(task_id: int, brush: str, label: str) -> dict:
    mask = read_label_mask(DATA / "chair" / "masks" / "frame_000000.png") == 1
    region = {
        "from_name": brush,
        "to_name": "image",
        "type": "brushlabels",
        "item_index": 0,
        "original_width": 240,
        "original_height": 160,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
    }
    return {
        "id": task_id,
        "data": {"frames": FRAME_URLS},
        "annotations": [{"id": task_id, "result": [region]}],
    }


def make_settings(tmp_path: Path, **overrides) -> BackendSettings:
    """Frames from disk (LOCAL_FILES_DOCUMENT_ROOT), the flow engine, a journal in tmp_path."""
    settings = BackendSettings.from_environment(
        {
            "LOCAL_FILES_DOCUMENT_ROOT": str(DATA),
            "MODEL_DIR": str(tmp_path),
            "XMEM_LABEL_ENGINE": "flow",
            "LABEL_STUDIO_URL": "http://ls.invalid:8080",
            "LABEL_STUDIO_API_KEY": "t0123456",
        }
    )
    return dataclasses.replace(settings, **overrides)


@pytest.fixture
def runtime(tmp_path):
    runtime = Runtime(make_settings(tmp_path)).start()
    yield runtime
    runtime.runner.stop()


@pytest.fixture
def client(runtime):
    client = create_app(runtime).test_client()
    for project in ("1.0", "2.0"):
        client.post("/setup", json={"project": project, "schema": config("mask", "Chair")})
    return client


def test_health_answers_at_once_and_setup_gives_the_loaded_engines_version(monkeypatch, tmp_path):
    from xmem_label.model import load_engine

    def slow_load(*args, **kwargs):
        time.sleep(2)
        return load_engine(*args, **kwargs)

    monkeypatch.setattr("xmem_label.backend.model.load_engine", slow_load)
    runtime = Runtime(make_settings(tmp_path)).start()
    client = create_app(runtime).test_client()
    started = time.monotonic()
    assert client.get("/health").json["status"] == "UP"
    assert time.monotonic() - started < 1.0
    reply = client.post("/setup", json={"project": "7.1", "schema": config("mask", "Chair")})
    version = reply.json["model_version"]
    assert reply.status_code == 200 and version.startswith("xmem-label-0.1.0-flow-no-weights-")
    restarted = create_app(Runtime(make_settings(tmp_path)).start()).test_client()
    assert restarted.get("/versions").json["versions"] == [version]  # stable across restarts
    runtime.runner.stop()


def test_projects_are_answered_with_their_own_config(client):
    """Two projects with different configs, asked in turns, each get their own names."""
    replies = {}
    for project, brush, label in (
        ("1.0", "mask", "Chair"),
        ("2.0", "paint", "Seat"),
        ("1.0", "mask", "Chair"),
    ):
        reply = client.post(
            "/predict",
            json={
                "tasks": [keyframe_task(5, brush, label)],
                "project": project,
                "label_config": config(brush, label),
                "params": {"context": None},
            },
        )
        assert reply.status_code == 200, reply.json
        (prediction,) = reply.json["results"]
        replies[project] = prediction
        assert {r["from_name"] for r in prediction["result"]} == {brush}
        assert {r["value"]["brushlabels"][0] for r in prediction["result"]} == {label}
        assert {r["item_index"] for r in prediction["result"]} == set(range(8))
    masks = [rle_to_mask(r["value"]["rle"], 240, 160) for r in replies["1.0"]["result"]]
    assert all(mask.any() for mask in masks)


def test_slow_propagation_is_stored_through_the_api_when_done(tmp_path, monkeypatch):
    stored = []
    done = threading.Event()

    def store_prediction(self, task_id, prediction):
        stored.append((self.url, task_id, prediction))
        done.set()
        return 1

    monkeypatch.setattr(studio.LabelStudio, "store_prediction", store_prediction)
    # answer at once, whatever the propagation takes
    runtime = Runtime(make_settings(tmp_path, sync_seconds=0.0)).start()
    client = create_app(runtime).test_client()
    client.post(
        "/setup",
        json={
            "project": "3.0",
            "schema": config("mask", "Chair"),
            "hostname": "http://attacker.example",
            "access_token": "x",
        },
    )
    reply = client.post(
        "/predict",
        json={
            "tasks": [keyframe_task(9, "mask", "Chair")],
            "project": "3.0",
            "label_config": config("mask", "Chair"),
            "params": {"context": None},
        },
    )
    assert reply.status_code == 200 and reply.json["results"] == [[]]
    assert "stored when done" in reply.json["errors"][0]["reason"]
    assert done.wait(120)
    ((url, task_id, prediction),) = stored
    assert (url, task_id) == ("http://ls.invalid:8080", 9)  # the configured one, not /setup's
    assert len(prediction["result"]) == 8 and prediction["model_version"].startswith("xmem-label")
    runtime.runner.stop()


def test_webhook_events(client, monkeypatch):
    ignored = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert ignored.status_code == 200 and ignored.json["status"] == "ignored"
    event = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 9, "label_config": config("mask", "C")},
        "task": {"id": 4},
        "annotation": {"id": 3},
    }
    refused = client.post("/webhook", json=event)
    assert refused.status_code == 403 and "not connected" in refused.json["error"]
    forged = dict(
        event, project={"id": 1, "label_config": config("mask", "C")}, task={"id": "4; DROP"}
    )
    assert client.post("/webhook", json=forged).status_code == 400
    # Label Studio says annotation 3 belongs to task 5, not 4: refused, nothing queued.
    monkeypatch.setattr(
        studio.LabelStudio, "annotation", lambda self, i: {"id": i, "task": 5, "project": 1}
    )
    event["project"]["id"] = 1
    reply = client.post("/webhook", json=event)
    assert reply.status_code == 403 and "not an annotation of task 4" in reply.json["error"]
    assert sum(client.get("/metrics").json["jobs"].values()) == 0


def test_basic_auth_guards_everything_but_health(tmp_path):
    runtime = Runtime(make_settings(tmp_path, basic_auth=("ls", "secret")), job_threads=0)
    client = create_app(runtime).test_client()
    assert client.get("/health").status_code == 200
    for method, path in (
        ("post", "/setup"),
        ("post", "/predict"),
        ("post", "/webhook"),
        ("get", "/metrics"),
        ("get", "/versions"),
    ):
        assert getattr(client, method)(path, json={}).status_code == 401, path
        assert getattr(client, method)(path, json={}, auth=("ls", "wrong")).status_code == 401
    assert client.get("/metrics", auth=("ls", "secret")).status_code == 200


def test_bad_requests_get_reasons(client):
    assert "JSON object" in client.post("/predict", data="x").json["error"]
    reply = client.post(
        "/predict", json={"tasks": [], "project": "1.0", "label_config": config("mask", "Chair")}
    )
    assert reply.status_code == 400 and "no tasks" in reply.json["error"]
    task = keyframe_task(4, "mask", "Chair")
    task["annotations"][0]["result"][0]["value"]["rle"] = [1, 2, 3]
    reply = client.post(
        "/predict",
        json={"tasks": [task], "project": "1.0", "label_config": config("mask", "Chair")},
    )
    assert reply.status_code == 400 and "malformed brush RLE" in reply.json["error"]


def test_full_queue_answers_503_with_retry_after(tmp_path):
    # no job thread and no waiting: jobs stay queued
    runtime = Runtime(make_settings(tmp_path, max_queued_jobs=1, sync_seconds=0.0), job_threads=0)
    client = create_app(runtime).test_client()
    client.post("/setup", json={"project": "1.0", "schema": config("mask", "Chair")})
    body = {
        "project": "1.0",
        "label_config": config("mask", "Chair"),
        "tasks": [keyframe_task(4, "mask", "Chair")],
    }
    assert client.post("/predict", json=body).status_code == 200
    body["tasks"] = [keyframe_task(5, "mask", "Chair")]
    reply = client.post("/predict", json=body)
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "30"
    assert "busy" in reply.json["error"]


def test_oversized_body_is_refused(tmp_path):
    runtime = Runtime(make_settings(tmp_path, max_request_bytes=1000), job_threads=0)
    reply = (
        create_app(runtime)
        .test_client()
        .post("/predict", data=b"{" + b" " * 2000 + b"}", content_type="application/json")
    )
    assert reply.status_code == 413 and reply.json["error"]


def test_keyframe_is_returned_exactly_as_drawn(client):
    task = keyframe_task(6, "mask", "Chair")
    reply = client.post(
        "/predict",
        json={"tasks": [task], "project": "1.0", "label_config": config("mask", "Chair")},
    )
    (prediction,) = reply.json["results"]
    first = next(r for r in prediction["result"] if r["item_index"] == 0)
    assert first["id"] == "xl1k0"
    assert first["value"]["rle"] == task["annotations"][0]["result"][0]["value"]["rle"]
    assert prediction["score"] == min(r["score"] for r in prediction["result"])
    assert np.isclose(first["score"], 1.0)


def test_missing_weights_answer_503_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("XMEM_LABEL_WEIGHTS", str(tmp_path / "missing.pth"))
    runtime = Runtime(make_settings(tmp_path, engine="xmem"), job_threads=0)
    client = create_app(runtime).test_client()
    setup = client.post("/setup", json={"project": "1.0", "schema": config("mask", "Chair")})
    assert setup.status_code == 503 and "missing.pth" in setup.json["error"]
    reply = client.post(
        "/predict",
        json={
            "tasks": [keyframe_task(5, "mask", "Chair")],
            "project": "1.0",
            "label_config": config("mask", "Chair"),
        },
    )
    assert reply.status_code == 503
    assert "missing.pth" in reply.json["error"]


def test_a_webhook_job_whose_annotation_changed_meanwhile_stores_nothing(runtime, monkeypatch):
    """Two saves in quick succession: the job of the first finds the annotation changed when it
    is done and leaves storing to the job of the second, so an older result never replaces a
    newer one, whichever finishes last."""
    task = keyframe_task(7, "mask", "Chair")
    saved = {**task["annotations"][0], "id": 7, "task": 7, "updated_at": "2026-12-01T10:00:00Z"}
    monkeypatch.setattr(
        studio.LabelStudio,
        "project",
        lambda self, i: {"id": i, "label_config": config("mask", "Chair")},
    )
    # the export the job starts from holds the first save; a read when it is done, the second
    monkeypatch.setattr(
        studio.LabelStudio, "task", lambda self, p, t: {**task, "annotations": [saved]}
    )
    monkeypatch.setattr(
        studio.LabelStudio,
        "annotation",
        lambda self, i: {**saved, "updated_at": "2026-12-01T10:00:03Z"},
    )
    stored = []
    monkeypatch.setattr(
        studio.LabelStudio,
        "store_prediction",
        lambda self, task_id, prediction: stored.append(task_id),
    )
    record, _ = runtime.journal.submit(
        "webhook:1:7:1:v1", "webhook", "1", 7, {"project": 1, "task": 7, "annotation": 7}, "store"
    )
    finished = runtime.journal.wait(record.id, 60)
    assert finished.state == "done" and finished.result["superseded"] == 7
    assert stored == []


def test_the_still_current_check_runs_while_the_prediction_is_encoded(monkeypatch):
    """The check of the annotation (a Label Studio round trip) and the encoding of the
    prediction for storing run at once: each waits here for the other to have started, which
    one after the other would never see. A changed annotation gives nothing to store."""
    asked, encoded = threading.Event(), threading.Event()
    encode = model.encode

    def encoding(prediction):
        assert asked.wait(5)
        encoded.set()
        return encode(prediction)

    def current():
        asked.set()
        return encoded.wait(5)

    monkeypatch.setattr(model, "encode", encoding)
    prediction = {"result": [{"id": "xl1f0"}], "score": 0.5, "model_version": "v"}
    stored = model.encoded_if_current(prediction, current)
    assert stored == prediction and json.loads(stored.json) == prediction
    asked.clear()
    assert model.encoded_if_current(prediction, lambda: asked.set() or False) is None


def test_an_encoded_prediction_is_stored_as_the_same_json(tmp_path, monkeypatch):
    """Storing an encoded prediction sends its text with the task id: the same JSON object as
    the plain prediction would be, with the token, a timeout and no redirects."""
    sent = []

    def request(method, url, **kwargs):
        sent.append((method, url, kwargs))
        reply = requests.Response()
        reply.status_code, reply._content = 201, b'{"id": 5}'
        return reply

    monkeypatch.setattr(studio.requests, "request", request)
    client = studio.LabelStudio(make_settings(tmp_path))
    prediction = {"result": [{"id": "xl1f0", "value": {"rle": [1, 2]}}], "score": 0.5}
    assert client.create_prediction(9, studio.encode(prediction)) == 5
    assert client.create_prediction(9, prediction) == 5
    (_, url, encoded), (_, _, plain) = sent
    assert url == "http://ls.invalid:8080/api/predictions"
    assert json.loads(encoded["data"]) == plain["json"] == {"task": 9, **prediction}
    assert encoded["headers"]["Content-Type"] == "application/json"
    for kwargs in (encoded, plain):
        assert kwargs["headers"]["Authorization"] == "Token t0123456"
        assert kwargs["timeout"] and kwargs["allow_redirects"] is False


def test_an_object_left_out_of_a_keyframe_is_absent_there(client):
    """The keyframe rule of model/keyframes.py, as the FiftyOne plugin applies it too: the
    person painted the chair and a patch of floor on frame 0, then the chair alone on frame 4
    (the floor region deleted there): the floor is absent on frame 4 and after it."""
    task = keyframe_task(8, "mask", "Chair")
    patch = np.zeros((160, 240), bool)
    patch[120:150, 150:200] = True
    floor = dict(
        task["annotations"][0]["result"][0],
        value={"format": "rle", "rle": mask_to_rle(patch), "brushlabels": ["Chair"]},
    )
    chair_4 = read_label_mask(DATA / "chair" / "masks" / "frame_000004.png") == 1
    on_4 = dict(
        task["annotations"][0]["result"][0],
        item_index=4,
        value={"format": "rle", "rle": mask_to_rle(chair_4), "brushlabels": ["Chair"]},
    )
    task["annotations"][0]["result"] += [floor, on_4]
    reply = client.post(
        "/predict",
        json={"tasks": [task], "project": "1.0", "label_config": config("mask", "Chair")},
    )
    assert reply.status_code == 200, reply.json
    (prediction,) = reply.json["results"]
    objects = {}
    for region in prediction["result"]:
        objects.setdefault(region["item_index"], set()).add(region["id"][:4])
    assert objects[0] == {"xl1k", "xl2k"} and objects[1] == {"xl1f", "xl2f"}
    assert objects[4] == {"xl1k"}
    assert all(objects[frame] == {"xl1f"} for frame in (5, 6, 7))


@pytest.mark.parametrize("case", ["first run", "superseded", "correction"])
def test_a_job_stores_a_first_batch_while_the_rest_propagates(runtime, monkeypatch, case):
    """A webhook job on a 16-frame task stores the first 10 frames at once (with a note in the
    status TextArea), then its whole prediction, which replaces them; a job whose annotation
    changed meanwhile withdraws its first batch and stores nothing; a task that has a
    prediction already (a correction) keeps showing it: no first batch."""
    superseded = case == "superseded"
    task = keyframe_task(7, "mask", "Chair")
    task["data"]["frames"] = FRAME_URLS * 2
    if case == "correction":
        task["predictions"] = [3]  # as Label Studio's export lists them
    schema = config("mask", "Chair").replace(
        "</View>", '<TextArea name="xmem_status" toName="image" readonly="true"/></View>'
    )
    # in the export the job starts from; read before storing the first batch, and when done
    saved = {**task["annotations"][0], "id": 7, "task": 7, "updated_at": "v1"}
    versions = iter(["v1", "v2" if superseded else "v1"])
    calls = []
    monkeypatch.setattr(
        studio.LabelStudio, "project", lambda self, i: {"id": i, "label_config": schema}
    )
    monkeypatch.setattr(
        studio.LabelStudio, "task", lambda self, p, t: {**task, "annotations": [saved]}
    )
    monkeypatch.setattr(
        studio.LabelStudio,
        "annotation",
        lambda self, i: {**saved, "updated_at": next(versions)},
    )
    monkeypatch.setattr(
        studio.LabelStudio,
        "create_prediction",
        lambda self, task_id, prediction: calls.append(("first", prediction)) or 41,
    )
    monkeypatch.setattr(
        studio.LabelStudio,
        "store_prediction",
        lambda self, task_id, prediction: calls.append(("whole", prediction)) or 42,
    )
    monkeypatch.setattr(
        studio.LabelStudio, "delete_prediction", lambda self, i: calls.append(("withdrawn", i))
    )
    record, _ = runtime.journal.submit(
        "webhook:1:7:1:v1", "webhook", "1", 7, {"project": 1, "task": 7, "annotation": 7}, "store"
    )
    assert runtime.journal.wait(record.id, 60).state == "done"
    if case == "correction":
        assert [call[0] for call in calls] == ["whole"]
        return
    assert [call[0] for call in calls] == ["first", "withdrawn" if superseded else "whole"]
    first = calls[0][1]
    frames = sorted(r["item_index"] for r in first["result"] if r["type"] == "brushlabels")
    assert frames == list(range(10))
    (status,) = [r for r in first["result"] if r["type"] == "textarea"]
    assert status["value"]["text"] == ["xmem-label: 10 of 16 frames so far, the rest follows"]
    if superseded:
        assert calls[1] == ("withdrawn", 41)
    else:
        whole = calls[1][1]
        assert len([r for r in whole["result"] if r["type"] == "brushlabels"]) == 16
        assert first["model_version"] == whole["model_version"]
        # the first batch's regions are the whole's, bit for bit
        assert all(region in whole["result"] for region in first["result"][:-1])
