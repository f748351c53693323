"""The Label Studio backend against bad requests: a table of cases through the real Flask app
(frames from the repository's chair clip through LOCAL_FILES_DOCUMENT_ROOT, the flow engine, a
job journal in a scratch folder, job threads running).

Every case asserts the HTTP status, the reason in {"error": ...}, no traceback, that no
prediction was stored through Label Studio's API, and that no job completed or stayed queued
(input that can only be checked once the frames are read fails its job, and the request).
The attacks against a real Label Studio are in tests/backend/test_trust_e2e.py.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from xmem_label.backend import studio
from xmem_label.backend.app import create_app
from xmem_label.backend.model import Runtime
from xmem_label.backend.rle import mask_to_rle
from xmem_label.backend.settings import BackendSettings
from xmem_label.model import read_label_mask

DATA = Path(__file__).resolve().parents[1] / "data" / "vos"
AUTH = ("label-studio", "s3cret-for-tests")
CONFIG = (
    '<View><Image name="image" valueList="$frames"/><BrushLabels name="mask" '
    'toName="image"><Label value="Chair"/></BrushLabels></View>'
)
VIDEO_CONFIG = (
    '<View><Labels name="l" toName="v"><Label value="Chair"/></Labels>'
    '<Video name="v" value="$video"/><VideoRectangle name="box" toName="v"/></View>'
)
FRAMES = [f"/data/local-files/?d=chair/frames/frame_{i:06d}.jpg" for i in range(8)]


def region(**changes) -> dict:
    mask = read_label_mask(DATA / "chair" / "masks" / "frame_000000.png") == 1
    value = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["Chair"]}
    base = {
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "item_index": 0,
        "original_width": 240,
        "original_height": 160,
        "value": value,
    }
    return {**base, **changes}


def task(frames=FRAMES, regions=None) -> dict:
    return {
        "id": 5,
        "data": {"frames": frames},
        "annotations": [{"id": 1, "result": [region()] if regions is None else regions}],
    }


def predict(body_task=None, **changes) -> dict:
    body = {
        "tasks": [task() if body_task is None else body_task],
        "project": "1.0",
        "label_config": CONFIG,
        "params": {"context": None},
    }
    return {**body, **changes}


def webhook(**changes) -> dict:
    body = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 1, "label_config": CONFIG},
        "task": {"id": 5},
        "annotation": {"id": 1},
    }
    return {**body, **changes}


def truncated_rle() -> dict:
    broken = region()
    broken["value"] = dict(broken["value"], rle=broken["value"]["rle"][:7])
    return broken


CASES = [
    # (id, route, body, status, reason)
    ("predict: not JSON", "/predict", "tasks", 400, "JSON object"),
    ("predict: a list body", "/predict", [1, 2], 400, "JSON object"),
    (
        "predict: no task list",
        "/predict",
        {"project": "1.0", "label_config": CONFIG},
        400,
        "no task list",
    ),
    ("predict: empty task list", "/predict", predict(tasks=[]), 400, "no tasks"),
    ("predict: a task that is not an object", "/predict", predict(tasks=["x"]), 400, "JSON object"),
    ("predict: no label config", "/predict", predict(label_config=None), 400, "no label config"),
    (
        "predict: unparseable config",
        "/predict",
        predict(label_config="<View><Image"),
        400,
        "cannot parse the label config",
    ),
    (
        "predict: unsupported config",
        "/predict",
        predict(label_config='<View><Text name="t" value="$t"/></View>'),
        400,
        "no supported tag pair",
    ),
    (
        "predict: image without valueList",
        "/predict",
        predict(
            label_config='<View><Image name="image" value="$img"/><BrushLabels name="mask" '
            'toName="image"><Label value="Chair"/></BrushLabels></View>'
        ),
        400,
        "valueList",
    ),
    ("predict: no frames", "/predict", predict(task(frames=[])), 400, "has no frames"),
    (
        "predict: a frame that is not a URL",
        "/predict",
        predict(task(frames=[*FRAMES[:2], 7])),
        400,
        "must be a URL",
    ),
    (
        "predict: no annotation",
        "/predict",
        predict({"id": 5, "data": {"frames": FRAMES}}),
        400,
        "no keyframe",
    ),
    ("predict: empty annotation", "/predict", predict(task(regions=[])), 400, "no keyframe"),
    (
        "predict: truncated RLE",
        "/predict",
        predict(task(regions=[truncated_rle()])),
        400,
        "malformed brush RLE",
    ),
    (
        "predict: keyframe on a frame past the end",
        "/predict",
        predict(task(regions=[region(item_index=40)])),
        400,
        "frame",
    ),
    (
        "predict: keyframe of another size",
        "/predict",
        predict(task(regions=[region(original_height=200)])),
        400,
        "",
    ),
    (
        "predict: frame on another host",
        "/predict",
        predict(task(frames=[*FRAMES[:3], "http://127.0.0.1:6379/x.jpg"])),
        400,
        "not on the configured Label Studio",
    ),
    (
        "predict: link-local frame",
        "/predict",
        predict(task(frames=["http://169.254.169.254/latest/meta-data", *FRAMES[1:]])),
        400,
        "not on the configured Label Studio",
    ),
    (
        "predict: file URL",
        "/predict",
        predict(task(frames=["file:///etc/passwd", *FRAMES[1:]])),
        400,
        "unsupported media URL",
    ),
    (
        "predict: local file outside the root",
        "/predict",
        predict(task(frames=["/data/local-files/?d=../../../etc/passwd", *FRAMES[1:]])),
        400,
        "LOCAL_FILES_DOCUMENT_ROOT",
    ),
    (
        "predict: a frame that is not an image",
        "/predict",
        predict(task(frames=[*FRAMES[:2], "/data/local-files/?d=README.md"])),
        400,
        "is not an image",
    ),
    (
        "predict: video task without annotation",
        "/predict",
        predict({"id": 5, "data": {"video": "/data/upload/1/v.mp4"}}, label_config=VIDEO_CONFIG),
        400,
        "no keyframe",
    ),
    (
        "predict: context that is not an object",
        "/predict",
        predict(params={"context": "box"}),
        400,
        "params.context",
    ),
    (
        "setup: unsupported config",
        "/setup",
        {"project": "1.0", "schema": "<View/>"},
        400,
        "no supported tag pair",
    ),
    ("setup: not JSON", "/setup", "x", 400, "JSON object"),
    ("webhook: not JSON", "/webhook", "x", 400, "JSON object"),
    (
        "webhook: task id not an integer",
        "/webhook",
        webhook(task={"id": "5; DROP"}),
        400,
        "task.id must be a non-negative integer",
    ),
    ("webhook: no annotation id", "/webhook", webhook(annotation={}), 400, "annotation.id"),
    (
        "webhook: project not an object",
        "/webhook",
        webhook(project=3),
        400,
        "project must be a JSON object",
    ),
    (
        "webhook: project never connected",
        "/webhook",
        webhook(project={"id": 77, "label_config": CONFIG}),
        403,
        "not connected",
    ),
    (
        "webhook: annotation of another task",
        "/webhook",
        webhook(annotation={"id": 2}),
        403,
        "is not an annotation of task 5",
    ),
    ("unknown route", "/train", {}, 404, "not found"),
]


@pytest.fixture(scope="module")
def app_and_runtime(tmp_path_factory):
    settings = BackendSettings.from_environment(
        {
            "LOCAL_FILES_DOCUMENT_ROOT": str(DATA),
            "MODEL_DIR": str(tmp_path_factory.mktemp("s")),
            "XMEM_LABEL_ENGINE": "flow",
            "LABEL_STUDIO_URL": "http://label-studio.invalid:8080",
            "LABEL_STUDIO_API_KEY": "t0123456",
            "BASIC_AUTH_USER": AUTH[0],
            "BASIC_AUTH_PASS": AUTH[1],
        }
    )
    runtime = Runtime(dataclasses.replace(settings, sync_seconds=30.0)).start()
    client = create_app(runtime).test_client()
    assert (
        client.post("/setup", json={"project": "1.0", "schema": CONFIG}, auth=AUTH).status_code
        == 200
    )
    yield client, runtime
    runtime.runner.stop()


@pytest.mark.parametrize(
    ("route", "body", "status", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_request_is_refused_and_nothing_is_stored(
    app_and_runtime, monkeypatch, route, body, status, reason
):
    client, runtime = app_and_runtime
    stored = []
    monkeypatch.setattr(
        studio.LabelStudio,
        "store_prediction",
        lambda self, task_id, prediction: stored.append(task_id),
    )
    monkeypatch.setattr(
        studio.LabelStudio,
        "annotation",  # Label Studio: annotation 1 of task 5
        lambda self, i: {"id": i, "task": 5 if i == 1 else 6},
    )
    monkeypatch.setattr(studio.LabelStudio, "task", lambda self, project, task_id: None)
    before = runtime.journal.counts()
    sent = copy.deepcopy(body)
    if isinstance(sent, str):
        reply = client.post(route, data=sent, auth=AUTH, content_type="application/json")
    else:
        reply = client.post(route, json=sent, auth=AUTH)
    assert reply.status_code == status, reply.json
    assert reason.lower() in reply.json["error"].lower()
    assert "Traceback" not in reply.get_data(as_text=True)
    assert stored == []
    after = runtime.journal.counts()
    assert after["done"] == before["done"] and after["queued"] == before["queued"] == 0
