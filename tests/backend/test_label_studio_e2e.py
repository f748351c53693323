"""End to end against a real Label Studio 1.23.2 server and a real `xmem-label serve` process.

Every propagated mask is read back from Label Studio's API, decoded, and compared with what the
engine ("flow") computes in this process for the same clip (tests/data/vos/chair, 8 frames
240x160) and the same keyframes; every result passes the SDK's validate_prediction.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from label_studio_sdk.label_interface import LabelInterface

from xmem_label.backend.formats import is_first_batch
from xmem_label.backend.rle import mask_to_rle, rle_to_mask
from xmem_label.model import Session, load_engine, read_label_mask
from xmem_label.model.prompts import mask_from_box, mask_from_points

from .conftest import BACKEND_AUTH, TOKEN

CLIP = Path(__file__).resolve().parents[1] / "data" / "vos" / "chair"
FRAMES = sorted((CLIP / "frames").glob("*.jpg"))
WIDTH, HEIGHT = 240, 160
SEQUENCE_CONFIG = """<View>
  <Image name="image" valueList="$frames"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Chair" background="#D4380D"/><Label value="Floor" background="#1D39C4"/>
  </BrushLabels>
  <RectangleLabels name="prompt" toName="image" smart="true">
    <Label value="Chair"/>
  </RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Chair"/></KeyPointLabels>
  <TextArea name="xmem_status" toName="image" rows="1" readonly="true"/>
</View>"""
VIDEO_CONFIG = """<View>
  <Labels name="videoLabels" toName="video"><Label value="Chair"/></Labels>
  <Video name="video" value="$video" framerate="10"/>
  <VideoRectangle name="box" toName="video"/>
