"""Frame sources, decoded lazily: a video file, a folder of images, or arrays.

Propagation reads frames forward and, for objects whose first keyframe is not the first frame,
backward. No source keeps the whole clip in memory: folders and video files decode on demand,
and a one-shot iterator of arrays is spilled to a temporary folder as it is read.
"""

from __future__ import annotations

import queue
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif"}
_SEEK_CHUNK = 32  # frames decoded per seek when a video is read backward


class FrameSource:
    """A clip as RGB uint8 arrays (H, W, 3), read by index ranges in either direction."""

    names: list[str] | None = None  # per-frame names when the source has them (folder stems)

    def __len__(self) -> int:
        raise NotImplementedError

    def frame_name(self, index: int) -> str:
        """The name an output file for this frame takes: the source stem, else 00000, 00001..."""
        return self.names[index] if self.names else f"{index:05d}"

    def forward(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(index, frame) from `start` up to `stop` (exclusive; None = end of clip)."""
        raise NotImplementedError

    def backward(self, start: int, stop: int = -1) -> Iterator[tuple[int, np.ndarray]]:
        """(index, frame) from `start` down to `stop` (exclusive; -1 = down to frame 0)."""
        raise NotImplementedError

    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        for _, frame in self.forward(0, 1):
            return frame.shape[:2]
        raise InputError("the clip has no frames")

    def close(self) -> None:
        """Release file handles and temporary files."""


class RandomAccessSource(FrameSource):
    """A source that can read any single frame cheaply."""

    def read(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def forward(self, start=0, stop=None):
        stop = len(self) if stop is None else min(stop, len(self))
        for index in range(start, stop):
            yield index, self.read(index)

    def backward(self, start, stop=-1):
        for index in range(min(start, len(self) - 1), stop, -1):
            yield index, self.read(index)


class ImageFolder(RandomAccessSource):
    """Every image file of a folder, in name order."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.paths = sorted(
            p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.paths:
            raise InputError(f"no image files in folder {self.folder}")
        self.names = [p.stem for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        image = cv2.imread(str(self.paths[index]), cv2.IMREAD_COLOR)
        if image is None:
            raise InputError(f"cannot decode image {self.paths[index]}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ArraySequence(RandomAccessSource):
    """A sequence (list, array) of frames already in memory."""

    def __init__(self, frames: Sequence[np.ndarray]):
        if len(frames) == 0:
            raise InputError("the clip has no frames")
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def read(self, index: int) -> np.ndarray:
        return check_frame(self.frames[index], index)


class SpilledIterator(RandomAccessSource):
    """A one-shot iterator of frames, spilled to a temporary folder so it can be re-read.

    The length is unknown until the iterator is exhausted, so `__len__` reads it to the end.
    """

    def __init__(self, frames: Iterable[np.ndarray]):
        self._iterator = iter(frames)
        self._folder = tempfile.TemporaryDirectory(prefix="xmem-label-frames-")
        self._count = 0
        self._exhausted = False

    def _pull_until(self, index: int) -> None:
        while not self._exhausted and self._count <= index:
            try:
                frame = next(self._iterator)
            except StopIteration:
                self._exhausted = True
                break
            np.save(self._path(self._count), check_frame(frame, self._count))
            self._count += 1

    def _path(self, index: int) -> str:
        return f"{self._folder.name}/{index:08d}.npy"

    def __len__(self) -> int:
        self._pull_until(float("inf"))
        return self._count

    def read(self, index: int) -> np.ndarray:
        self._pull_until(index)
        if index >= self._count:
            raise IndexError(index)
        return np.load(self._path(index))

    def forward(self, start=0, stop=None):
        index = start
        while stop is None or index < stop:
            self._pull_until(index)
            if index >= self._count:
                return
            yield index, self.read(index)
            index += 1

    def close(self) -> None:
        self._folder.cleanup()


class VideoFile(FrameSource):
    """A video file decoded with OpenCV; backward reading seeks in chunks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        capture = self._open()
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        ok, _ = capture.read()
        capture.release()
        if not ok:
            raise InputError(f"OpenCV cannot decode video {self.path}")
        self._count = count if count > 0 else None

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise InputError(f"OpenCV cannot open video {self.path}")
        return capture

    def __len__(self) -> int:
        if self._count is None:  # containers without a frame count: decode once to count
            self._count = sum(1 for _ in self.forward(0))
        return self._count

    def _decode(self, start: int, stop: int | None) -> Iterator[tuple[int, np.ndarray]]:
        capture = self._open()
        try:
            if start > 0:
                capture.set(cv2.CAP_PROP_POS_FRAMES, start)
            index = start
            while stop is None or index < stop:
                ok, frame = capture.read()
                if not ok:
                    return
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            capture.release()

    def forward(self, start=0, stop=None):
        yield from self._decode(start, stop)

    def backward(self, start, stop=-1):
        chunk_stop = start + 1
        while chunk_stop - 1 > stop:
            chunk_start = max(stop + 1, chunk_stop - _SEEK_CHUNK)
            chunk = list(self._decode(chunk_start, chunk_stop))
            if len(chunk) != chunk_stop - chunk_start:
                raise InputError(f"cannot seek in video {self.path} (frame {chunk_start})")
            yield from reversed(chunk)
            chunk_stop = chunk_start


def check_frame(frame: np.ndarray, index: int) -> np.ndarray:
    """Return `frame` as a contiguous (H, W, 3) uint8 array, or say what is wrong with it."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise InputError(
            f"frame {index} is {frame.dtype} {frame.shape}; frames are (H, W, 3) uint8 RGB"
        )
    return np.ascontiguousarray(frame)


def open_frames(source: str | Path | FrameSource | Iterable[np.ndarray]) -> FrameSource:
    """A FrameSource for a video file, a folder of images, or arrays (RGB uint8)."""
    if isinstance(source, FrameSource):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return ImageFolder(path)
        if not path.exists():
            raise InputError(f"no such file or folder: {path}")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"{path} is a single image; give a video file or a folder of frames")
        return VideoFile(path)
    if isinstance(source, (Sequence, np.ndarray)):
        return ArraySequence(source)
    return SpilledIterator(source)


def prefetch(items: Iterator, depth: int = 4) -> Iterator:
    """Yield from `items`, produced `depth` ahead by a background thread.

    Decoding (OpenCV) and the network (torch) both release the GIL, so reading the next frames
    overlaps with the current step. Errors in the producer are raised in the consumer; a consumer
    that stops early stops the producer.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry: tuple) -> bool:
        """Put `entry` once there is room; False when the consumer has gone."""
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer((done, exc))

    producer = threading.Thread(target=produce, name="xmem-label-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item, error = slots.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        producer.join(timeout=5)
