"""Session: keyframe bookkeeping, pass order, merging, outputs (with a stand-in engine)."""

import numpy as np
import pytest
import torch

from xmem_label.model import InputError, Session

from .conftest import numbered_frames


def box_mask(y0, y1, x0, x1, shape=(8, 10)):
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_forward_from_first_keyframe_flags_the_last_frame(copy_engine):
    session = Session(copy_engine, numbered_frames(5))
    labels = np.zeros((8, 10), np.uint8)
    labels[1:3, 1:3] = 4
    session.add_mask(0, labels)
    results = session.run()
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert copy_engine.passes == [
        [(0, [4], False), (1, [], False), (2, [], False), (3, [], False), (4, [], True)]
    ]
    assert results[0].objects[4].keyframe and not results[1].objects[4].keyframe
    assert results[3].objects[4].area == 4
    assert results[3].objects[4].box == (1, 1, 3, 3)
    # passes are kept on disk in steps of 1/255 between propagations: 0.9 comes back as 230/255
    assert results[3].objects[4].confidence == pytest.approx(230 / 255, abs=1e-6)
    assert (results[2].labels == labels).all()
    assert [r.objects[4].source for r in results] == ["keyframe"] + ["forward"] * 4
    assert results[3].objects[4].keyframes == (0,)


def test_forward_direction_keeps_float32_probabilities(copy_engine):
    session = Session(copy_engine, numbered_frames(3))
    session.add_object_mask(0, 4, box_mask(1, 3, 1, 3))
    results = session.run(direction="forward")
    assert results[2].objects[4].confidence == pytest.approx(0.9)
    assert results[2].objects[4].source == "forward"


def test_object_added_later_is_filled_backward(copy_engine):
    session = Session(copy_engine, numbered_frames(6))
    session.add_object_mask(0, 1, box_mask(0, 2, 0, 2))
    session.add_object_mask(3, 2, box_mask(5, 8, 5, 9))
    results = session.run()
    # each keyframe runs its own passes, over the objects given there, to the clip's ends
    backward, forward_from_0, forward_from_3 = copy_engine.passes
    assert [entry[0] for entry in backward] == [3, 2, 1, 0]
    assert backward[-1][2] is True
    assert [entry[0] for entry in forward_from_0] == [0, 1, 2, 3, 4, 5]
    assert [entry[0] for entry in forward_from_3] == [3, 4, 5]
    assert all(r.objects[2].area == 12 for r in results)
    assert [r.objects[2].keyframe for r in results] == [False, False, False, True, False, False]
    assert [r.objects[2].source for r in results] == ["backward"] * 3 + ["keyframe"] + [
        "forward"
    ] * 2


def test_forward_only_leaves_frames_before_the_keyframe_empty(copy_engine):
    session = Session(copy_engine, numbered_frames(4))
    session.add_object_mask(2, 7, box_mask(0, 2, 0, 2))
    results = session.run(direction="forward")
    assert len(copy_engine.passes) == 1
    assert [r.objects[7].area for r in results] == [0, 0, 4, 4]


def test_absent_declaration_reaches_the_tracker(copy_engine):
    session = Session(copy_engine, numbered_frames(4))
    session.add_object_mask(0, 1, box_mask(0, 2, 0, 2))
    session.set_absent(2, 1)
    results = session.run(direction="forward")
    assert [r.objects[1].area for r in results] == [4, 4, 0, 0]


def test_absence_is_fused_with_the_mask_by_distance(copy_engine):
    session = Session(copy_engine, numbered_frames(5))
    session.add_object_mask(0, 1, box_mask(0, 2, 0, 2))
    session.set_absent(3, 1)
    results = session.run()
    # frame 1: present weighs 0.9 x 2 against absent 1 x 1; frame 2: 0.9 x 1 against 1 x 2
    assert [r.objects[1].area for r in results] == [4, 4, 0, 0, 0]
    assert [r.objects[1].source for r in results] == [
        "keyframe", "fused", "fused", "keyframe", "forward"
    ]  # fmt: skip
    assert results[1].objects[1].keyframes == (0, 3)
    assert len(copy_engine.passes) == 1  # absent on frame 3: no pass starts there


def test_keyframe_mask_is_returned_verbatim(copy_engine):
    session = Session(copy_engine, numbered_frames(3))
    labels = np.zeros((8, 10), np.uint8)
    labels[0:4, 0:4] = 1
    labels[2:6, 2:6] = 2
    session.add_mask(1, labels)
    results = session.run()
    assert (results[1].labels == labels).all()
    assert results[1].is_keyframe


def test_iterator_source_reads_backward_from_its_spill(copy_engine):
    session = Session(copy_engine, iter(numbered_frames(4)))
    session.add_object_mask(2, 1, box_mask(0, 2, 0, 2))
    results = session.run()
    assert [r.objects[1].area for r in results] == [4, 4, 4, 4]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.add_mask(9, np.ones((8, 10), np.uint8)), "outside the clip"),
        (lambda s: s.add_mask(0, np.zeros((8, 10), np.uint8)), "no object"),
        (lambda s: s.add_mask(0, np.ones((20, 10), np.uint8)), "10x20 but the frame is 10x8"),
        (lambda s: s.add_object_mask(0, 300, np.ones((8, 10), bool)), "object ids are 1..255"),
        (lambda s: s.run(), "no keyframe"),
    ],
)
def test_bad_input_is_refused_with_a_reason(copy_engine, call, message):
    session = Session(copy_engine, numbered_frames(3))
    with pytest.raises(InputError, match=message):
        call(session)


