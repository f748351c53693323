"""The Tracker contract (model/engine.py), checked on every engine: each registered engine
(XMem with the fixture's synthetic weights, flow) and the two baselines of model/baselines.py.

The session relies on exactly this: probabilities of shape (1 + objects, H, W), float32, one
distribution per pixel, background first; a prompted object's channel equals its prompt on that
frame; channels follow `object_ids`, in the order objects were first prompted; an all-False
prompt makes the object absent there; `last` and the pass direction change nothing of the
shape. Frames are small real ones (the chair clip at 120x80), so every engine runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from xmem_label.model import load_engine, read_label_mask
from xmem_label.model.baselines import CopyFirstMaskEngine, DisWarpEngine
from xmem_label.model.engine import registered_engines

CHAIR = Path(__file__).parent / "data" / "vos" / "chair"
SIZE = (120, 80)  # width, height


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    paths = sorted((CHAIR / "frames").glob("*.jpg"))
    return [
        cv2.resize(cv2.imread(str(p))[:, :, ::-1], SIZE, interpolation=cv2.INTER_AREA)
        for p in paths
    ]


@pytest.fixture(scope="module")
def chair_mask() -> np.ndarray:
    mask = read_label_mask(CHAIR / "masks" / "frame_000000.png") == 1
    return cv2.resize(mask.astype(np.uint8), SIZE, interpolation=cv2.INTER_NEAREST) > 0


def engine_loaders(weights: Callable[[], Path]) -> dict[str, Callable]:
    """Every engine to check, by name: the registered ones and the baselines."""
    options = {"xmem": lambda: {"weights": weights(), "device": "cpu", "size": -1}}
    loaders = {
        name: (lambda name=name: load_engine(name, **options.get(name, dict)()))
        for name in registered_engines()
    }
    return {**loaders, "dis-warp": DisWarpEngine, "copy": CopyFirstMaskEngine}


ENGINE_NAMES = [*registered_engines(), "dis-warp", "copy"]


@pytest.fixture(scope="module", params=ENGINE_NAMES)
def engine(request, xmem_weights_path):
    return engine_loaders(lambda: xmem_weights_path)[request.param]()


def run_pass(engine, frames, prompts: dict[int, dict[int, np.ndarray]]) -> list[torch.Tensor]:
    tracker = engine.new_tracker(len(frames))
    outputs = []
    for index, frame in enumerate(frames):
        probs = tracker.step(frame, prompts.get(index), last=index == len(frames) - 1)
        outputs.append(probs.detach().float().cpu())
        assert probs.dtype == torch.float32
        assert tuple(probs.shape) == (1 + len(tracker.object_ids), *frame.shape[:2])
    return outputs, tracker.object_ids


def test_probabilities_are_distributions_with_background_first(engine, frames, chair_mask):
    outputs, object_ids = run_pass(engine, frames, {0: {1: chair_mask}})
    assert object_ids == [1]
    for probs in outputs:
        assert torch.isfinite(probs).all()
        assert probs.min() >= -1e-4 and probs.max() <= 1 + 1e-4
        assert torch.allclose(probs.sum(0), torch.ones(probs.shape[1:]), atol=2e-3)
    first = outputs[0]
    assert torch.equal(first[1] > 0.5, torch.from_numpy(chair_mask))  # the prompt, exactly
    assert torch.equal(first[0] > 0.5, torch.from_numpy(~chair_mask))  # background first


def test_objects_keep_the_order_they_were_first_prompted_in(engine, frames, chair_mask):
    floor = np.zeros_like(chair_mask)
    floor[60:75, 5:60] = True
    floor &= ~chair_mask
    outputs, object_ids = run_pass(engine, frames, {0: {7: floor}, 2: {3: chair_mask}})
    assert object_ids == [7, 3]
    assert outputs[0].shape[0] == 2 and outputs[2].shape[0] == 3
    assert torch.equal(outputs[0][1] > 0.5, torch.from_numpy(floor))
    assert torch.equal(outputs[2][2] > 0.5, torch.from_numpy(chair_mask))


def test_an_all_false_prompt_makes_the_object_absent_there(engine, frames, chair_mask):
    absent = np.zeros_like(chair_mask)
    outputs, object_ids = run_pass(engine, frames, {0: {1: chair_mask}, 4: {1: absent}})
    assert object_ids == [1]
    assert not (outputs[4][1] > 0.5).any()
    assert (outputs[4][0] > 0.5).all()


def test_a_backward_pass_is_the_same_contract(engine, frames, chair_mask):
    backward = frames[::-1]
    outputs, object_ids = run_pass(engine, backward, {0: {1: chair_mask}})
    assert object_ids == [1] and len(outputs) == len(frames)
    assert torch.equal(outputs[0][1] > 0.5, torch.from_numpy(chair_mask))


def test_passes_are_independent(engine, frames, chair_mask):
    first, _ = run_pass(engine, frames[:3], {0: {1: chair_mask}})
    again, _ = run_pass(engine, frames[:3], {0: {1: chair_mask}})
    for a, b in zip(first, again, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
