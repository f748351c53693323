"""model/keyframes.py: the object-identity rule and the keyframe rule both platforms use."""

from __future__ import annotations

import numpy as np
import pytest

from xmem_label.model import InputError, Session
from xmem_label.model.keyframes import MAX_OBJECT_ID, Keyframes, ObjectIds

from .conftest import numbered_frames


def square(y: int, x: int) -> np.ndarray:
    mask = np.zeros((8, 10), bool)
    mask[y : y + 3, x : x + 3] = True
    return mask


def test_explicit_keys_name_one_object_across_frames():
    ids = ObjectIds()
    assert ids.id_for(0, "chair", key=7) == 1
    assert ids.id_for(0, "chair") == 2  # no key: the first chair without one on frame 0
    assert ids.id_for(5, "chair", key=7) == 1
    assert ids.id_for(5, "floor", key=7) == 1  # the key decides, not the label


def test_regions_without_keys_are_named_by_label_and_rank_on_their_frame():
    ids = ObjectIds()
    first = [ids.id_for(0, label) for label in ("chair", "chair", "floor")]
    later = [ids.id_for(3, label) for label in ("floor", "chair", "chair", "chair")]
    assert first == [1, 2, 3]
    assert later == [3, 1, 2, 4]


def test_at_most_255_objects():
    ids = ObjectIds()
    for rank in range(MAX_OBJECT_ID):
        ids.id_for(0, f"object {rank}")
    with pytest.raises(InputError, match="more than 255 objects"):
        ids.id_for(0, "one more")
    with pytest.raises(InputError, match="outside 1..255"):
        Keyframes().add(0, 256, square(0, 0))


def test_two_masks_of_one_object_on_a_frame_are_joined():
    keyframes = Keyframes()
    keyframes.add(2, 1, square(0, 0))
    keyframes.add(2, 1, square(4, 6))
    assert keyframes.masks[2][1].sum() == 18 and keyframes.object_ids == [1]


def test_an_object_left_out_of_a_keyframe_is_absent_there(copy_engine):
    keyframes = Keyframes()
    keyframes.add(0, 1, square(0, 0))
    keyframes.add(0, 2, square(4, 6))
    keyframes.add(3, 1, square(1, 1))  # object 2 left out on frame 3
    keyframes.add(5, 1, square(2, 2))
    keyframes.add(5, 2, np.zeros((8, 10), bool))  # an all-False mask: absent, said explicitly
    with Session(copy_engine, numbered_frames(7)) as session:
        keyframes.apply_to(session)
        results = list(session.propagate(direction="forward"))
    present = [sorted(o for o, summary in r.objects.items() if summary.area) for r in results]
    assert present[:3] == [[1, 2]] * 3
    assert all(objects == [1] for objects in present[3:])
