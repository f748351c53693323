"""Label masks on disk and in memory: 0 is background, 1..255 are object ids."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .errors import InputError

MAX_OBJECT_ID = 255
SIZE_SLACK_PX = 2  # real data has keyframe masks a pixel or two off the frame size
LOSSY_FORMATS = {"JPEG", "MPO"}  # PIL format names of files whose ids cannot be trusted


def read_label_mask(path: str | Path) -> np.ndarray:
    """Read a palette or grey PNG as a (H, W) uint8 label mask.

    Palette PNGs hold object ids as palette indices. Grey PNGs hold ids as values, except the
    DAVIS 2016 convention (only 0 and 255) which is one object. Colour PNGs are refused, since
    their colours do not say which id they mean, and so are JPEGs, whose compression noise
    would become phantom objects.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise InputError(f"mask {path} is not a regular file; give a PNG")
    if not path.is_file():
        raise InputError(f"mask file not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except Exception as exc:  # PIL raises many types for broken files
        raise InputError(f"cannot read mask {path}: {exc}") from None
    if image.format in LOSSY_FORMATS:
        raise InputError(
            f"mask {path} is a {image.format} file: lossy compression turns each object's "
            "edge into stray ids; save the label mask as PNG"
        )
    if image.mode == "P":
        labels = np.asarray(image, dtype=np.uint8)
    elif image.mode in ("L", "1", "I", "I;16"):
        values = np.asarray(image)
        if values.max(initial=0) > MAX_OBJECT_ID:
            raise InputError(f"mask {path} has ids above {MAX_OBJECT_ID}")
        labels = values.astype(np.uint8)
        if set(np.unique(labels)) <= {0, 255}:
            labels = (labels > 0).astype(np.uint8)
    else:
        raise InputError(
            f"mask {path} is a {image.mode} image; give a palette or grey PNG of object ids"
        )
    return labels


def davis_palette() -> list[int]:
    """The DAVIS colour palette (id 1 red, 2 green, 3 yellow, ...), as PIL wants it."""
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.extend((r, g, b))
    return palette


_PALETTE = davis_palette()


def write_label_mask(path: str | Path, labels: np.ndarray) -> None:
    """Write a (H, W) uint8 label mask as a palette PNG (DAVIS colours)."""
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(_PALETTE)
    image.save(path)


def fit_mask_to_frame(labels: np.ndarray, frame_hw: tuple[int, int], what: str) -> np.ndarray:
    """Return `labels` at the frame size: a difference of up to two pixels is resized with
    nearest neighbour and a warning, a larger one is an error naming `what`."""
    height, width = frame_hw
    mask_h, mask_w = labels.shape[:2]
    if (mask_h, mask_w) == (height, width):
        return labels
    if abs(mask_h - height) > SIZE_SLACK_PX or abs(mask_w - width) > SIZE_SLACK_PX:
        raise InputError(f"{what} is {mask_w}x{mask_h} but the frame is {width}x{height}")
    warnings.warn(
        f"{what} is {mask_w}x{mask_h}, the frame {width}x{height}: resized (nearest neighbour)",
        stacklevel=3,
    )
    return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
