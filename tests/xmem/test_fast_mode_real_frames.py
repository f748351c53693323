"""XMem's fast modes (bf16, int8) against exact mode on real frames: the comparison of
test_equivalence.py's fast-mode test, on the chair clip of tests/data/vos.

Exact mode's run of the clip is made once, recorded, and replayed to the test of each fast mode
(`ReplayedEngine`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmem_label.model import load_engine
from xmem_label.model.evaluation import compare_clip

from .test_equivalence import FAST_DECIDED_AGREEMENT, FAST_MAX_DIFFERENCE, FAST_PRECISIONS

CHAIR = Path(__file__).parents[1] / "data" / "vos" / "chair"


class ReplayedEngine:
    """Records `engine`'s first pass and hands that pass's probabilities to every later pass,
    which must see the same frames and prompts: exact mode is deterministic, so the fast modes
    are compared against one exact run of a clip instead of one run each."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.name
        self.steps: list[tuple] | None = None  # (frame, prompt, last, object_ids, probs)

    def describe(self):
        return self.engine.describe()

    def new_tracker(self, num_frames):
        if self.steps is None:
            self.steps = []
            return RecordingTracker(self.engine.new_tracker(num_frames), self.steps)
        return ReplayingTracker(self.steps)


class RecordingTracker:
    def __init__(self, tracker, steps: list[tuple]):
        self.tracker = tracker
        self.steps = steps

    @property
    def object_ids(self) -> list[int]:
        return self.tracker.object_ids

    def step(self, frame, prompt=None, *, last=False):
        probs = self.tracker.step(frame, prompt, last=last)
        self.steps.append((frame.copy(), prompt, last, list(self.object_ids), probs.clone()))
        return probs


class ReplayingTracker:
    def __init__(self, steps: list[tuple]):
        self.steps = iter(steps)
        self.object_ids: list[int] = []

    def step(self, frame, prompt=None, *, last=False):
        recorded_frame, recorded_prompt, recorded_last, self.object_ids, probs = next(self.steps)
        assert np.array_equal(frame, recorded_frame) and last == recorded_last
        assert (prompt or {}).keys() == (recorded_prompt or {}).keys()
        assert all(np.array_equal(mask, recorded_prompt[i]) for i, mask in (prompt or {}).items())
        return probs.clone()


@pytest.fixture(scope="module")
def chair_exact(xmem_weights_path) -> ReplayedEngine:
    return ReplayedEngine(
        load_engine("xmem", weights=xmem_weights_path, device="cpu", precision="fp32")
    )


@pytest.mark.parametrize("precision", FAST_PRECISIONS)
def test_fast_mode_agrees_with_exact_mode_on_real_frames(xmem_weights_path, chair_exact, precision):
    """The same comparison on real frames (the weight-free engine's keyframe setup: first
    ground-truth mask, forward): tests/data/vos/chair, 8 frames at 854x480, default size 480.
    `python -m benchmarks.fast_mode` runs it on every clip of the shared data."""
    fast = load_engine("xmem", weights=xmem_weights_path, device="cpu", precision=precision)
    figures = compare_clip(CHAIR, chair_exact, fast)
    print(f"{precision} vs fp32 on chair: {figures}")
    assert figures["agreement"] >= 0.99
    assert figures["decided_agreement"] >= FAST_DECIDED_AGREEMENT
    assert figures["max_difference"] <= FAST_MAX_DIFFERENCE[precision]
