"""Video samples -> engine sessions -> frame labels, shared by the operators and the Model.

Three steps, so bad input is found before anything runs and nothing is written half-way:
`plan_videos` reads and checks every keyframe of every sample, `propagate_video` runs one
`xmem_label.model.Session`, `write_frame_labels` writes every result in one bulk call.
FiftyOne numbers frames from 1; the engine from 0.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import fiftyone as fo
import numpy as np
from fiftyone import ViewField as F

from xmem_label.model import (
    Engine,
    InputError,
    Session,
)
from xmem_label.model.engine import EngineSpec, auto_engine, engine_spec
from xmem_label.model.errors import WeightsError
from xmem_label.model.frames import FrameSource, VideoFile
from xmem_label.model.keyframes import Keyframes
from xmem_label.model.suggest import Suggestion

from .labels import (
    PromptObject,
    assign_object_indexes,
    engine_ids,
    prompt_objects,
    result_to_detections,
)

PROMPT_TYPES = (fo.Detections, fo.Segmentation)

ProgressCallback = Callable[[int, int], None]


@dataclasses.dataclass
class VideoJob:
    """Everything needed to propagate one video sample, checked.

    keyframes: engine frame index (0-based) -> the objects a person gave there.
    names, indexes: engine object id -> label, and -> FiftyOne `Detection.index` (empty for
    Segmentation prompts, whose ids are the mask values).
    frames: the video, already opened and checked by `plan_video`; the session reads from it.
    """

    sample_id: str
    filepath: str
    frames: FrameSource
    num_frames: int
    keyframes: dict[int, list[PromptObject]]
    names: dict[int, str]
    indexes: dict[int, int] = dataclasses.field(default_factory=dict)

    def drawn_on(self, index: int) -> dict[int, fo.Detection]:
        """object id -> the person's own Detection on frame `index`, if any."""
        return {
            obj.object_id: obj.drawn
            for obj in self.keyframes.get(index, [])
            if obj.drawn is not None
        }


def frame_field_name(field: str) -> str:
    """`frames.gt` or `gt` -> `gt`."""
    field = (field or "").strip()
    return field[len("frames.") :] if field.startswith("frames.") else field


def check_prompt_field(collection: fo.core.collections.SampleCollection, field: str) -> None:
    """Raise InputError unless `collection` holds videos with a Detections or Segmentation
    frame field `field`."""
    if collection.media_type != "video":
        raise InputError(
            f"propagation needs video samples; this collection holds {collection.media_type} "
            "samples"
        )
    schema = collection.get_frame_field_schema()
    if not field or field not in schema:
        raise InputError(f"no frame field 'frames.{field}' in this dataset")
    document_type = getattr(schema[field], "document_type", None)
    if document_type not in PROMPT_TYPES:
        kind = document_type.__name__ if document_type else type(schema[field]).__name__
        raise InputError(
            f"frames.{field} holds {kind}; prompts must be Detections (masks or boxes) or "
            "Segmentation"
        )


def plan_videos(
    collection: fo.core.collections.SampleCollection, prompt_field: str
) -> tuple[list[VideoJob], list[str]]:
    """Check and read the keyframes of every sample of `collection`.

    Returns (jobs, ids of samples without any keyframe). Raises InputError naming the first
    problem: no video, wrong field, a keyframe beyond the video, an empty mask.
    """
    prompt_field = frame_field_name(prompt_field)
    check_prompt_field(collection, prompt_field)
    mask_targets = collection.mask_targets.get(f"frames.{prompt_field}") or (
        collection.default_mask_targets
    )
    jobs, skipped = [], []
    # Only the frames holding a label are read: the database filters them, so a long video's
    # thousands of unlabelled frame documents are not loaded (omit_empty=False keeps samples
    # without any, reported as skipped).
    keyframes_only = collection.select_fields(f"frames.{prompt_field}").match_frames(
        F(prompt_field).exists(),
        omit_empty=False,
    )
    for sample in keyframes_only.iter_samples():
        job = plan_video(sample, prompt_field, mask_targets)
        if job is None:
            skipped.append(sample.id)
        else:
            jobs.append(job)
    if not jobs:
        raise InputError(f"no sample has a keyframe label in frames.{prompt_field}")
    return jobs, skipped


def plan_video(sample: fo.Sample, field: str, mask_targets: dict | None) -> VideoJob | None:
    """The checked keyframes of one video sample (frames whose `field` holds a label), or None
    when it has none. Opens the video for its length and size, and for box prompts' frames."""
    labels = {
        frame_number: frame[field]
        for frame_number, frame in sample.frames.items()
        if _has_prompt(frame[field])
    }
    if not labels:
        return None
    name = os.path.basename(sample.filepath)
    if not Path(sample.filepath).is_file():
        raise InputError(f"video {sample.filepath} does not exist")
    frames = _opened_video(sample.filepath)
    num_frames, frame_hw = len(frames), frames.size()
    last = max(labels)
    if last > num_frames:
        raise InputError(f"{name}: keyframe on frame {last} but the video has {num_frames} frames")
    detections = {
        fn: list(label.detections)
        for fn, label in labels.items()
        if isinstance(label, fo.Detections)
    }
    indexes_by_frame = assign_object_indexes(detections)
    id_of = engine_ids({index for ids in indexes_by_frame.values() for index in ids})
    ids_by_frame = {
        fn: [(id_of[index], index) for index in indexes] for fn, indexes in indexes_by_frame.items()
    }
    keyframes = {}
    for frame_number, label in sorted(labels.items()):
        needs_image = isinstance(label, fo.Detections) and any(
            not det.has_mask for det in label.detections
        )
        image = _read_frame(frames, frame_number - 1) if needs_image else None
        keyframes[frame_number - 1] = prompt_objects(
            label,
            ids_by_frame.get(frame_number),
            frame_hw,
            image,
            mask_targets,
            where=f"{name} frame {frame_number} frames.{field}",
        )
    names = {obj.object_id: obj.label for objs in keyframes.values() for obj in objs}
    indexes = {object_id: index for index, object_id in id_of.items()}
    return VideoJob(sample.id, sample.filepath, frames, num_frames, keyframes, names, indexes)