def test_mask_off_by_a_pixel_is_resized_with_a_warning(copy_engine):
    session = Session(copy_engine, numbered_frames(3))
    with pytest.warns(UserWarning, match="resized"):
        session.add_mask(0, np.ones((8, 9), np.uint8))
    assert session.run()[2].objects[1].area == 80


def test_prefetch_keeps_order_and_passes_errors_on():
    from xmem_label.model.frames import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise InputError("broken frame")

    with pytest.raises(InputError, match="broken frame"):
        list(prefetch(failing()))


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    import threading

    from xmem_label.model.frames import prefetch

    stream = prefetch(iter(range(10**6)), depth=2)
    assert next(stream) == 0
    stream.close()
    assert not any(t.name == "xmem-label-prefetch" for t in threading.enumerate())


def test_labels_are_the_argmax_of_the_probabilities_with_ties_to_the_lower_channel():
    from xmem_label.model.session import _argmax_channels

    probs = torch.rand(4, 30, 20, generator=torch.Generator().manual_seed(0))
    probs[:, :5] = 0.25  # four-way ties
    assert torch.equal(_argmax_channels(probs), probs.argmax(0).to(torch.uint8))


class _NaNAfter:
    """Wraps a tracker: from frame `start` on, its probabilities are NaN (a diverged network)."""

    def __init__(self, tracker, start):
        self.tracker, self.start, self.seen = tracker, start, 0

    @property
    def object_ids(self):
        return self.tracker.object_ids

    def step(self, frame, prompt=None, *, last=False):
        probs = self.tracker.step(frame, prompt, last=last)
        self.seen += 1
        return probs * float("nan") if self.seen > self.start else probs


def test_non_finite_probabilities_are_an_error_naming_the_frame(copy_engine, monkeypatch):
    make_tracker = copy_engine.new_tracker
    monkeypatch.setattr(copy_engine, "new_tracker", lambda n: _NaNAfter(make_tracker(n), 2))
    session = Session(copy_engine, numbered_frames(5))
    session.add_object_mask(0, 1, box_mask(0, 2, 0, 2))
    results = session.propagate()
    assert [next(results).index for _ in range(2)] == [0, 1]
    with pytest.raises(InputError, match="frame 2: the engine produced NaN or infinite"):
        next(results)


def test_frames_of_another_size_are_an_error_naming_the_frame(copy_engine):
    frames = numbered_frames(4)
    frames[2] = np.zeros((6, 10, 3), np.uint8)
    session = Session(copy_engine, frames)
    session.add_object_mask(0, 1, box_mask(0, 2, 0, 2))
    with pytest.raises(InputError, match="frame 2 is 10x6, but the clip's first frame is 10x8"):
        session.run()


def test_cancel_stops_the_backward_pass_and_removes_its_spill(copy_engine, tmp_path):
    from xmem_label.model.session import PropagationCancelled

    session = Session(copy_engine, numbered_frames(6))
    session.add_object_mask(5, 1, box_mask(0, 2, 0, 2))
    results = session.propagate(spill_dir=tmp_path, progress=lambda done, total: (
        session.cancel() if done == 3 else None))  # fmt: skip
    with pytest.raises(PropagationCancelled):
        next(results)
    assert len(copy_engine.passes[0]) == 3  # the backward pass stopped at its next step
    (passes,) = tmp_path.iterdir()
    assert list(passes.iterdir()) == []  # nothing of the cut pass is kept
    session.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("direction", "expected"), [("forward", [1, 2, 3, 4, 5, 6]), ("both", [0, 2, 3, 4, 5, 6])]
)
def test_a_single_keyframe_streams_each_frame_as_it_is_computed(copy_engine, direction, expected):
    session = Session(copy_engine, numbered_frames(6))
    session.add_object_mask(0, 1, box_mask(0, 2, 0, 2))
    # network steps done when each frame comes out: the frame's own (the pass's first step is
    # the keyframe; the reconciled mode returns the person's mask before any step)
    assert [session.network_steps for _ in session.propagate(direction=direction)] == expected


def test_reconciled_frames_come_out_once_the_passes_they_read_have_computed_them(copy_engine):
    session = Session(copy_engine, numbered_frames(7))
    for keyframe in (0, 3, 6):
        session.add_object_mask(keyframe, 1, box_mask(0, 2, keyframe, keyframe + 2))
    steps = [session.network_steps for _ in session.propagate()]
    # the backward pass from 3 (3 steps), then the forward pass from 0 yields frames 1 and 2 as
    # it computes them, before the passes of the segment 3..6 run
    assert steps == [0, 5, 6, 6, 11, 12, 12]
    ranges = [(log[0][0], log[-1][0]) for log in copy_engine.passes]  # first, last frame
    assert ranges == [(3, 1), (0, 2), (6, 4), (3, 5)]