</View>"""


# ----- helpers -------------------------------------------------------------------------------


def chair(frame: int) -> np.ndarray:
    return read_label_mask(CLIP / "masks" / FRAMES[frame].name.replace(".jpg", ".png")) == 1


def floor() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[125:155, 10:110] = True
    return mask & ~chair(0)


def brush(frame: int, label: str, mask: np.ndarray, **extra) -> dict:
    return {
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "item_index": frame,
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "origin": "manual",
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
        **extra,
    }


def engine_labels(source, keyframes: dict[int, dict[int, np.ndarray | None]]) -> list:
    """What the engine computes for `source` and keyframes {frame: {object: mask or None for
    absent}}."""
    with Session(load_engine("flow"), source) as session:
        for frame, masks in keyframes.items():
            for object_id, mask in masks.items():
                if mask is None:
                    session.set_absent(frame, object_id)
                else:
                    session.add_object_mask(frame, object_id, mask)
        return [result.labels for result in session.propagate()]


def brush_regions(result: list[dict]) -> list[dict]:
    """The brush regions of a prediction (beside them: the status TextArea's suggestions)."""
    return [region for region in result if region["type"] == "brushlabels"]


def decoded_labels(result: list[dict], num_frames: int) -> list[np.ndarray]:
    """Brush regions -> one label mask per frame; the object id comes from the region id."""
    labels = [np.zeros((HEIGHT, WIDTH), np.uint8) for _ in range(num_frames)]
    for region in brush_regions(result):
        object_id = int(region["id"][2:].replace("k", "f").split("f")[0])
        mask = rle_to_mask(
            region["value"]["rle"], region["original_width"], region["original_height"]
        )
        assert not (labels[region["item_index"]] & mask).any(), "regions overlap"
        labels[region["item_index"]][mask] = object_id
    return labels


def wait_for_prediction(label_studio, task_id: int, skip_ids=(), seconds: float = 180) -> dict:
    """The first whole prediction (not a first batch) stored on the task, but for skip_ids."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        fresh = [
            p
            for p in label_studio.predictions(task_id)
            if p["id"] not in skip_ids and not is_first_batch(p)
        ]
        if fresh:
            return fresh[0]
        time.sleep(0.5)
    raise AssertionError(f"no prediction stored for task {task_id} within {seconds} s")


def assert_valid(label_config: str, prediction: dict) -> None:
    assert LabelInterface(label_config).validate_prediction({"result": prediction["result"]})
    assert prediction["model_version"].startswith("xmem-label-0.1.0-flow-no-weights-")
    assert 0.0 <= prediction["score"] <= 1.0


# ----- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sequence_project(label_studio, backend):
    """An image-sequence project holding the chair clip; tasks are added by the tests."""
    project_id = label_studio.project("sequence", SEQUENCE_CONFIG)
    return {"id": project_id, "urls": clip_urls(label_studio, project_id), "ml": None}


def clip_urls(label_studio, project_id: int) -> list[str]:
    """The chair frames, served to the project from its own Local Storage folder."""
    folder = label_studio.media_folder(project_id, "chair")
    for path in FRAMES:
        shutil.copy(path, folder / path.name)
    return [label_studio.url_of(folder / path.name) for path in FRAMES]


def add_task(label_studio, project: dict, frames: list[str], annotation: list[dict] | None):
    label_studio.api("POST", f"/api/projects/{project['id']}/import", json=[{"frames": frames}])
    task = max(label_studio.tasks(project["id"]), key=lambda t: t["id"])
    if annotation is not None:
        label_studio.api(
            "POST", f"/api/tasks/{task['id']}/annotations", json={"result": annotation}
        )
    return task["id"]


def connect(label_studio, project: dict, backend: str) -> int:
    if project["ml"] is None:
        project["ml"] = label_studio.connect(project["id"], backend)
    return project["ml"]


# ----- flow 1: keyframe masks -> brush masks on every frame ------------------------------------


def test_retrieve_predictions_propagates_keyframes_to_every_frame(
    label_studio, backend, sequence_project
):
    keyframe = [brush(0, "Chair", chair(0)), brush(0, "Floor", floor())]
    task_id = add_task(label_studio, sequence_project, sequence_project["urls"], keyframe)
    connect(label_studio, sequence_project, backend)  # after the annotation: no webhook yet

    label_studio.retrieve_predictions(sequence_project["id"], [task_id])
    (prediction,) = label_studio.predictions(task_id)

    assert_valid(SEQUENCE_CONFIG, prediction)
    expected = engine_labels(CLIP / "frames", {0: {1: chair(0), 2: floor()}})
    got = decoded_labels(prediction["result"], len(FRAMES))
    for frame, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert np.array_equal(want, have), f"frame {frame} differs"
    regions = brush_regions(prediction["result"])
    assert {r["item_index"] for r in regions} == set(range(len(FRAMES)))
    assert all(r["original_width"] == WIDTH and r["original_height"] == HEIGHT for r in regions)
    labels = {r["id"]: r["value"]["brushlabels"] for r in regions}
    assert labels["xl1f4"] == ["Chair"] and labels["xl2f4"] == ["Floor"]
    # the keyframe comes back exactly as drawn; scores per region and for the task
    assert (
        next(r for r in prediction["result"] if r["id"] == "xl1k0")["value"]["rle"]
        == (keyframe[0]["value"]["rle"])
    )
    assert prediction["score"] == pytest.approx(min(r["score"] for r in regions), abs=1e-3)
    assert prediction["score"] < 1.0
    # provenance on every predicted region, the frames to check next in the status TextArea
    on_4 = next(r for r in regions if r["id"] == "xl1f4")
    assert on_4["meta"]["text"] == ["xmem-label: forward from keyframe 1"]
    (status,) = [r for r in prediction["result"] if r["type"] == "textarea"]
    assert status["from_name"] == "xmem_status" and len(status["value"]["text"]) == 5
    assert all(line.startswith("check frame ") for line in status["value"]["text"])


def test_webhook_stores_prediction_then_correction_repropagates(
    label_studio, backend, sequence_project
):
    connect(label_studio, sequence_project, backend)
    task_id = add_task(label_studio, sequence_project, sequence_project["urls"], None)
    annotation = label_studio.api(  # fires ANNOTATION_CREATED -> /webhook
        "POST",
        f"/api/tasks/{task_id}/annotations",
        json={"result": [brush(0, "Chair", chair(0)), brush(0, "Floor", floor())]},
    )
    first = wait_for_prediction(label_studio, task_id)
    assert_valid(SEQUENCE_CONFIG, first)
    expected = engine_labels(CLIP / "frames", {0: {1: chair(0), 2: floor()}})
    for want, have in zip(expected, decoded_labels(first["result"], len(FRAMES)), strict=True):
        assert np.array_equal(want, have)

    # The person accepts the prediction and repaints the chair on frame 5.
    corrected = [dict(region, origin="prediction") for region in brush_regions(first["result"])]
    corrected = [r for r in corrected if r["id"] != "xl1f5"]
    corrected.append(brush(5, "Chair", chair(5), id="xl1f5", origin="prediction-changed"))
    label_studio.api(
        "PATCH", f"/api/annotations/{annotation['id']}", json={"result": corrected}
    )  # fires ANNOTATION_UPDATED
    second = wait_for_prediction(label_studio, task_id, skip_ids={first["id"]})
    assert_valid(SEQUENCE_CONFIG, second)
    floor_on_5 = decoded_labels(first["result"], len(FRAMES))[5] == 2
    expected = engine_labels(
        CLIP / "frames", {0: {1: chair(0), 2: floor()}, 5: {1: chair(5), 2: floor_on_5}}
    )
    for want, have in zip(expected, decoded_labels(second["result"], len(FRAMES)), strict=True):
        assert np.array_equal(want, have)
    edited = next(r for r in second["result"] if r["id"] == "xl1k5")
    assert edited["value"]["rle"] == mask_to_rle(chair(5))  # exactly as the person left it
    between = next(r for r in second["result"] if r["id"] == "xl1f3")
    assert between["meta"]["text"] == ["xmem-label: fused from keyframes 1 and 6"]
    assert [p["id"] for p in label_studio.predictions(task_id)] == [second["id"]]


def test_a_long_task_shows_its_first_frames_while_the_rest_propagates(
    label_studio, backend, sequence_project
):
    """A 192-frame task: the webhook's job stores its first 10 frames as soon as they are out
    (the status TextArea says so), then the whole prediction, which replaces them."""
    connect(label_studio, sequence_project, backend)
    task_id = add_task(label_studio, sequence_project, sequence_project["urls"] * 24, None)
    label_studio.api(
        "POST", f"/api/tasks/{task_id}/annotations", json={"result": [brush(0, "Chair", chair(0))]}
    )
    first = None
    deadline = time.monotonic() + 120
    while first is None and time.monotonic() < deadline:
        stored = label_studio.predictions(task_id)
        first = next((p for p in stored if is_first_batch(p)), None)
        assert not [p for p in stored if not is_first_batch(p)], "the whole came first"
        time.sleep(0.1)
    assert first is not None
    assert_valid(SEQUENCE_CONFIG, first)
    brushes = [r for r in first["result"] if r["type"] == "brushlabels"]
    assert sorted(r["item_index"] for r in brushes) == list(range(10))
    whole = wait_for_prediction(label_studio, task_id)
    assert len([r for r in whole["result"] if r["type"] == "brushlabels"]) == 192
    assert all(region in whole["result"] for region in brushes)  # the same masks, bit for bit
    time.sleep(1)
    assert [p["id"] for p in label_studio.predictions(task_id)] == [whole["id"]]

    # A correction: the task keeps showing its prediction until the new one replaces it.
    (annotation,) = label_studio.api("GET", f"/api/tasks/{task_id}/annotations")
    label_studio.api(
        "PATCH",
        f"/api/annotations/{annotation['id']}",
        json={"result": [brush(0, "Chair", chair(0)), brush(5, "Chair", chair(5))]},
    )
    deadline = time.monotonic() + 120
    while True:
        stored = label_studio.predictions(task_id)
        assert not any(is_first_batch(p) for p in stored)
        if len(stored) == 1 and stored[0]["id"] != whole["id"]:
            break  # the new one stored and the old one deleted
        assert time.monotonic() < deadline, "no new prediction"
        time.sleep(0.1)
    (after,) = stored
    assert len([r for r in after["result"] if r["type"] == "brushlabels"]) == 192


def test_propagation_longer_than_the_predict_window_is_stored_through_the_api(
    label_studio, impatient_backend
):
    project_id = label_studio.project("impatient", SEQUENCE_CONFIG)
    task_id = add_task(
        label_studio,
        {"id": project_id},
        clip_urls(label_studio, project_id),
        [brush(0, "Chair", chair(0))],
    )
    label_studio.connect(project_id, impatient_backend)
    started = time.monotonic()
    label_studio.retrieve_predictions(project_id, [task_id])
    assert time.monotonic() - started < 5
    prediction = wait_for_prediction(label_studio, task_id)
    assert_valid(SEQUENCE_CONFIG, prediction)
    expected = engine_labels(CLIP / "frames", {0: {1: chair(0)}})
    for want, have in zip(expected, decoded_labels(prediction["result"], len(FRAMES)), strict=True):
        assert np.array_equal(want, have)


# ----- flow 2: smart box prompt -> mask on its frame -> propagated ------------------------------


def test_smart_box_prompt_returns_suggestions_for_the_clip(label_studio, backend, sequence_project):
    ml_id = connect(label_studio, sequence_project, backend)
    task_id = add_task(label_studio, sequence_project, sequence_project["urls"], None)
    ys, xs = np.nonzero(chair(2))
    x0, y0, x1, y1 = xs.min() - 3, ys.min() - 3, xs.max() + 4, ys.max() + 4
    prompt = {
        "from_name": "prompt",
        "to_name": "image",
        "type": "rectanglelabels",
        "item_index": 2,
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "origin": "manual",
        "value": {
            "x": 100 * x0 / WIDTH,
            "y": 100 * y0 / HEIGHT,
            "width": 100 * (x1 - x0) / WIDTH,
            "height": 100 * (y1 - y0) / HEIGHT,
            "rotation": 0,
            "rectanglelabels": ["Chair"],
        },
    }
    reply = label_studio.api(
        "POST",
        f"/api/ml/{ml_id}/interactive-annotating",
        json={"task": task_id, "context": {"result": [prompt]}},
    )
    suggestion = reply["data"]
    assert_valid(SEQUENCE_CONFIG, suggestion)
    frame_2 = cv2.cvtColor(cv2.imread(str(FRAMES[2])), cv2.COLOR_BGR2RGB)
    box = (
        100 * x0 / WIDTH * WIDTH / 100,
        100 * y0 / HEIGHT * HEIGHT / 100,
        100 * x0 / WIDTH * WIDTH / 100 + 100 * (x1 - x0) / WIDTH * WIDTH / 100,
        100 * y0 / HEIGHT * HEIGHT / 100 + 100 * (y1 - y0) / HEIGHT * HEIGHT / 100,
    )
    mask = mask_from_box(frame_2, box)
    iou = (mask & chair(2)).sum() / (mask | chair(2)).sum()
    assert iou > 0.3, iou
    expected = engine_labels(CLIP / "frames", {2: {1: mask}})
    for want, have in zip(expected, decoded_labels(suggestion["result"], len(FRAMES)), strict=True):
        assert np.array_equal(want, have)
    assert label_studio.predictions(task_id) == []  # suggestions are not stored


def test_smart_point_prompt_returns_suggestions_for_the_clip(
    label_studio, backend, sequence_project
):
    ml_id = connect(label_studio, sequence_project, backend)
    task_id = add_task(label_studio, sequence_project, sequence_project["urls"], None)
    ys, xs = np.nonzero(chair(1))
    x, y = float(np.median(xs)), float(np.median(ys))
    point = {
        "from_name": "point",
        "to_name": "image",
        "type": "keypointlabels",
        "item_index": 1,
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "origin": "manual",
        "value": {
            "x": 100 * x / WIDTH,
            "y": 100 * y / HEIGHT,
            "width": 0.5,
            "keypointlabels": ["Chair"],
        },
    }
    reply = label_studio.api(
        "POST",
        f"/api/ml/{ml_id}/interactive-annotating",
        json={"task": task_id, "context": {"result": [point]}},
    )
    suggestion = reply["data"]
    assert_valid(SEQUENCE_CONFIG, suggestion)
    frame_1 = cv2.cvtColor(cv2.imread(str(FRAMES[1])), cv2.COLOR_BGR2RGB)
    mask = mask_from_points(
        frame_1, [(100 * x / WIDTH * WIDTH / 100, 100 * y / HEIGHT * HEIGHT / 100)]
    )
    expected = engine_labels(CLIP / "frames", {1: {1: mask}})
    for want, have in zip(expected, decoded_labels(suggestion["result"], len(FRAMES)), strict=True):
        assert np.array_equal(want, have)


# ----- bad input: 4xx with a reason, nothing stored --------------------------------------------


def test_bad_input_is_refused_with_a_reason_and_nothing_is_stored(
    label_studio, backend, sequence_project
):
    connect(label_studio, sequence_project, backend)
    urls = sequence_project["urls"]
    wrong_size = brush(0, "Chair", np.ones((HEIGHT + 20, WIDTH), bool))
    wrong_size["original_height"] = HEIGHT + 20
    malformed = brush(0, "Chair", chair(0))
    malformed["value"]["rle"] = malformed["value"]["rle"][:7]
    cases = {
        "no keyframe": add_task(label_studio, sequence_project, urls, None),
        "the keyframe masks are 240x180 but the frames are 240x160": add_task(
            label_studio, sequence_project, urls, [wrong_size]
        ),
        "malformed brush RLE": add_task(label_studio, sequence_project, urls, [malformed]),
        "Label Studio answered HTTP 404": add_task(
            label_studio,
            sequence_project,
            [*urls[:3], urls[3].replace("frame_", "missing_")],
            [brush(0, "Chair", chair(0))],
        ),
        "has no frames": add_task(
            label_studio, sequence_project, [], [brush(0, "Chair", chair(0))]
        ),
    }
    for reason, task_id in cases.items():
        task = label_studio.api("GET", f"/api/tasks/{task_id}")
        reply = requests.post(
            f"{backend}/predict",
            timeout=120,
            auth=BACKEND_AUTH,
            json={
                "tasks": [task],
                "project": f"{sequence_project['id']}.0",
                "label_config": SEQUENCE_CONFIG,
                "params": {"context": None},
            },
        )
        assert reply.status_code == 400, (reason, reply.text)
        assert reason in reply.json()["error"], (reason, reply.json())

    # Each task's webhook job failed too: the task holds one failure note with the reason in
    # the config's read-only status field, and no masks.
    label_studio.retrieve_predictions(sequence_project["id"], list(cases.values()))
    assert label_studio.predictions(cases.pop("no keyframe")) == []  # no annotation, no job
    for reason, task_id in cases.items():
        note = wait_for_prediction(label_studio, task_id)
        time.sleep(0.5)  # a second note or prediction would be stored by now
        assert label_studio.predictions(task_id) == [note]
        assert note["model_version"] == "xmem-label-failed" and note["score"] == 0
        (status,) = note["result"]
        assert status["from_name"] == "xmem_status" and status["type"] == "textarea"
        assert reason in status["value"]["text"][0], (reason, status)

    unsupported = requests.post(
        f"{backend}/setup",
        timeout=10,
        auth=BACKEND_AUTH,
        json={
            "project": "999.0",
            "schema": "<View><Image name='i' value='$image'/>"
            "<Choices name='c' toName='i'><Choice value='a'/></Choices></View>",
        },
    )
    assert unsupported.status_code == 400
    assert "no supported tag pair" in unsupported.json()["error"]
    not_json = requests.post(f"{backend}/predict", data="tasks", timeout=10, auth=BACKEND_AUTH)
    assert not_json.status_code == 400 and "JSON object" in not_json.json()["error"]


# ----- flow 3: video keyframe boxes -> one box track per object ---------------------------------


def write_webm(path: Path) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"VP90"), 10.0, (WIDTH, HEIGHT))
    for frame in FRAMES:
        writer.write(cv2.imread(str(frame)))
    writer.release()


def test_video_keyframe_box_becomes_a_track_on_every_frame(label_studio, backend):
    project_id = label_studio.project("video", VIDEO_CONFIG)
    folder = label_studio.media_folder(project_id, "video")
    write_webm(folder / "chair.webm")
    ys, xs = np.nonzero(chair(0))
    x, y = 100 * (xs.min() - 2) / WIDTH, 100 * (ys.min() - 2) / HEIGHT
    width = 100 * (xs.max() - xs.min() + 5) / WIDTH
    height = 100 * (ys.max() - ys.min() + 5) / HEIGHT
    track = {
        "from_name": "box",
        "to_name": "video",
        "type": "videorectangle",
        "origin": "manual",
        "value": {
            "framesCount": 8,
            "duration": 0.8,
            "labels": ["Chair"],
            "sequence": [
                {
                    "frame": 1,
                    "enabled": True,
                    "rotation": 0,
                    "time": 0.1,
                    "x": x,
                    "y": y,
                    "width": width,
                    "height": height,
                }
            ],
        },
    }
    label_studio.api(
        "POST",
        f"/api/projects/{project_id}/import",
        json=[{"video": label_studio.url_of(folder / "chair.webm")}],
    )
    (task,) = label_studio.tasks(project_id)
    label_studio.api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [track]})
    label_studio.connect(project_id, backend)

    label_studio.retrieve_predictions(project_id, [task["id"]])
    (prediction,) = label_studio.predictions(task["id"])
    assert_valid(VIDEO_CONFIG, prediction)
    (region,) = prediction["result"]
    assert region["type"] == "videorectangle" and region["value"]["labels"] == ["Chair"]

    capture = cv2.VideoCapture(str(folder / "chair.webm"))
    first = cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB)
    capture.release()
    box = (
        x * WIDTH / 100,
        y * HEIGHT / 100,
        x * WIDTH / 100 + width * WIDTH / 100,
        y * HEIGHT / 100 + height * HEIGHT / 100,
    )
    expected = engine_labels(folder / "chair.webm", {0: {1: mask_from_box(first, box)}})
    sequence = region["value"]["sequence"]
    present = [index for index, labels in enumerate(expected) if (labels == 1).any()]
    assert [item["frame"] for item in sequence] == [index + 1 for index in present]
    assert sequence[-1]["enabled"] is False
    for item in sequence:
        ys, xs = np.nonzero(expected[item["frame"] - 1] == 1)
        assert item["x"] == pytest.approx(100 * xs.min() / WIDTH)
        assert item["y"] == pytest.approx(100 * ys.min() / HEIGHT)
        assert item["width"] == pytest.approx(100 * (xs.max() + 1 - xs.min()) / WIDTH)
        assert item["height"] == pytest.approx(100 * (ys.max() + 1 - ys.min()) / HEIGHT)
        assert item["time"] == pytest.approx(item["frame"] / 10)

    # A correction through the webhook: a second box on frame 6 that ends the track there.
    annotation = label_studio.api("GET", f"/api/tasks/{task['id']}")["annotations"][0]
    ys, xs = np.nonzero(chair(5))
    second = {
        "frame": 6,
        "enabled": False,
        "rotation": 0,
        "time": 0.6,
        "x": 100 * (xs.min() - 2) / WIDTH,
        "y": 100 * (ys.min() - 2) / HEIGHT,
        "width": 100 * (xs.max() - xs.min() + 5) / WIDTH,
        "height": 100 * (ys.max() - ys.min() + 5) / HEIGHT,
    }
    track["value"]["sequence"].append(second)
    label_studio.api("PATCH", f"/api/annotations/{annotation['id']}", json={"result": [track]})
    corrected = wait_for_prediction(label_studio, task["id"], skip_ids={prediction["id"]})
    assert_valid(VIDEO_CONFIG, corrected)
    capture = cv2.VideoCapture(str(folder / "chair.webm"))
    frame_6 = [cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB) for _ in range(6)][-1]
    capture.release()
    box_6 = (
        second["x"] * WIDTH / 100,
        second["y"] * HEIGHT / 100,
        second["x"] * WIDTH / 100 + second["width"] * WIDTH / 100,
        second["y"] * HEIGHT / 100 + second["height"] * HEIGHT / 100,
    )
    expected = engine_labels(
        folder / "chair.webm",
        {0: {1: mask_from_box(first, box)}, 5: {1: mask_from_box(frame_6, box_6)}, 6: {1: None}},
    )
    sequence = corrected["result"][0]["value"]["sequence"]
    assert [item["frame"] for item in sequence] == [1, 2, 3, 4, 5, 6]  # absent from frame 7
    assert [item["enabled"] for item in sequence] == [True] * 5 + [False]
    for item in sequence:
        ys, xs = np.nonzero(expected[item["frame"] - 1] == 1)
        assert item["x"] == pytest.approx(100 * xs.min() / WIDTH)
        assert item["width"] == pytest.approx(100 * (xs.max() + 1 - xs.min()) / WIDTH)


# ----- flow 4: import video files as image-sequence tasks --------------------------------------


def test_import_videos_creates_image_sequence_tasks(label_studio, backend, tmp_path):
    project_id = label_studio.project("imported", SEQUENCE_CONFIG)
    video = tmp_path / "chair.webm"
    write_webm(video)
    command = [
        str(Path(sys.executable).parent / "xmem-label"),
        "import-videos",
        str(video),
        "--project",
        str(project_id),
        "--url",
        label_studio.url,
        "--token",
        TOKEN,
        "--document-root",
        str(label_studio.media_root),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "created 1 task(s)" in done.stdout
    (task,) = label_studio.tasks(project_id)
    frames = task["data"]["frames"]
    assert len(frames) == len(FRAMES)
    served = label_studio.http.get(label_studio.url + frames[3], timeout=30)
    assert served.status_code == 200
    image = cv2.imdecode(np.frombuffer(served.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (HEIGHT, WIDTH, 3)

    # The imported task is propagated like any other.
    label_studio.api(
        "POST",
        f"/api/tasks/{task['id']}/annotations",
        json={"result": [brush(0, "Chair", chair(0))]},
    )
    label_studio.connect(project_id, backend)
    label_studio.retrieve_predictions(project_id, [task["id"]])
    (prediction,) = label_studio.predictions(task["id"])
    assert_valid(SEQUENCE_CONFIG, prediction)
    written = label_studio.media_root / "xmem-label" / f"project-{project_id}" / "chair"
    expected = engine_labels(written, {0: {1: chair(0)}})
    for want, have in zip(expected, decoded_labels(prediction["result"], len(FRAMES)), strict=True):
        assert np.array_equal(want, have)

    again = subprocess.run(
        [*command[:2], str(tmp_path / "missing.mp4"), *command[3:]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
