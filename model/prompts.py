"""A box or points on one frame -> that object's mask on that frame (OpenCV GrabCut).

The propagation engine needs a mask on its keyframe; Label Studio's smart tools and video
tracks, and FiftyOne box detections, give boxes and points. GrabCut fits a colour model
(Gaussian mixtures) of object and background and cuts along image edges:
- box: outside the box is background, inside is "probably object";
- points: a disc around each positive point is object, around each negative point background,
  a window around the positive points "probably background" and the rest background; the
  connected part touching a positive point is kept.
If GrabCut finds nothing (flat colours, tiny box), the box itself (or the discs) is the mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import cv2
import numpy as np

from .errors import InputError

ITERATIONS = 5
WORK_SIDE = 320  # GrabCut runs on the prompt's surroundings scaled to this long side
POINT_RADIUS_FRACTION = 0.02  # of the frame's short side
POINT_WINDOW_FRACTION = 0.25  # half-size of the window searched around the points


def mask_from_box(frame: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The object inside `box` (x0, y0, x1, y1 in pixels) as a bool mask of the frame's size."""
    height, width = frame.shape[:2]
    x0, y0 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    x1, y1 = min(width, int(round(box[2]))), min(height, int(round(box[3])))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise InputError(f"the box {tuple(round(v) for v in box)} lies outside the frame")
    filled = np.zeros((height, width), dtype=bool)
    filled[y0:y1, x0:x1] = True
    if x1 - x0 < 8 or y1 - y0 < 8:
        return filled
    # Work on the box plus a margin of background, at most WORK_SIDE pixels on its long side.
    margin = max(4, (x1 - x0 + y1 - y0) // 10)
    cx0, cy0 = max(0, x0 - margin), max(0, y0 - margin)
    cx1, cy1 = min(width, x1 + margin), min(height, y1 + margin)
    scale = min(1.0, WORK_SIDE / max(cx1 - cx0, cy1 - cy0))
    crop = _resize(frame[cy0:cy1, cx0:cx1], scale, cv2.INTER_AREA)
    rect = (
        int((x0 - cx0) * scale),
        int((y0 - cy0) * scale),
        max(1, int((x1 - x0) * scale)),
        max(1, int((y1 - y0) * scale)),
    )
    labels = np.zeros(crop.shape[:2], dtype=np.uint8)
    _grabcut(crop, labels, rect=rect)
    found = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[cy0:cy1, cx0:cx1] = _resize(found, 1 / scale, cv2.INTER_NEAREST, (cx1 - cx0, cy1 - cy0))
    mask &= filled
    return mask if mask.any() else filled


def mask_from_points(
    frame: np.ndarray,
    positive: list[tuple[float, float]],
    negative: Sequence[tuple[float, float]] = (),
) -> np.ndarray:
    """The object under the `positive` points (x, y in pixels), not under the `negative` ones."""
    if not positive:
        raise InputError("a point prompt needs at least one positive point")
    height, width = frame.shape[:2]
    half = int(POINT_WINDOW_FRACTION * min(height, width))
    xs, ys = [p[0] for p in positive], [p[1] for p in positive]
    # The window around the points plus a margin that is background for the colour model.
    cx0, cy0 = max(0, int(min(xs)) - 2 * half), max(0, int(min(ys)) - 2 * half)
    cx1, cy1 = min(width, int(max(xs)) + 2 * half + 1), min(height, int(max(ys)) + 2 * half + 1)
    scale = min(1.0, WORK_SIDE / max(cx1 - cx0, cy1 - cy0))
    crop = _resize(frame[cy0:cy1, cx0:cx1], scale, cv2.INTER_AREA)

    def at_work_scale(x: float, y: float) -> tuple[int, int]:
        return int((x - cx0) * scale), int((y - cy0) * scale)

    radius = max(2, int(POINT_RADIUS_FRACTION * min(height, width) * scale))
    labels = np.full(crop.shape[:2], cv2.GC_BGD, dtype=np.uint8)
    wx0, wy0 = at_work_scale(min(xs) - half, min(ys) - half)
    wx1, wy1 = at_work_scale(max(xs) + half + 1, max(ys) + half + 1)
    labels[max(0, wy0) : max(0, wy1), max(0, wx0) : max(0, wx1)] = cv2.GC_PR_BGD
    seeds = np.zeros(crop.shape[:2], dtype=np.uint8)
    for point in positive:
        cv2.circle(labels, at_work_scale(*point), radius * 4, int(cv2.GC_PR_FGD), -1)
    for point in positive:
        cv2.circle(labels, at_work_scale(*point), radius, int(cv2.GC_FGD), -1)
        cv2.circle(seeds, at_work_scale(*point), radius, 1, -1)
    for point in negative:
        cv2.circle(labels, at_work_scale(*point), radius, int(cv2.GC_BGD), -1)
    _grabcut(crop, labels)
    found = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    _, parts = cv2.connectedComponents(found)
    touching = np.unique(parts[(seeds > 0) & (found > 0)])
    found = np.isin(parts, touching[touching > 0]).astype(np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[cy0:cy1, cx0:cx1] = _resize(found, 1 / scale, cv2.INTER_NEAREST, (cx1 - cx0, cy1 - cy0))
    return mask


def _resize(
    image: np.ndarray, scale: float, interpolation: int, size: tuple[int, int] | None = None
) -> np.ndarray:
    if scale == 1.0 and size is None:
        return image
    if size is None:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=interpolation).astype(image.dtype)


def _grabcut(
    frame: np.ndarray, labels: np.ndarray, rect: tuple[int, int, int, int] | None = None
) -> None:
    """Run GrabCut in place on `labels` (from a rectangle, or from the labels as given)."""
    bgr = np.ascontiguousarray(frame[:, :, ::-1])
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    mode = cv2.GC_INIT_WITH_RECT if rect is not None else cv2.GC_INIT_WITH_MASK
    no_rect = (0, 0, 0, 0)  # what OpenCV reads for None; unused when starting from the labels
    cv2.setRNGSeed(0)  # GrabCut seeds its colour models with k-means: same prompt, same mask
    with contextlib.suppress(cv2.error):  # one colour only on a side: keep the labels as given
        cv2.grabCut(bgr, labels, rect or no_rect, background, foreground, ITERATIONS, mode)
