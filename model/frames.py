"""Frame sources, decoded lazily: a video file, a folder of images, or arrays.

Propagation reads frames forward and, for objects whose first keyframe is not the first frame,
backward. No source keeps the whole clip in memory: folders and video files decode on demand,
and a one-shot iterator of arrays is spilled to a temporary folder as it is read.
"""

from __future__ import annotations

import io
import queue
import tempfile
import threading
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar, cast

import cv2
import numpy as np
from PIL import Image

from .errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif"}
_SEEK_CHUNK = 32  # frames decoded per seek when a video is read backward
T = TypeVar("T")
JPEG_SUFFIXES = {".jpg", ".jpeg"}


class FrameSource:
    """A clip as RGB uint8 arrays (H, W, 3), read by index ranges in either direction."""

    names: list[str] | None = None  # per-frame names when the source has them (folder stems)
    skip_bad_frames: bool = False  # replace an undecodable frame by its predecessor, with a warning

    def __len__(self) -> int:
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Frame `index` as a person finds it: the file, or the frame number in the video."""
        return f"frame {index}"

    @property
    def skipped_frames(self) -> dict[int, str]:
        """Frames that could not be decoded and were replaced (index -> what was wrong), when
        `skip_bad_frames` is on; summaries list them so the replaced frames get reviewed."""
        return self.__dict__.setdefault("_skipped", {})  # subclasses need not call a base init

    def _skip(self, index: int, problem: str, replacement: str) -> None:
        """Record (once) and warn that frame `index` was replaced by `replacement`."""
        if index in self.skipped_frames:
            return
        self.skipped_frames[index] = problem
        warnings.warn(f"{problem}; {replacement} used instead", stacklevel=2)

    def frame_name(self, index: int) -> str:
        """The name an output file for this frame takes: the source stem, else 00000, 00001..."""
        return self.names[index] if self.names else f"{index:05d}"

    def forward(
        self, start: int = 0, stop: int | None = None
    ) -> Generator[tuple[int, np.ndarray], None, None]:
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

    def forward(
        self, start: int = 0, stop: int | None = None
    ) -> Generator[tuple[int, np.ndarray], None, None]:
        stop = len(self) if stop is None else min(stop, len(self))
        for index in range(start, stop):
            yield index, self.read(index)

    def backward(self, start: int, stop: int = -1) -> Iterator[tuple[int, np.ndarray]]:
        for index in range(min(start, len(self) - 1), stop, -1):
            yield index, self.read(index)


class ImageFolder(RandomAccessSource):
    """Every image file of a folder, in name order.

    A frame that cannot be decoded, or a JPEG cut short (which OpenCV would return with its
    missing part grey, saying only an unnamed libjpeg warning), is an error naming the file;
    with `skip_bad_frames` it is replaced by the nearest earlier good frame, with a warning.
    """

    def __init__(self, folder: str | Path, *, skip_bad_frames: bool = False):
        self.folder = Path(folder)
        self.skip_bad_frames = skip_bad_frames
        self.paths = sorted(  # regular files only: a pipe named x.jpg would block a read
            p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.paths:
            raise InputError(f"no image files in folder {self.folder}")
        self.names = [p.stem for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, index: int) -> str:
        return f"{self.paths[index]} (frame {index})"

    def read(self, index: int) -> np.ndarray:
        frame, problem = self._decode(index)
        if problem is None:
            assert frame is not None  # _decode gives a frame or a problem
            return frame
        if not self.skip_bad_frames:
            raise InputError(f"{problem} (--skip-bad-frames uses the previous frame instead)")
        candidates = [*range(index - 1, -1, -1), *range(index + 1, len(self))]
        for other in candidates:
            frame, other_problem = self._decode(other)
            if frame is not None and other_problem is None:  # (None, problem) otherwise
                self._skip(index, problem, f"frame {other}")
                return frame
        raise InputError(f"no frame of {self.folder} can be decoded")

    def _decode(self, index: int) -> tuple[np.ndarray | None, str | None]:
        """(RGB frame, None), or (None, what is wrong with the file)."""
        path = self.paths[index]
        try:
            data = path.read_bytes()
        except OSError as error:
            return None, f"cannot read image {path} (frame {index}): {error.strerror or error}"
        if path.suffix.lower() in JPEG_SUFFIXES:
            problem = _jpeg_problem(data)
            if problem is not None:
                return None, f"cannot decode image {path} (frame {index}): {problem}"
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            return None, f"cannot decode image {path} (frame {index})"
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), None


def _jpeg_problem(data: bytes) -> str | None:
    """What libjpeg found wrong with a JPEG (a truncated file), else None.

    Decodes at 1/8 scale (libjpeg's DCT scaling), which still reads every byte: about a tenth of
    a full decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as error:  # PIL raises many types for broken files
        return str(error) or type(error).__name__
    return None


class ArraySequence(RandomAccessSource):
    """A sequence (list, array) of frames already in memory."""

    def __init__(self, frames: Sequence[np.ndarray] | np.ndarray):
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

    def _pull_until(self, index: float) -> None:
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

    def forward(
        self, start: int = 0, stop: int | None = None
    ) -> Generator[tuple[int, np.ndarray], None, None]:
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
    """A video file decoded with OpenCV; backward reading seeks in chunks.

    The container's frame count is the clip's length: a frame that cannot be decoded before it
    (a file damaged or cut short mid-stream) is an error naming the frame, or, with
    `skip_bad_frames`, replaced by the last frame decoded before it, with a warning. Frames
    beyond it (a header that undercounts) are named in a warning.
    """

    def __init__(self, path: str | Path, *, skip_bad_frames: bool = False):
        self.path = Path(path)
        self.skip_bad_frames = skip_bad_frames
        capture = self._open()
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        ok, first = capture.read()
        capture.release()
        if not ok:
            raise InputError(f"OpenCV cannot decode video {self.path}")
        self._hw: tuple[int, int] = first.shape[:2]  # size() without decoding it again
        self._count = count if count > 0 else None
        self._last_good_frame: np.ndarray | None = None  # for skip_bad_frames
        self._warned_longer = False

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise InputError(f"OpenCV cannot open video {self.path}")
        return capture

    def __len__(self) -> int:
        if self._count is None:  # containers without a frame count: decode once to count
            self._count = sum(1 for _ in self._decode(0, None))
        return self._count

    def where(self, index: int) -> str:
        return f"{self.path} frame {index}"

    def size(self) -> tuple[int, int]:
        return self._hw

    def _decode(self, start: int, stop: int | None) -> Iterator[tuple[int, np.ndarray]]:
        capture = self._open()
        try:
            if start > 0:
                capture.set(cv2.CAP_PROP_POS_FRAMES, start)
            index = start
            previous: np.ndarray | None = None
            while stop is None or index < stop:
                ok, frame = capture.read()
                if ok:
                    previous = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                elif self._count is None or index >= self._count:
                    return  # the end of a clip whose length is not in its header
                else:
                    previous = self._replacement(index, previous)
                yield index, previous
                index += 1
            if stop == self._count and not self._warned_longer and capture.read()[0]:
                self._warned_longer = True  # the header undercounts (MPEG-PS estimates it)
                warnings.warn(
                    f"video {self.path} holds more frames than the {self._count} its header "
                    f"lists: frames from {self._count} on are not propagated; re-encode it "
                    "(e.g. ffmpeg -i in.mpg out.mp4) to keep them",
                    stacklevel=2,
                )
        finally:
            capture.release()

    def _replacement(self, index: int, previous: np.ndarray | None) -> np.ndarray:
        """The frame used for undecodable frame `index`, or the error saying it is damaged."""
        problem = (
            f"video {self.path}: frame {index} cannot be decoded, though its header lists "
            f"{self._count} frames (damaged or cut short)"
        )
        if not self.skip_bad_frames:
            raise InputError(f"{problem}; --skip-bad-frames uses the previous frame instead")
        if previous is None:  # a seek landed past the damage: find the last good frame
            if self._last_good_frame is None:
                for frame in self._decode_good_prefix():
                    self._last_good_frame = frame
            if self._last_good_frame is None:
                raise InputError(f"OpenCV cannot decode video {self.path}")
            previous = self._last_good_frame
        self._skip(index, problem, "the last decodable frame")
        return previous.copy()  # each frame its own array, as decoded ones are

    def _decode_good_prefix(self) -> Iterator[np.ndarray]:
        """The frames from the first one up to the first that cannot be decoded."""
        capture = self._open()
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    def forward(
        self, start: int = 0, stop: int | None = None
    ) -> Generator[tuple[int, np.ndarray], None, None]:
        yield from self._decode(start, len(self) if stop is None else min(stop, len(self)))

    def backward(self, start: int, stop: int = -1) -> Iterator[tuple[int, np.ndarray]]:
        chunk_stop = min(start, len(self) - 1) + 1
        while chunk_stop - 1 > stop:
            chunk_start = max(stop + 1, chunk_stop - _SEEK_CHUNK)
            chunk = list(self._decode(chunk_start, chunk_stop))
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


def open_frames(
    source: str | Path | FrameSource | Iterable[np.ndarray], *, skip_bad_frames: bool = False
) -> FrameSource:
    """A FrameSource for a video file, a folder of images, or arrays (RGB uint8).

    skip_bad_frames: a frame of a file or folder that cannot be decoded is replaced by the
    previous one, with a warning (default: an error naming the frame).
    """
    if isinstance(source, FrameSource):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return ImageFolder(path, skip_bad_frames=skip_bad_frames)
        if not path.exists():
            raise InputError(f"no such file or folder: {path}")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"{path} is a single image; give a video file or a folder of frames")
        if not path.is_file():  # a pipe or device would make OpenCV wait for data forever
            raise InputError(f"{path} is not a regular file; give a video file or a folder")
        return VideoFile(path, skip_bad_frames=skip_bad_frames)
    if isinstance(source, (Sequence, np.ndarray)):
        return ArraySequence(cast(Sequence[np.ndarray], source))
    return SpilledIterator(cast(Iterable[np.ndarray], source))


def prefetch(
    items: Iterator[T], depth: int = 4, on_stop: Callable[[], None] | None = None
) -> Generator[T, None, None]:
    """Yield from `items`, produced `depth` ahead by a background thread.

    Decoding (OpenCV) and the network (torch) both release the GIL, so reading the next frames
    overlaps with the current step. Errors in the producer are raised in the consumer. A
    consumer that stops early (an error, Ctrl-C, close()) stops the producer and waits for it to
    end, so nothing runs on after the consumer has cleaned up (a thread still running torch at
    interpreter exit can abort the process); `on_stop` is called first, to end a long step the
    producer is inside (Session.cancel).
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()
    finished = False

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
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # end a generator here, in its own thread, so its cleanup runs now

    producer = threading.Thread(target=produce, name="xmem-label-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item, error = slots.get()
            if item is done:
                finished = True
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        if not finished and on_stop is not None:
            on_stop()
        producer.join()
