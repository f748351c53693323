"""Corrections cost a segment: after add_mask on a propagated session, the next propagation
runs the network only for the passes the new keyframe starts, and equals a from-scratch run of
the same keyframes frame for frame (flow engine on real frames; XMem in tests/xmem)."""

from __future__ import annotations

import numpy as np
import pytest

from xmem_label.model import Session, load_engine, read_label_mask
from xmem_label.model.results import FrameResult

from .conftest import DATA, numbered_frames

CHAIR = DATA / "vos" / "chair"


def chair_truth() -> list[np.ndarray]:
    return [read_label_mask(path) for path in sorted((CHAIR / "masks").glob("*.png"))]


def same(a: list[FrameResult], b: list[FrameResult]) -> bool:
    return len(a) == len(b) and all(
        x.index == y.index and (x.labels == y.labels).all() and x.objects == y.objects
        for x, y in zip(a, b, strict=True)
    )


def scratch(engine, frames, keyframes: dict[int, np.ndarray]) -> list[FrameResult]:
    with Session(engine, frames) as session:
        for index, labels in keyframes.items():
            session.add_mask(index, labels)
        return session.run()


def test_a_correction_reruns_only_its_segment_and_equals_a_fresh_run(monkeypatch):
    engine = load_engine("flow")
    truth = chair_truth()
    last = len(truth) - 1
    with Session(engine, CHAIR / "frames") as session:
        session.add_mask(0, truth[0])
        session.add_mask(4, truth[4])
        session.add_mask(last, truth[last])
        before = session.run()
        assert session.network_steps == 2 * 4 + 2 * (last - 4)  # both passes of each segment

        session.add_mask(2, truth[2])
        fused = []
        fuse = session._fuse
        monkeypatch.setattr(
            session, "_fuse", lambda index, *a: fused.append(index) or fuse(index, *a)
        )
        after = session.run()
        assert fused == [1, 2, 3]  # every other frame comes back from disk, as it was
        # the new keyframe's backward pass (frames 2, 1) and forward pass (2, 3); the passes
        # from 0 and 4 are read from disk up to frame 2
        assert session.network_steps == 4
        assert same(
            after, scratch(engine, CHAIR / "frames", {k: truth[k] for k in (0, 2, 4, last)})
        )
        assert same(after[4:], before[4:])  # outside the segment 0..4 nothing changes
        assert after[2].objects[1].source == "keyframe"
        assert after[1].objects[1].source == "fused" and after[1].objects[1].keyframes == (0, 2)


def test_passes_kept_in_a_cache_dir_serve_a_later_session(tmp_path):
    engine = load_engine("flow")
    truth = chair_truth()
    runs = []
    for _ in range(2):
        with Session(engine, CHAIR / "frames", cache_dir=tmp_path / "passes") as session:
            session.add_mask(0, truth[0])
            session.add_mask(7, truth[7])
            runs.append((session.run(), session.network_steps))
    (first, first_steps), (second, second_steps) = runs
    assert (first_steps, second_steps) == (14, 0)
    assert same(first, second)


def test_a_changed_keyframe_replaces_its_passes_and_the_old_ones_are_deleted(copy_engine):
    session = Session(copy_engine, numbered_frames(6))
    mask = np.zeros((8, 10), bool)
    mask[0:2, 0:2] = True
    session.add_object_mask(0, 1, mask)
    session.run()
    assert session.stored_pass_bytes()[1] == 5
    session.add_object_mask(0, 1, np.roll(mask, 3, axis=1))
    results = session.run()
    assert session.network_steps == 6  # the forward pass from 0 again: its mask changed
    assert session.stored_pass_bytes()[1] == 5  # the old pass is gone
    assert results[5].objects[1].box == (3, 0, 5, 2)


def test_a_pass_that_must_now_reach_further_is_run_again(copy_engine):
    session = Session(copy_engine, numbered_frames(6))
    mask = np.zeros((8, 10), bool)
    mask[0:2, 0:2] = True
    session.add_object_mask(0, 1, mask)
    session.add_object_mask(3, 1, mask)
    session.run()
    # a new object on frame 0 only: the pass from 0 now tracks objects 1 and 2 to the end
    session.add_object_mask(0, 2, np.roll(mask, 4, axis=0))
    results = session.run()
    assert [entry[0] for entry in copy_engine.passes[-1]] == [0, 1, 2, 3, 4, 5]
    assert all(r.objects[2].area == 4 for r in results)


def test_suggestions_skip_keyframes_and_spread_over_the_clip():
    engine = load_engine("flow")
    truth = chair_truth()
    with Session(engine, CHAIR / "frames") as session:
        session.add_mask(0, truth[0])
        with pytest.raises(Exception, match="propagate the clip first"):
            session.suggest(2)
        session.run()
        suggestions = session.suggest(3)
    assert len(suggestions) == 3
    assert 0 not in [s.index for s in suggestions]
    assert len({s.index for s in suggestions}) == 3
    assert all(s.reasons for s in suggestions)
    assert max(s.index for s in suggestions) - min(s.index for s in suggestions) >= 3
