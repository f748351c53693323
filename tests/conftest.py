"""Shared test helpers, and the markers that separate unit tests from end-to-end ones.

A test is `e2e` when it needs a real server (Label Studio, the backend, mongod for FiftyOne) or
is marked `browser`; `pytest -m "not e2e" -n 2` is the fast loop (docs/testing.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from xmem_label.model.engine import EngineDescription

DATA = Path(__file__).parent / "data"
XMEM_FIXTURES = Path(__file__).parent / "fixtures" / "xmem_reference"
WEIGHTS_SEED = 1
# From the fixture README: sha256 of every tensor's raw bytes, in manifest order.
WEIGHTS_SHA256 = "e3aa3c2cce3bf4f355c52fa8a7c39e476c0ef5d91a5133686bb71757cadc6007"
# Fixtures that start real servers; a test using any of them (directly or through another
# fixture) is end-to-end.
SERVER_FIXTURES = {"label_studio", "backend", "impatient_backend", "mongod"}
# The longest modules, run first: with `-n 2` (each module on one worker, pytest.ini) they start
# at once on the two workers, and the many short modules fill in behind them.
LONGEST_FIRST = ("tests/xmem/test_equivalence.py", "tests/xmem/test_fast_mode_real_frames.py")


def pytest_configure(config: pytest.Config) -> None:
    """Torch on one thread in every test process: XMem's figures then do not depend on which
    tests ran before, and the two workers of `-n 2` share the two cores without oversubscribing
    them (two threads per worker made a config of the equivalence test several times slower)."""
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(item.fixturenames) or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.e2e)
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONGEST_FIRST)


class CopyTracker:
    """A stand-in tracker for session tests: keeps each object's last mask, probability 0.9."""

    def __init__(self, log):
        self.object_ids: list[int] = []
        self.masks: dict[int, np.ndarray] = {}
        self.log = log

    def step(self, frame, prompt=None, *, last=False):
        self.log.append((frame[0, 0, 0], sorted(prompt or {}), last))
        for object_id, mask in (prompt or {}).items():
            if object_id not in self.object_ids:
                self.object_ids.append(object_id)
            self.masks[object_id] = mask
        h, w = frame.shape[:2]
        probs = torch.zeros((1 + len(self.object_ids), h, w))
        for channel, object_id in enumerate(self.object_ids, start=1):
            probs[channel] = torch.from_numpy(self.masks[object_id]).float() * 0.9
        probs[0] = 1 - probs[1:].sum(0)
        return probs


class CopyEngine:
    name = "copy"

    def __init__(self):
        self.passes: list[list] = []

    def describe(self):
        return EngineDescription(engine="copy", settings={})

    def new_tracker(self, num_frames):
        self.passes.append([])
        return CopyTracker(self.passes[-1])


TOY_ENGINE = '''"""A third engine from outside xmem-label, registered by an entry point."""
from xmem_label.model.baselines import DisWarpTracker
from xmem_label.model.engine import EngineDescription, EngineSpec

SPEC = EngineSpec("toy", "toy engine (keeps the keyframe's mask)", "toy_engine:load_toy_engine")


class ToyEngine:
    name = "toy"

    def describe(self):
        return EngineDescription(engine="toy", settings={})

    def new_tracker(self, num_frames):
        return DisWarpTracker(warp=False)


def load_toy_engine():
    return ToyEngine()
'''


@pytest.fixture(scope="session")
def toy_engine_path(tmp_path_factory) -> Path:
    """A folder holding an installed-looking package `toy-engine` (a module and its
    dist-info with an `xmem_label.engines` entry point): put it on sys.path or PYTHONPATH and
    every part of xmem-label offers the engine "toy". No file of xmem-label names it."""
    folder = tmp_path_factory.mktemp("toy-engine")
    (folder / "toy_engine.py").write_text(TOY_ENGINE)
    info = folder / "toy_engine-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-engine\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[xmem_label.engines]\ntoy = toy_engine:SPEC\n")
    return folder


@pytest.fixture
def toy_engine(toy_engine_path, monkeypatch) -> Path:
    """The toy engine registered in this process too."""
    monkeypatch.syspath_prepend(str(toy_engine_path))
    return toy_engine_path


def make_reference_state_dict(seed: int = WEIGHTS_SEED) -> dict[str, torch.Tensor]:
    """The synthetic XMem weights the reference fixtures were computed with (make_weights.py)."""
    spec = importlib.util.spec_from_file_location("make_weights", XMEM_FIXTURES / "make_weights.py")
    make_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_weights)
    manifest = json.loads((XMEM_FIXTURES / "state_dict_manifest.json").read_text())
    return make_weights.make_state_dict(manifest, seed)


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in state_dict.values():
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def xmem_weights_path(tmp_path_factory, worker_id) -> Path:
    """A .pth of the seed-1 synthetic weights, checked against the fixture's checksum; made
    once per test run for every test that runs XMem (under pytest-xdist the workers share the
    run's temporary root, and the first one to get here makes the file for all of them)."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    path = root / f"xmem_synthetic_seed{WEIGHTS_SEED}.pth"
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            state_dict = make_reference_state_dict()
            assert state_dict_sha256(state_dict) == WEIGHTS_SHA256
            partial = path.with_suffix(".partial")
            torch.save(state_dict, partial)
            partial.replace(path)
    return path


@pytest.fixture
def copy_engine():
    return CopyEngine()


def numbered_frames(count: int, height: int = 8, width: int = 10) -> list[np.ndarray]:
    """Frames whose pixel (0, 0, 0) holds their index, so tests can see the reading order."""
    frames = []
    for index in range(count):
        frame = np.zeros((height, width, 3), dtype=np.uint8)
        frame[0, 0, 0] = index
        frames.append(frame)
    return frames
