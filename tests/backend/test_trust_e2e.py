"""Attacks on the backend and its durability, each against the real Label Studio and a real
backend process: every attack fails and stores nothing; a killed backend loses no job.

A small HTTP server on 127.0.0.1 plays the attacker's host: it counts every request and
whether a token came with it.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import subprocess
import time

import pytest
import requests
from PIL import Image

from xmem_label.backend.formats import is_first_batch
from xmem_label.backend.settings import BackendSettings
from xmem_label.backend.studio import LabelStudio

from .conftest import BACKEND_AUTH, TOKEN, run_backend, xmem_label_command
from .test_label_studio_e2e import (
    SEQUENCE_CONFIG,
    add_task,
    brush,
    chair,
    clip_urls,
    wait_for_prediction,
)
from .test_media import Server, trickle


@pytest.fixture(scope="module")
def attacker():
    server = Server({"/x.jpg": (200, {}, b"x"), "/slow.jpg": (200, {}, trickle())})
    yield server
    server.close()


@pytest.fixture(scope="module")
def project(label_studio, backend):
    project_id = label_studio.project("trust", SEQUENCE_CONFIG)
    project = {"id": project_id, "urls": clip_urls(label_studio, project_id)}
    project["ml"] = label_studio.connect(project_id, backend)
    return project


def predict(backend: str, project: dict, task: dict, auth=BACKEND_AUTH, **kwargs):
    return requests.post(
        f"{backend}/predict",
        auth=auth,
        timeout=60,
        json={
            "tasks": [task],
            "project": f"{project['id']}.0",
            "label_config": SEQUENCE_CONFIG,
            "params": {"context": None},
        },
        **kwargs,
    )


def keyframed(frames: list[str], task_id: int = 424242) -> dict:
    return {
        "id": task_id,
        "data": {"frames": frames},
        "annotations": [{"id": 1, "result": [brush(0, "Chair", chair(0))]}],
    }


def test_every_route_but_health_needs_credentials(backend):
    assert requests.get(f"{backend}/health", timeout=5).status_code == 200
    for path in ("/setup", "/predict", "/webhook"):
        assert requests.post(f"{backend}{path}", json={}, timeout=5).status_code == 401
    assert requests.get(f"{backend}/metrics", timeout=5).status_code == 401


def test_webhook_cannot_move_an_annotation_to_another_task(label_studio, backend, project):
    """A webhook naming task B with an annotation of task A (another project here) is refused,
    with or without credentials, and neither task gets a prediction."""
    other = {"id": label_studio.project("victim", SEQUENCE_CONFIG)}
    other["urls"] = clip_urls(label_studio, other["id"])
    label_studio.connect(other["id"], backend)
    victim = add_task(label_studio, other, other["urls"], None)
    source = add_task(label_studio, project, project["urls"], None)
    annotation = label_studio.api(
        "POST", f"/api/tasks/{source}/annotations", json={"result": [brush(0, "Chair", chair(0))]}
    )
    wait_for_prediction(label_studio, source)  # its own, genuine webhook
    forged = {
        "action": "ANNOTATION_UPDATED",
        "task": {"id": victim},
        "annotation": {"id": annotation["id"]},
        "project": {"id": other["id"], "label_config": SEQUENCE_CONFIG},
    }
    assert requests.post(f"{backend}/webhook", json=forged, timeout=10).status_code == 401
    reply = requests.post(f"{backend}/webhook", json=forged, auth=BACKEND_AUTH, timeout=10)
    assert reply.status_code == 403 and "is not an annotation of task" in reply.json()["error"]
    forged["project"]["id"] = 99999  # a project that never connected
    reply = requests.post(f"{backend}/webhook", json=forged, auth=BACKEND_AUTH, timeout=10)
    assert reply.status_code == 403 and "not connected" in reply.json()["error"]
    time.sleep(2)
    assert label_studio.predictions(victim) == []
    assert len(label_studio.predictions(source)) == 1


def test_setup_cannot_redirect_the_token(label_studio, backend, project, attacker):
    """/setup's hostname and token are ignored: the next saved annotation's job talks to the
    configured Label Studio only."""
    reply = requests.post(
        f"{backend}/setup",
        auth=BACKEND_AUTH,
        timeout=10,
        json={
            "project": f"{project['id']}.0",
            "schema": SEQUENCE_CONFIG,
            "hostname": attacker.url,
            "access_token": "stolen",
        },
    )
    assert reply.status_code == 200
    task = add_task(label_studio, project, project["urls"], [brush(0, "Chair", chair(0))])
    assert wait_for_prediction(label_studio, task)["model_version"].startswith("xmem-label-0")
    assert attacker.requests == []


@pytest.mark.parametrize(
    "frame",
    [
        "{attacker}/x.jpg",  # another port on loopback
        "http://169.254.169.254/latest/meta-data",  # the cloud metadata address
        "{attacker}/slow.jpg",  # a frame that trickles in forever
        "file:///etc/passwd",
    ],
)
def test_task_urls_cannot_reach_other_hosts(label_studio, backend, project, attacker, frame):
    frames = [*project["urls"][:3], frame.format(attacker=attacker.url)]
    started = time.monotonic()
    reply = predict(backend, project, keyframed(frames))
    assert reply.status_code == 400
    assert (
        "not on the configured Label Studio" in reply.json()["error"]
        or "unsupported media URL" in reply.json()["error"]
    )
    assert "refused" not in reply.text.lower() and "127.0.0.1" not in reply.text
    assert time.monotonic() - started < 5 and attacker.requests == []
    # the job threads are free: a good task is predicted right after
    assert predict(backend, project, keyframed(project["urls"])).status_code == 200


def test_decompression_bomb_and_oversized_body_are_refused(label_studio, backend, project):
    folder = label_studio.media_folder(project["id"], "bomb")
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, "PNG")  # 400 megapixels in a small file
    (folder / "bomb.png").write_bytes(buffer.getvalue())
    frames = [*project["urls"][:2], label_studio.url_of(folder / "bomb.png")]
    reply = predict(backend, project, keyframed(frames))
    assert reply.status_code == 400
    assert "has more pixels than the backend's limit" in reply.json()["error"]
    huge = requests.post(
        f"{backend}/predict",
        auth=BACKEND_AUTH,
        timeout=60,
        data=b"{" + b" " * (65 << 20) + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert huge.status_code == 413
    assert requests.get(f"{backend}/health", timeout=5).status_code == 200


def test_prelabel_on_does_not_deadlock_the_webhook(label_studio, backend, project):
    """With "use predictions to prelabel" on (Label Studio's default), opening a task calls
    /predict; the webhook job reads its task without opening it, so it never waits on itself."""
    label_studio.api(
        "PATCH", f"/api/projects/{project['id']}", json={"show_collab_predictions": True}
    )
    try:
        task = add_task(label_studio, project, project["urls"], None)
        started = time.monotonic()
        label_studio.api(
            "POST", f"/api/tasks/{task}/annotations", json={"result": [brush(0, "Chair", chair(0))]}
        )
        prediction = wait_for_prediction(label_studio, task, seconds=60)
        assert time.monotonic() - started < 30
        assert prediction["model_version"].startswith("xmem-label-0")
        opened = label_studio.api("GET", f"/api/tasks/{task}")  # what the UI does
        assert len(opened["predictions"]) == 1
    finally:
        label_studio.api(
            "PATCH", f"/api/projects/{project['id']}", json={"show_collab_predictions": False}
        )


def test_health_answers_while_propagations_queue(label_studio, backend, project):
    frames = project["urls"][:3]
    label_studio.api(
        "POST",
        f"/api/projects/{project['id']}/import",
        json=[{"frames": frames} for _ in range(20)],
    )
    ids = sorted(task["id"] for task in label_studio.tasks(project["id"]))[-20:]
    tasks = [keyframed(frames, task_id) for task_id in ids]
    latencies = []
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = [pool.submit(predict, backend, project, task) for task in tasks]
        time.sleep(0.5)
        for _ in range(20):
            started = time.monotonic()
            assert requests.get(f"{backend}/health", timeout=5).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.1)
        statuses = [reply.result().status_code for reply in replies]
    assert set(statuses) <= {200, 503}, statuses
    print(
        f"/health under 20 concurrent /predict: max {max(latencies) * 1000:.0f} ms, "
        f"median {sorted(latencies)[10] * 1000:.0f} ms"
    )
    assert max(latencies) < 1.0


def test_a_killed_backend_loses_no_job(label_studio, tmp_path_factory):
    """kill -9 of the whole backend (master and worker) while a webhook job runs: the job is in
    the journal, the restarted backend takes it up when its lease expires, and the task ends
    with exactly one prediction, of the same model version as before."""
    state = tmp_path_factory.mktemp("durable-state")
    env = {"MODEL_DIR": str(state), "XMEM_LABEL_JOB_LEASE": "2"}
    first = run_backend(label_studio, tmp_path_factory, env=env, keep_process=True)
    url, process = next(first)
    project_id = label_studio.project("durable", SEQUENCE_CONFIG)
    project = {"id": project_id, "urls": clip_urls(label_studio, project_id)}
    label_studio.connect(project_id, url)
    version = requests.get(f"{url}/versions", auth=BACKEND_AUTH, timeout=10).json()["versions"]
    long_clip = project["urls"] * 12  # 96 frames: a few seconds of propagation
    task = add_task(label_studio, project, long_clip, None)
    label_studio.api(
        "POST", f"/api/tasks/{task}/annotations", json={"result": [brush(0, "Chair", chair(0))]}
    )
    deadline = time.monotonic() + 30
    while (
        requests.get(f"{url}/metrics", auth=BACKEND_AUTH, timeout=5).json()["jobs"]["running"] == 0
    ):
        assert time.monotonic() < deadline, "the webhook job never started"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # nothing stored but, perhaps, the killed job's first batch
    assert all(is_first_batch(p) for p in label_studio.predictions(task))

    second = run_backend(label_studio, tmp_path_factory, env=env, port=int(url.rsplit(":", 1)[1]))
    restarted = next(second)
    try:
        prediction = wait_for_prediction(label_studio, task, seconds=120)
        assert prediction["model_version"] == version[0]
        assert len([r for r in prediction["result"] if r.get("item_index") == 95]) == 1
        time.sleep(3)
        assert [p["id"] for p in label_studio.predictions(task)] == [prediction["id"]]
        jobs = requests.get(f"{restarted}/metrics", auth=BACKEND_AUTH, timeout=5).json()["jobs"]
        assert jobs["running"] == 0 and jobs["queued"] == 0
    finally:
        for generator in (second, first):
            generator.close()


def test_serve_refuses_an_open_address_without_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASIC_AUTH")}
    done = subprocess.run(
        [xmem_label_command(), "serve", "--host", "0.0.0.0", "--engine", "flow"],
        env=dict(env, MODEL_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without credentials" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_racing_stores_for_one_task_leave_one_prediction(label_studio, project, tmp_path):
    """Two workers storing a prediction of the same version on one task at once: the later
    one stays, every earlier one is deleted."""
    client = LabelStudio(
        BackendSettings.from_environment(
            {
                "LABEL_STUDIO_URL": label_studio.url,
                "LABEL_STUDIO_API_KEY": TOKEN,
                "MODEL_DIR": str(tmp_path),
            }
        )
    )
    task = add_task(label_studio, project, project["urls"][:2], None)
    prediction = {"result": [], "score": 0.5, "model_version": "xmem-label-race"}
    for _ in range(5):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            ids = list(pool.map(lambda _: client.store_prediction(task, prediction), range(2)))
        assert [p["id"] for p in label_studio.predictions(task)] == [max(ids)]