def _opened_video(path: str) -> VideoFile:
    """The video at `path`, opened (its length read and its first frame decoded) once per
    process for as long as the file keeps its size and modification time: an App server or a
    worker runs many propagations of the same videos, and opening one takes tens of
    milliseconds, a tenth of a short correction's cost beyond the engine (issue 16)."""
    stat = os.stat(path)
    return _open_video(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _open_video(path: str, size: int, modified: int) -> VideoFile:
    """`_opened_video` for one version of the file (size and time are the key only). A
    VideoFile holds no open file between reads, so runs may share one."""
    return VideoFile(path)


def _has_prompt(label) -> bool:
    if isinstance(label, fo.Detections):
        return len(label.detections) > 0
    if isinstance(label, fo.Segmentation):
        return label.mask is not None or label.mask_path is not None
    return False


def _read_frame(frames, index: int) -> np.ndarray:
    for _, image in frames.forward(index, index + 1):
        return image
    raise InputError(f"cannot read frame {index + 1} of the video")


def iter_video_labels(
    job: VideoJob,
    engine: Engine,
    progress: ProgressCallback | None = None,
    cache_dir: Path | None = None,
    only: Collection[int] | None = None,
) -> Iterator[tuple[int, fo.Detections]]:
    """Run the engine over one video, yielding (FiftyOne frame number, Detections) in order.

    On every keyframe each object the video knows is either given by the person or declared
    absent there: a keyframe label is a person's complete say on that frame.
    progress(done, total) is the engine's, called after every step of either pass.
    cache_dir: the folder where the engine keeps this video's passes between runs (`cache.py`).
    only: the FiftyOne frame numbers to yield (default: every frame); the others are not
    turned into labels, which a correction that writes a few frames would not use.
    """
    with Session(engine, job.frames, cache_dir=cache_dir) as session:
        _keyframes(job).apply_to(session)
        for result in session.propagate(progress=progress):
            number = result.index + 1
            if only is None or number in only:
                drawn = job.drawn_on(result.index)
                yield number, result_to_detections(result, job.names, drawn, job.indexes)


def suggest_video(
    job: VideoJob, engine: Engine, count: int, cache_dir: Path | None = None
) -> list[Suggestion]:
    """The engine's `count` frames to review next in one video (engine frame indexes), from a
    propagation of its keyframes; with the passes in `cache_dir`, no network step runs."""
    with Session(engine, job.frames, cache_dir=cache_dir) as session:
        _keyframes(job).apply_to(session)
        for _ in session.propagate():
            pass
        return session.suggest(count)


def _keyframes(job: VideoJob) -> Keyframes:
    keyframes = Keyframes()
    for index, objects in job.keyframes.items():
        for obj in objects:
            keyframes.add(index, obj.object_id, obj.mask)
    return keyframes


def propagate_video(
    job: VideoJob, engine: Engine, progress: ProgressCallback | None = None
) -> dict[int, fo.Detections]:
    """Run the engine over one video; returns FiftyOne frame number -> Detections."""
    return dict(iter_video_labels(job, engine, progress))


def write_frame_labels(
    dataset: fo.Dataset, label_field: str, labels: dict[str, dict[int, fo.Detections]]
) -> None:
    """Write sample id -> {frame number -> Detections} into frames.<label_field>, replacing
    what those frames held (one bulk `set_values`)."""
    if labels:
        dataset.set_values(f"frames.{label_field}", labels, key_field="id")


def choose_engine(name: str = "auto", checkpoint: str | None = None, device: str | None = None):
    """Load the engine the user picked (model/engine.py's registry). "auto" is the first
    registered engine that can run here without downloading anything: XMem when its weights
    are on this machine, else the weight-free flow engine. `checkpoint` and `device` go to an
    engine that takes them (`weights`, `device`)."""
    spec = auto_engine(checkpoint)[0] if name == "auto" else engine_spec(name)
    taken = spec.options()
    given = {"weights": checkpoint, "device": device}
    options = tuple(sorted((k, v) for k, v in given.items() if v and k in taken))
    return _loaded_engine(spec, options, _weights_stamp(spec, checkpoint))


@functools.lru_cache(maxsize=2)
def _loaded_engine(
    spec: EngineSpec, options: tuple[tuple[str, str], ...], weights: tuple | None
) -> Engine:
    """The engine `spec` loaded with `options`, kept for the process's later runs (an App
    server or a delegated worker runs many): loading XMem's weights takes seconds, the flow
    engine's set-up a few hundredths. `weights` (the checkpoint file's path, size and
    modification time) is part of the key, so a replaced checkpoint is loaded anew. Engines
    hold no state between passes (`new_tracker` starts each one), so runs may share one."""
    return spec.load_function()(**dict(options))


def _weights_stamp(spec: EngineSpec, checkpoint: str | None) -> tuple | None:
    """(path, size, modification time) of the checkpoint `spec` would load, or None (no
    weights, or not on this machine: loading says why, or downloads them)."""
    if not spec.needs_weights:
        return None
    try:
        path = Path(spec.find_weights_function()(checkpoint, download=False))
        stat = path.stat()
    except (WeightsError, OSError):
        return None
    return str(path), stat.st_size, stat.st_mtime_ns
