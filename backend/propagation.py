"""One task's propagation: download its media, run the engine from its keyframes, and build the
prediction (brush regions on every frame, or one box track per object).

Each stage is timed (download / decode / propagate / encode) for /metrics and the benchmark.
They overlap: an image sequence's frames download while the engine works on those already
there (download is the time until the last one arrived), and decoding runs in the engine's
prefetch thread, so its time is part of propagation. The pass cache is trimmed to its cap
after each job, while its prediction is being stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from xmem_label.model import Engine, InputError, Session, pass_cache
from xmem_label.model.frames import RandomAccessSource
from xmem_label.model.keyframes import Keyframes
from xmem_label.model.prompts import mask_from_box, mask_from_points

from . import formats, media
from .settings import BackendSettings
from .studio import LabelStudio

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 4
SUGGESTIONS = 5  # frames to check next, shown in the task's status TextArea
FIRST_BATCH = 10  # frames of a longer task handed over early, while the rest propagates


@dataclasses.dataclass
class Timings:
    download: float = 0.0
    decode: float = 0.0
    propagate: float = 0.0
    encode: float = 0.0
    total: float = 0.0  # the whole job, wall clock

    def as_dict(self) -> dict[str, float]:
        return {key: round(value, 4) for key, value in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class Outcome:
    """A prediction ready for Label Studio, and what it took to make it."""

    task_id: int | None
    prediction: dict  # {"result": [...], "score": s, "model_version": v}
    timings: Timings


class DownloadedFrames(RandomAccessSource):
    """A task's frames, fetched by a pool of threads while the engine already works on the
    first ones: `read` waits only for the frame it needs. Frames are fetched in the order the
    session reads them: each pass says which frames it will read (`forward`, `backward`) and
    those go to the front of the queue, so a backward pass from the last frame does not wait
    for the whole task to arrive in task order. Every frame's header is checked against the
    first frame's size (and the pixel limit) as it arrives, before anything decodes it;
    `wait_all` is the job's proof that every frame arrived and passed."""

    def __init__(
        self, studio: LabelStudio, urls: list[str], task_id: object, folder: Path, timings: Timings
    ):
        self.studio, self.urls, self.task_id, self.folder = studio, urls, task_id, folder
        self.timings = timings
        self.names = [f"{index:05d}" for index in range(len(urls))]
        self.started = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        self.arrived = threading.Lock()
        self.stopped = False
        first = self._local_copy(0)  # its size is the one every other frame must have
        self.width, self.height = self._size_of(0, first)
        timings.download = time.perf_counter() - self.started
        self.paths: list[Future[Path]] = [Future() for _ in urls]
        self.paths[0].set_result(first)
        # The frames no fetch has taken yet, the next one last (so taking it is a pop).
        self.queued = list(range(len(urls) - 1, 0, -1))
        self.queue_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="xmem-label-fetch")
        for _ in range(len(urls) - 1):
            self.pool.submit(self._fetch_next)

    def __len__(self) -> int:
        return len(self.urls)

    def forward(
        self, start: int = 0, stop: int | None = None
    ) -> Generator[tuple[int, np.ndarray], None, None]:
        self._fetch_first(range(start, len(self) if stop is None else min(stop, len(self))))
        return super().forward(start, stop)

    def backward(self, start: int, stop: int = -1) -> Iterator[tuple[int, np.ndarray]]:
        self._fetch_first(range(min(start, len(self) - 1), stop, -1))
        return super().backward(start, stop)

    def read(self, index: int) -> np.ndarray:
        if not self.paths[index].done():
            self._fetch_first([index])
        path = self.paths[index].result()
        started = time.perf_counter()
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        self.timings.decode += time.perf_counter() - started
        if image is None:
            raise InputError(f"frame {index} is not an image the backend can decode")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def wait_all(self) -> None:
        """Return once every frame is here and checked (raising the first frame's error)."""
        for path in self.paths:
            path.result()

    def stop_fetching(self) -> None:
        """End the job's downloads (after `wait_all`, or on a failure): frames not started yet
        are not fetched; a reader still running gets an error for them. (Not `close`: the
        Session closes its frames when it ends, before `wait_all`.)"""
        self.stopped = True
        self.pool.shutdown(wait=True)

    def _fetch_first(self, indexes: Iterable[int]) -> None:
        """Fetch these frames next, in this order, before the other frames not taken yet."""
        wanted = list(indexes)
        with self.queue_lock:
            waiting = set(self.queued)
            first = [index for index in wanted if index in waiting]
            chosen = set(first)
            self.queued = [index for index in self.queued if index not in chosen] + first[::-1]

    def _fetch_next(self) -> None:
        """Fetch the frame at the front of the queue (one call per frame)."""
        with self.queue_lock:
            index = self.queued.pop()
        try:
            self.paths[index].set_result(self._checked_copy(index))
        except BaseException as exc:
            self.paths[index].set_exception(exc)

    def _checked_copy(self, index: int) -> Path:
        if self.stopped:
            raise InputError(f"{self._what(index)}: the job ended before it")
        path = self._local_copy(index)
        width, height = self._size_of(index, path)
        if (width, height) != (self.width, self.height):
            raise InputError(
                f"the frames of a task differ in size: frame {index} is {width}x{height}, "
                f"frame 0 is {self.width}x{self.height}"
            )
        with self.arrived:  # download: the time until the last frame arrived
            self.timings.download = max(self.timings.download, time.perf_counter() - self.started)
        return path

    def _what(self, index: int) -> str:
        return f"frame {index} of task {self.task_id}"

    def _size_of(self, index: int, path: Path) -> tuple[int, int]:
        return media.image_size(path, self._what(index), self.studio.settings)

    def _local_copy(self, index: int) -> Path:
        """The frame's file: kept from an earlier job of the task, or fetched now (under a
        temporary name, renamed when whole)."""
        kept = self.folder / f"{index:06d}"
        if kept.is_file():
            return kept
        partial = self.folder / f"{index:06d}.part-{threading.get_ident()}"
        fetched = self.studio.download(self.urls[index], self.task_id, partial, self._what(index))
        if fetched != partial:  # a file under LOCAL_FILES_DOCUMENT_ROOT, read where it is
            return fetched
        partial.replace(kept)
        return kept


