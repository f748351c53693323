"""Properties over generated input (hypothesis): brush RLE round trips against the Label Studio
SDK, and the command line's keyframe argument `--mask FRAME=PNG`."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from xmem_label.model import InputError
from xmem_label.model.cli import _parse_keyframes, main

brush = pytest.importorskip("label_studio_sdk.converter.brush")
rle = pytest.importorskip("xmem_label.backend.rle")

masks = st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda shape: arrays(np.uint8, shape, elements=st.integers(0, 1))
)
# Masks made of a few long runs: what real masks are, and where run-length fields overflow.
blocky_masks = st.tuples(
    st.integers(1, 300), st.integers(1, 300), st.lists(st.integers(0, 90_000), max_size=6)
).map(lambda spec: _runs_mask(*spec))


def _runs_mask(height: int, width: int, cuts: list[int]) -> np.ndarray:
    flat = np.zeros(height * width, np.uint8)
    for index, cut in enumerate(sorted(c % flat.size for c in cuts)):
        flat[cut:] = (index + 1) % 2
    return flat.reshape(height, width)


@given(st.one_of(masks, blocky_masks))
@settings(max_examples=150, deadline=None)
def test_rle_round_trip_through_our_decoder_and_the_sdks(mask):
    height, width = mask.shape
    encoded = rle.mask_to_rle(mask)
    assert encoded == brush.mask2rle(mask * 255)  # byte-equal to the SDK's encoder
    assert np.array_equal(rle.rle_to_mask(encoded, width, height), mask > 0)
    alpha = brush.decode_rle(encoded).reshape(height, width, 4)[:, :, 3]
    assert np.array_equal(alpha, mask * 255)


@given(masks, st.data())
@settings(max_examples=100, deadline=None)
def test_rle_written_by_the_sdk_with_literal_chunks_decodes(mask, data):
    """The browser and the SDK's encode_rle write literal chunks when channels differ."""
    height, width = mask.shape
    alpha = mask * 255
    red = data.draw(arrays(np.uint8, mask.shape, elements=st.integers(0, 255)))
    rgba = np.stack([red, alpha, alpha, alpha], axis=-1).ravel().copy()
    assert np.array_equal(rle.rle_to_mask(brush.encode_rle(rgba), width, height), mask > 0)


@given(st.lists(st.integers(0, 255), max_size=64), st.integers(1, 8), st.integers(1, 8))
@settings(max_examples=300, deadline=None)
def test_arbitrary_rle_bytes_decode_or_are_refused_as_input(data, width, height):
    try:
        decoded = rle.rle_to_mask(data, width, height)
    except InputError:
        return
    assert decoded.shape == (height, width) and decoded.dtype == bool


# ----- --mask FRAME=PNG ------------------------------------------------------------------------

paths = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1
).filter(lambda text: text.strip() != "")


@given(st.integers(0, 10**15), paths, st.sampled_from(["", " ", "  "]), st.integers(0, 3))
def test_frame_and_path_come_back_as_given(frame, path, space, zeros):
    item = f"{space}{frame:0{zeros}d}{space}={path}"
    assert _parse_keyframes([item]) == {frame: Path(path)}


@given(st.text())
def test_any_text_is_a_keyframe_or_an_input_error(text):
    try:
        parsed = _parse_keyframes([text])
    except InputError as error:
        assert "--mask" in str(error)
        return
    ((frame, path),) = parsed.items()
    assert frame >= 0 and text.split("=", 1)[0].strip().isascii()
    assert str(path).strip() != ""


@given(st.lists(st.integers(0, 500), min_size=1, max_size=8), paths)
def test_repeated_frames_are_refused_and_distinct_ones_kept(frames, path):
    items = [f"{frame}={path}" for frame in frames]
    if len(set(frames)) < len(frames):
        with pytest.raises(InputError, match="two --mask options"):
            _parse_keyframes(items)
    else:
        assert _parse_keyframes(items) == {frame: Path(path) for frame in frames}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("property")


@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_command_answers_any_mask_argument_with_one_line_and_writes_nothing(scratch, text):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["propagate", str(scratch / "no-such-clip.mp4"), f"--mask={text}",
                     "--out", str(scratch / "out"), "--engine", "flow"])  # fmt: skip
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("xmem-label: error: ")
    assert list(scratch.iterdir()) == []
