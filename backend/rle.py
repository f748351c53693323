"""Label Studio brush RLE: masks to and from the `value.rle` list of a `brushlabels` region.

The format is @thi.ng/rle-pack applied to the mask as an RGBA image (H*W*4 bytes, the alpha
written into all four channels): a header (32 bits value count, 5 bits word size - 1, four 4-bit
run-length field sizes - 1), then chunks of 1 flag bit (1 repeat, 0 literal), 2 bits choosing a
field size, the count - 1 in that many bits, then one word (repeat) or `count` words (literal),
zero-padded to a byte.

`mask_to_rle` is vectorised with numpy and writes the same bytes as
`label_studio_sdk.converter.brush.mask2rle(mask * 255)` (runs of 4+ values only, since every
pixel is four equal bytes; field sizes 3/4/8/16; 1 to 8 padding bits), about 12x faster
(benchmarks/label_studio.py: 0.89 ms against 10.4 ms for a 1920x1080 mask). `rle_to_mask` reads
any valid stream, including the literal chunks the browser writes, and refuses malformed ones
with an InputError.
"""

from __future__ import annotations

import numpy as np

from xmem_label.model import InputError

WORD_SIZE = 8
RUN_FIELD_SIZES = (3, 4, 8, 16)
_MAX_RUN = 1 << RUN_FIELD_SIZES[-1]
_HEADER_BITS = 32 + 5 + 4 * 4
_TRUNCATED = "malformed brush RLE: the data ends in the middle of a chunk"


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask (non-zero = painted) as Label Studio brush RLE bytes."""
    if mask.ndim != 2:
        raise InputError(f"a brush mask must be 2-D, got shape {mask.shape}")
    flat = (np.asarray(mask).ravel() != 0).astype(np.uint8)
    if flat.size == 0:
        raise InputError("a brush mask must have at least one pixel")

    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    run_values = flat[starts] * np.uint8(255)
    run_lengths = np.diff(np.append(starts, flat.size)) * 4  # four RGBA bytes per pixel

    # Runs longer than the largest field are cut into full chunks plus a remainder.
    chunks_per_run = (run_lengths + _MAX_RUN - 1) // _MAX_RUN
    counts = np.full(int(chunks_per_run.sum()), _MAX_RUN, dtype=np.int64)
    last_chunk = np.cumsum(chunks_per_run) - 1
    counts[last_chunk] = run_lengths - _MAX_RUN * (chunks_per_run - 1)
    values = np.repeat(run_values, chunks_per_run).astype(np.int64)

    size_index = np.searchsorted(1 << np.array(RUN_FIELD_SIZES), counts)  # first size that fits
    # ...except the chunks of a run longer than the largest field: all of them use it, as the
    # SDK's encoder does (so the bytes stay equal).
    size_index[np.repeat(run_lengths > _MAX_RUN, chunks_per_run)] = len(RUN_FIELD_SIZES) - 1
    field_bits = np.array(RUN_FIELD_SIZES)[size_index]
    widths = 1 + 2 + field_bits + WORD_SIZE
    codes = (
        (1 << (widths - 1))  # repeat flag
        | (size_index << (field_bits + WORD_SIZE))
        | ((counts - 1) << WORD_SIZE)
        | values
    )

    header = (flat.size * 4, 32), (WORD_SIZE - 1, 5), *((s - 1, 4) for s in RUN_FIELD_SIZES)
    header_codes = np.array([code for code, _ in header], dtype=np.int64)
    header_widths = np.array([width for _, width in header], dtype=np.int64)
    codes = np.concatenate((header_codes, codes))
    widths = np.concatenate((header_widths, widths))

    # Each code as 32 big-endian bits; keep its last `width` bits, row after row.
    as_bits = np.unpackbits(codes.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)
    keep = np.arange(32) >= 32 - widths[:, None]
    bits = as_bits[keep]
    padding = 8 - bits.size % 8  # like the SDK: a whole zero byte when already aligned
    return np.packbits(np.concatenate((bits, np.zeros(padding, np.uint8)))).tolist()


def rle_to_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    """Decode brush RLE bytes into a (height, width) bool mask (alpha > 0 = painted).

    The stream is read as one string of '0'/'1' characters, whose fields `int(..., 2)` parses
    in C, and the chunks are collected as (value, count) runs that numpy expands once: 0.9 ms
    instead of 6.3 ms reading bit by bit into a full RGBA array, for an 854x480 DAVIS mask (a
    job decodes every keyframe of its task)."""
    try:
        data = bytes(rle)
    except (TypeError, ValueError):
        raise InputError("malformed brush RLE: expected a list of byte values 0..255") from None
    bits = format(int.from_bytes(data, "big"), f"0{len(data) * 8}b") if data else ""
    if len(bits) < _HEADER_BITS:
        raise InputError(_TRUNCATED)
    total = int(bits[:32], 2)
    word_size = int(bits[32:37], 2) + 1
    run_field_sizes = [int(bits[37 + 4 * i : 41 + 4 * i], 2) + 1 for i in range(4)]
    if total != width * height * 4:
        raise InputError(
            f"brush mask size differs from the frame: its RLE holds {total} values, "
            f"a {width}x{height} frame needs {width * height * 4}"
        )
    values: list[int] = []
    counts: list[int] = []
    position, filled, end = _HEADER_BITS, 0, len(bits)
    while filled < total:
        if position + 3 > end:
            raise InputError(_TRUNCATED)
        repeat = bits[position] == "1"
        field = run_field_sizes[int(bits[position + 1 : position + 3], 2)]
        position += 3
        if position + field > end:
            raise InputError(_TRUNCATED)
        count = int(bits[position : position + field], 2) + 1
        position += field
        if filled + count > total:
            raise InputError("malformed brush RLE: a chunk runs past the end of the image")
        words = 1 if repeat else count  # a literal chunk holds `count` words
        if position + words * word_size > end:
            raise InputError(_TRUNCATED)
        if repeat:
            values.append(int(bits[position : position + word_size], 2))
            counts.append(count)
        else:
            values.extend(
                int(bits[at : at + word_size], 2)
                for at in range(position, position + count * word_size, word_size)
            )
            counts.extend([1] * count)
        position += words * word_size
        filled += count
    painted = np.repeat(np.array(values) != 0, counts)
    return painted.reshape(height, width, 4)[:, :, 3]