@dataclasses.dataclass
class SequenceRequest:
    """What to propagate in an image-sequence task: a person's brush keyframes, or prompts."""

    task_id: int | None
    frame_urls: list[str]
    keyframes: formats.BrushKeyframes | None = None
    prompts: list[formats.Prompt] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class VideoRequest:
    task_id: int | None
    video_url: str
    annotation_results: list[dict]


def run_sequence(
    request: SequenceRequest,
    config: formats.SequenceConfig,
    engine: Engine,
    studio: LabelStudio,
    model_version: str,
    progress: Callable[[int, int], None] | None = None,
    first_batch: Callable[[dict], None] | None = None,
    first_batch_frames: int = FIRST_BATCH,
) -> Outcome:
    """Brush masks on every frame of an image-sequence task; `first_batch`, when given, gets a
    prediction of the first `first_batch_frames` frames out of the session as soon as they are
    (on tasks with more frames), so an annotator can start while the rest propagates.

    The task's folder in the pass cache (`task_folder`) keeps its downloaded frames and its
    session's passes between jobs, so a correction downloads nothing and runs only the passes
    its keyframes start."""
    timings = Timings()
    started = time.perf_counter()
    folder = task_folder(studio, request.task_id, request.frame_urls)
    with pass_cache.in_use(folder):
        frames = DownloadedFrames(
            studio, request.frame_urls, request.task_id, folder / "media", timings
        )
        try:
            keyframes = request.keyframes or _keyframes_from_prompts(
                request.prompts, frames, config
            )
            if keyframes.size != (frames.width, frames.height):
                raise InputError(
                    f"the keyframe masks are {keyframes.size[0]}x{keyframes.size[1]} but the "
                    f"frames are {frames.width}x{frames.height}"
                )
            with Session(engine, frames, cache_dir=folder / "passes") as session:
                keyframes.given.apply_to(session)
                early = None
                if first_batch is not None and len(frames) > first_batch_frames:
                    hand_over = first_batch

                    def first(result_so_far: list, score_so_far: float) -> None:
                        hand_over(
                            {
                                "result": result_so_far,
                                "score": round(score_so_far, 4),
                                "model_version": model_version,
                            }
                        )

                    early = (first_batch_frames, first)
                result, score = _brush_result(session, keyframes, config, timings, progress, early)
            frames.wait_all()  # every frame arrived and passed its checks
        finally:
            frames.stop_fetching()
    evict_in_background(studio.settings)
    timings.total = time.perf_counter() - started
    return Outcome(
        request.task_id,
        {"result": result, "score": round(score, 4), "model_version": model_version},
        timings,
    )


