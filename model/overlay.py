"""Masks drawn over their frames, written as an MP4 video or an animated GIF, frame by frame."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .errors import InputError
from .masks import davis_palette

MASK_OPACITY = 0.5
_COLOURS = np.array(davis_palette(), dtype=np.uint8).reshape(256, 3)
OVERLAY_SUFFIXES = (".mp4", ".gif")


def draw_overlay(frame: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`frame` (H, W, 3) RGB with each object tinted in its DAVIS colour and outlined."""
    tinted = frame.copy()
    objects = labels > 0
    colours = _COLOURS[labels]
    tinted[objects] = (
        (1 - MASK_OPACITY) * frame[objects] + MASK_OPACITY * colours[objects]
    ).astype(np.uint8)
    edges = cv2.morphologyEx(labels, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    tinted[edges & objects] = colours[edges & objects]
    return tinted


def check_overlay_path(path: str | Path) -> None:
    """Refuse an overlay file name whose extension is neither .mp4 nor .gif."""
    if Path(path).suffix.lower() not in OVERLAY_SUFFIXES:
        raise InputError(f"overlay {path} must end in {' or '.join(OVERLAY_SUFFIXES)}")


class OverlayWriter:
    """Writes overlay frames to `path`: MP4 (OpenCV, mp4v) or GIF (Pillow) by its extension.

    A GIF is assembled in memory at the end (one byte per pixel per frame): use MP4 for long
    clips.
    """

    def __init__(self, path: str | Path, fps: float):
        self.path = Path(path)
        self.fps = fps
        check_overlay_path(self.path)
        self.kind = self.path.suffix.lower()
        self._video: cv2.VideoWriter | None = None
        self._gif_frames: list[Image.Image] = []
        self._written = 0

    def add(self, frame: np.ndarray, labels: np.ndarray) -> None:
        picture = draw_overlay(frame, labels)
        if self.kind == ".gif":
            self._gif_frames.append(Image.fromarray(picture).quantize(colors=256))
            return
        if self._video is None:
            height, width = picture.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")  # type: ignore[attr-defined]
            self._video = cv2.VideoWriter(str(self.path), fourcc, self.fps, (width, height))
            if not self._video.isOpened():
                raise OSError(f"OpenCV cannot write video {self.path}")
        self._video.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        self._written += 1

    def close(self) -> None:
        """Finish the file (the GIF is written here). OpenCV's writer reports no failure (a full
        disk gives an unreadable MP4 silently), so the finished MP4 is opened again and its
        frame count checked; an OSError says what went wrong."""
        if self._video is not None:
            self._video.release()
            self._video = None
            self._check_video()
        if self._gif_frames:
            first, *rest = self._gif_frames
            first.save(
                self.path,
                save_all=True,
                append_images=rest,
                duration=round(1000 / self.fps),
                loop=0,
            )
            self._gif_frames = []

    def discard(self) -> None:
        """Stop writing after an error: release the file without finishing or checking it (the
        caller deletes it)."""
        if self._video is not None:
            self._video.release()
            self._video = None
        self._gif_frames = []

    def _check_video(self) -> None:
        capture = cv2.VideoCapture(str(self.path))
        try:
            count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
            readable = capture.isOpened() and capture.read()[0]
        finally:
            capture.release()
        if not readable or count != self._written:
            raise OSError(
                f"overlay {self.path} was not written completely ({self._written} frames given, "
                f"{count} readable; is the disk full?)"
            )
