"""The flow engine on synthetic clips: textured squares moving over a textured background."""

from __future__ import annotations

import numpy as np
import pytest

from xmem_label.model import InputError, Session, load_engine
from xmem_label.model.flow import engine as flow_engine

HEIGHT, WIDTH = 192, 256
SIZE = 56


def _texture(seed: int, shape: tuple[int, int], low: int, high: int) -> np.ndarray:
    """Blocky random texture (4 px cells), so optical flow has something to follow."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(low, high, size=(shape[0] // 4 + 1, shape[1] // 4 + 1, 3))
    return np.kron(cells, np.ones((4, 4, 1)))[: shape[0], : shape[1]].astype(np.uint8)


BACKGROUND = _texture(0, (HEIGHT, WIDTH), 0, 110)
SQUARES = {1: _texture(1, (SIZE, SIZE), 150, 256), 2: _texture(2, (SIZE, SIZE), 130, 230)}


def _position(object_id: int, index: int) -> tuple[int, int]:
    """Top-left corner of square `object_id` on frame `index` (2 px per frame)."""
    if object_id == 1:
        return 20 + 2 * index, 16 + 4 * index
    return 100, 180 - 4 * index


def make_clip(count: int, visible=lambda object_id, index: True):
    """Frames and per-frame ground-truth label masks."""
    frames, truths = [], []
    for index in range(count):
        frame = BACKGROUND.copy()
        labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        for object_id, square in SQUARES.items():
            if not visible(object_id, index):
                continue
            y, x = _position(object_id, index)
            frame[y : y + SIZE, x : x + SIZE] = square
            labels[y : y + SIZE, x : x + SIZE] = object_id
        frames.append(frame)
        truths.append(labels)
    return frames, truths


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_moving_square_is_tracked():
    frames, truths = make_clip(12, visible=lambda obj, i: obj == 1)
    session = Session(load_engine("flow"), frames)
    session.add_mask(0, truths[0])
    results = session.run()
    assert len(results) == 12
    for result, truth in zip(results, truths, strict=True):
        assert result.labels.shape == (HEIGHT, WIDTH)
        assert iou(result.labels == 1, truth == 1) > 0.9, result.index


def test_two_objects_and_probabilities():
    frames, truths = make_clip(10)
    session = Session(load_engine("flow"), frames)
    session.add_mask(0, truths[0])
    results = session.run(with_probs=True)
    for result, truth in zip(results[1:], truths[1:], strict=True):
        assert result.probs.shape == (3, HEIGHT, WIDTH)
        assert result.probs.dtype == np.float32
        np.testing.assert_allclose(result.probs.sum(0), 1, atol=1e-4)
        for object_id in (1, 2):
            assert iou(result.labels == object_id, truth == object_id) > 0.85
            assert result.objects[object_id].confidence > 0.7


def test_object_appearing_later_and_backward_pass():
    frames, truths = make_clip(10)
    session = Session(load_engine("flow"), frames)
    session.add_object_mask(0, 1, truths[0] == 1)
    session.add_object_mask(5, 2, truths[5] == 2)
    results = session.run()
    for result, truth in zip(results, truths, strict=True):
        assert iou(result.labels == 1, truth == 1) > 0.85, result.index
        # frames 0..4 of object 2 come from the backward pass started on frame 5
        assert iou(result.labels == 2, truth == 2) > 0.85, result.index


def test_absent_object_is_removed():
    frames, truths = make_clip(8)
    session = Session(load_engine("flow"), frames)
    session.add_mask(0, truths[0])
    session.set_absent(4, 2)
    results = session.run(direction="forward")
    assert (results[3].labels == 2).sum() > 0
    for result in results[4:]:
        assert (result.labels == 2).sum() == 0
        assert iou(result.labels == 1, truths[result.index] == 1) > 0.85


def test_unknown_preset_is_refused():
    with pytest.raises(InputError, match="preset"):
        load_engine("flow", preset="slowest")


def test_describe_names_the_engine():
    description = load_engine("flow").describe()
    assert description.engine == "flow"
    assert description.weights is None


def test_loading_keeps_freed_memory(monkeypatch):
    """As XMem's loader: FiftyOne runs the plugin's operators outside the main thread, where
    glibc's defaults made the same frames measurably slower."""
    calls = []
    monkeypatch.setattr(flow_engine, "keep_freed_memory", lambda: calls.append(True))
    load_engine("flow")
    assert calls == [True]


def test_later_keyframe_corrects_the_object():
    """A wrong first mask (shifted) is followed until a keyframe gives the right one (one
    forward pass); reconciled, the frames before that keyframe get nearer to it too."""
    frames, truths = make_clip(12, visible=lambda obj, i: obj == 1)
    wrong = np.roll(truths[0], 24, axis=1)
    session = Session(load_engine("flow"), frames)
    session.add_mask(0, wrong)
    session.add_mask(6, truths[6])
    reconciled = session.run()
    results = session.run(direction="forward")
    assert iou(results[3].labels == 1, truths[3] == 1) < 0.7
    assert iou(reconciled[5].labels == 1, truths[5] == 1) > iou(
        results[5].labels == 1, truths[5] == 1
    )
    for result in reconciled[7:]:
        assert iou(result.labels == 1, truths[result.index] == 1) > 0.9, result.index
    assert results[6].is_keyframe and results[6].objects[1].keyframe
    np.testing.assert_array_equal(results[6].labels, truths[6])
    for result in results[7:]:
        assert iou(result.labels == 1, truths[result.index] == 1) > 0.9, result.index


def test_confidence_drops_when_the_object_vanishes():
    """Confidence is in [0, 1], high while the square is followed, and falls once it is gone
    (the flow still drags the old mask along, but the colours no longer fit)."""
    frames, truths = make_clip(12, visible=lambda obj, i: obj == 1 and i < 6)
    session = Session(load_engine("flow"), frames)
    session.add_mask(0, truths[0])
    confidences = [result.objects[1].confidence for result in session.run()]
    assert all(0 <= value <= 1 for value in confidences)
    assert min(confidences[1:6]) > 0.9
    assert max(confidences[6:]) < 0.8


@pytest.mark.parametrize("shape", [(1, 1), (8, 10), (16, 300)])
def test_tiny_and_thin_frames_work(shape):
    """DIS needs 12 px on a side: smaller frames are upscaled for the flow, not refused."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(4)]
    labels = np.zeros(shape, dtype=np.uint8)
    labels[: max(1, shape[0] // 2), : max(1, shape[1] // 2)] = 1
    session = Session(load_engine("flow"), frames)
    session.add_mask(1, labels)
    results = session.run(with_probs=True)
    assert [result.labels.shape for result in results] == [shape] * 4
    np.testing.assert_array_equal(results[1].labels, labels)
    for result in results:
        assert 0 <= result.objects[1].confidence <= 1