def evict_in_background(settings: BackendSettings) -> threading.Thread:
    """Trim the tasks' pass caches to their cap in a thread of its own, so the prediction is
    stored meanwhile: the trim reads every task folder's recorded size and deletes whole folders
    (thousands of files each). Not a daemon: a process that exits waits for a deletion under
    way."""

    def evict() -> None:
        try:
            pass_cache.evict(settings.pass_cache_dir, settings.pass_cache_bytes)
        except OSError as exc:  # the next job trims again
            log.warning("the pass cache was not trimmed: %s", exc)

    thread = threading.Thread(target=evict, name="xmem-label-evict")
    thread.start()
    return thread


def task_folder(studio: LabelStudio, task_id: int | None, frame_urls: list[str]) -> Path:
    """The task's cache folder, named by its id and a digest of its frame URLs: a task whose
    URLs change gets a new folder (the old one is evicted in time). A URL is taken to name the
    same bytes for as long as the task lists it, as Label Studio's own storages assume."""
    digest = hashlib.sha256("\n".join(frame_urls).encode()).hexdigest()[:16]
    # Only an integer id names the folder: a /predict body's id may be any JSON ("../..").
    name = f"task-{task_id}" if isinstance(task_id, int) else "task"
    return studio.settings.pass_cache_dir / f"{name}-{digest}"


def _brush_result(session, keyframes, config, timings, progress, early):
    """Regions for every object on every frame (a person's copied as they are), each with its
    confidence and provenance; the frames to check next go into the status TextArea. `early`:
    (n, hand_over), called with the regions and score so far once n frames are done."""
    result, score = [], 1.0
    started = time.perf_counter()
    for done, frame_result in enumerate(session.propagate(progress=progress), start=1):
        encode_started = time.perf_counter()
        score = min(score, frame_result.min_confidence)
        drawn = keyframes.regions.get(frame_result.index, {})
        for object_id, summary in frame_result.objects.items():
            label = keyframes.labels[object_id]
            if object_id in drawn:
                region = dict(drawn[object_id], id=f"xl{object_id}k{frame_result.index}")
                region.pop("origin", None)
                region["score"] = 1.0
                result.append(region)
            elif summary.area > 0:
                mask = frame_result.labels == object_id
                result.append(
                    formats.brush_region(
                        config,
                        object_id,
                        label,
                        frame_result.index,
                        mask,
                        summary.confidence,
                        provenance=(summary.source, summary.keyframes),
                    )
                )
        timings.encode += time.perf_counter() - encode_started
        if early is not None and done == early[0]:
            so_far = list(result)
            if config.status_name:
                so_far.append(formats.first_batch_text(config, done, len(session.frames)))
            early[1](so_far, score)
    timings.propagate = time.perf_counter() - started - timings.encode
    if config.status_name:
        result.append(formats.suggestions_text(config, session.suggest(SUGGESTIONS)))
    return result, score


