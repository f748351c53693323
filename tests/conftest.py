"""Shared test helpers, and the markers that separate unit tests from end-to-end ones.

A test is `e2e` when it needs a real server (Label Studio, the backend, mongod for FiftyOne) or
is marked `browser`; `pytest -m "not e2e"` is the fast loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
# Fixtures that start real servers; a test using any of them (directly or through another
# fixture) is end-to-end.
SERVER_FIXTURES = {"label_studio", "backend", "impatient_backend", "mongod"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(item.fixturenames) or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.e2e)


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
        return {"engine": "copy"}

    def new_tracker(self, num_frames):
        self.passes.append([])
        return CopyTracker(self.passes[-1])


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
