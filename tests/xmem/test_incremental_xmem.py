"""XMem (fixture weights, fixture clip): a correction re-runs only the passes its keyframe
starts, and the result equals a from-scratch run of the same keyframes, frame for frame."""

from __future__ import annotations

import numpy as np
from PIL import Image

from xmem_label.model import Session, load_engine

from .test_equivalence import fixture_frames

FRAMES = 8  # of the fixture clip, at half size: the property, not the figures, is tested here


def half(image: np.ndarray, resample: Image.Resampling) -> np.ndarray:
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width // 2, height // 2), resample))


def test_incremental_xmem_equals_a_fresh_run(xmem_fixture_dir, xmem_weights_path):
    engine = load_engine("xmem", weights=xmem_weights_path, size=-1, device="cpu")
    frames = [half(frame, Image.Resampling.BILINEAR) for frame in fixture_frames(xmem_fixture_dir)]
    frames = frames[:FRAMES]
    first = np.array(Image.open(xmem_fixture_dir / "clip" / "mask_00000.png"))
    first = half(first, Image.Resampling.NEAREST)
    shifted = np.roll(first, 3, axis=1)  # any mask will do as a person's correction
    keyframes = {0: first, 4: shifted, FRAMES - 1: first}

    with Session(engine, frames) as session:
        for index, labels in keyframes.items():
            session.add_mask(index, labels)
        before = session.run()
        session.add_mask(2, shifted)
        after = session.run()
        assert session.network_steps == 4  # backward 2, 1; forward 2, 3
    with Session(engine, frames) as fresh:
        for index, labels in {**keyframes, 2: shifted}.items():
            fresh.add_mask(index, labels)
        expected = fresh.run()
    for ours, theirs in zip(after, expected, strict=True):
        assert (ours.labels == theirs.labels).all(), ours.index
        assert ours.objects == theirs.objects, ours.index
    for ours, untouched in zip(after[4:], before[4:], strict=True):
        assert (ours.labels == untouched.labels).all() and ours.objects == untouched.objects