def _keyframes_from_prompts(prompts, frames: DownloadedFrames, config) -> formats.BrushKeyframes:
    """Masks made from smart boxes (one object each) and points (one object per frame and
    label, negative points included)."""
    if not prompts:
        raise InputError("no keyframe: the request has no smart box or point prompt")
    keyframes = formats.BrushKeyframes(labels={}, given=Keyframes(), regions={}, size=(0, 0))
    points: dict[tuple[int, str], list[formats.Prompt]] = {}
    for prompt in prompts:
        if not 0 <= prompt.frame < len(frames):
            raise InputError(f"prompt on frame {prompt.frame}: the task has {len(frames)} frames")
        if prompt.box is not None:
            _add_prompt_object(
                keyframes,
                prompt.frame,
                prompt.label,
                config,
                mask_from_box(frames.read(prompt.frame), prompt.box),
            )
        else:
            points.setdefault((prompt.frame, prompt.label), []).append(prompt)
    for (frame, label), group in points.items():
        mask = mask_from_points(
            frames.read(frame),
            [p.point for p in group if p.positive],
            [p.point for p in group if not p.positive],
        )
        _add_prompt_object(keyframes, frame, label, config, mask)
    height, width = frames.size()
    keyframes.size = (width, height)
    return keyframes


def _add_prompt_object(keyframes, frame, label, config, mask) -> None:
    object_id = len(keyframes.labels) + 1
    keyframes.labels[object_id] = label if label in config.labels else config.labels[0]
    keyframes.given.add(frame, object_id, mask)


def run_video(
    request: VideoRequest,
    config: formats.VideoConfig,
    engine: Engine,
    studio: LabelStudio,
    model_version: str,
    progress: Callable[[int, int], None] | None = None,
) -> Outcome:
    """One box track per object over a whole video, from the person's keyframe boxes."""
    timings = Timings()
    job_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xmem-label-media-", dir=work_dir(studio)) as folder:
        started = time.perf_counter()
        what = f"the video of task {request.task_id}"
        path = studio.download(request.video_url, request.task_id, Path(folder) / "video", what)
        timings.download = time.perf_counter() - started
        with Session(engine, path) as session:
            height, width = session.frame_hw
            media.check_frame_size(width, height, what, studio.settings)
            num_frames = len(session.frames)
            tracks = formats.video_tracks(request.annotation_results, config, (width, height))
            labels = {}
            for object_id, track in enumerate(tracks, start=1):
                labels[object_id] = track.label
                _add_track(session, object_id, track, num_frames)
            boxes: dict[int, list] = {object_id: [] for object_id in labels}
            confidence = dict.fromkeys(labels, 1.0)
            started = time.perf_counter()
            for frame_result in session.propagate(progress=progress):
                for object_id, summary in frame_result.objects.items():
                    boxes[object_id].append(summary.box)
                    confidence[object_id] = min(confidence[object_id], summary.confidence)
            timings.propagate = time.perf_counter() - started
    result = [
        formats.video_track_region(
            config,
            object_id,
            labels[object_id],
            boxes[object_id],
            (width, height),
            confidence[object_id],
        )
        for object_id in labels
    ]
    score = min(confidence.values(), default=1.0)
    timings.total = time.perf_counter() - job_started
    return Outcome(
        request.task_id,
        {"result": result, "score": round(score, 4), "model_version": model_version},
        timings,
    )


def _add_track(session: Session, object_id: int, track: formats.Track, num_frames: int) -> None:
    """A track's keyframe boxes become masks (GrabCut inside the box); `enabled: false` makes
    the object absent from the next frame on, unless a keyframe follows right there."""
    keyframe_indexes = {keyframe.frame for keyframe in track.keyframes}
    for keyframe in track.keyframes:
        if keyframe.frame >= num_frames:
            raise InputError(
                f"box keyframe on frame {keyframe.frame + 1}: the video has {num_frames} frames"
            )
        frame = next(
            image for _, image in session.frames.forward(keyframe.frame, keyframe.frame + 1)
        )
        session.add_object_mask(keyframe.frame, object_id, mask_from_box(frame, keyframe.box))
        after = keyframe.frame + 1
        if keyframe.ends_track and after < num_frames and after not in keyframe_indexes:
            session.set_absent(after, object_id)


def work_dir(studio: LabelStudio) -> Path:
    """The state folder (MODEL_DIR) holds the video a video job downloads, deleted when it ends."""
    folder = studio.settings.state_dir / "media"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
