"""Brush RLE: byte-equal to the SDK's encoder, decodes what the SDK and the browser write."""

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from xmem_label.backend.rle import mask_to_rle, rle_to_mask
from xmem_label.model import InputError


def disk(height, width, radius):
    yy, xx = np.mgrid[:height, :width]
    return ((yy - height / 2) ** 2 + (xx - width / 3) ** 2 < radius**2).astype(np.uint8)


MASKS = {
    "empty": lambda: np.zeros((48, 64), np.uint8),
    "full": lambda: np.ones((48, 64), np.uint8),
    "disk": lambda: disk(120, 160, 30),
    "noise": lambda: (np.random.default_rng(0).random((60, 80)) > 0.5).astype(np.uint8),
    "aligned_480p": lambda: disk(480, 640, 100),  # the SDK pads a whole byte here
    "long_runs_1080p": lambda: disk(1080, 1920, 300),
    "one_pixel": lambda: np.ones((1, 1), np.uint8),
    # a run of 3 * 65536 + 48 values: the remainder keeps the 16-bit field (found by hypothesis)
    "run_over_the_largest_field": lambda: np.zeros((204, 241), np.uint8),
}


@pytest.mark.parametrize("name", MASKS)
def test_encoder_writes_the_sdk_bytes(name):
    mask = MASKS[name]()
    assert mask_to_rle(mask) == mask2rle(mask * 255)


@pytest.mark.parametrize("name", MASKS)
def test_round_trip_and_sdk_decoder(name):
    mask = MASKS[name]()
    height, width = mask.shape
    rle = mask_to_rle(mask)
    assert np.array_equal(rle_to_mask(rle, width, height), mask > 0)
    alpha = decode_rle(rle).reshape(height, width, 4)[:, :, 3]
    assert np.array_equal(alpha, mask * 255)


def test_decoder_reads_literal_chunks():
    """The browser writes literal chunks (flag 0) too; the SDK's encoder writes them for
    runs of one value, so an alpha channel with isolated values exercises them."""
    mask = (np.random.default_rng(1).random((20, 30)) > 0.5).astype(np.uint8) * 255
    rgba = np.stack([mask, mask, mask, mask], axis=-1).ravel().copy()
    rgba[::4] = np.arange(rgba.size // 4) % 7  # red channel varies pixel by pixel
    rle = encode_rle(rgba)
    assert np.array_equal(rle_to_mask(rle, 30, 20), mask > 0)


def test_size_mismatch_and_malformed_data_are_input_errors():
    rle = mask_to_rle(disk(120, 160, 30))
    with pytest.raises(InputError, match="size differs"):
        rle_to_mask(rle, 100, 120)
    with pytest.raises(InputError, match="malformed"):
        rle_to_mask(rle[: len(rle) // 2], 160, 120)
    with pytest.raises(InputError, match="malformed"):
        rle_to_mask(["a", 3], 160, 120)
    with pytest.raises(InputError, match="malformed"):
        rle_to_mask([300, 1], 160, 120)
