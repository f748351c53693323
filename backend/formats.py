"""Label Studio shapes <-> engine shapes: label configs, task frames, keyframes, predictions.

Two project kinds are supported (Label Studio 1.23 open source):
- image sequence: `<Image valueList="$frames"/>` + `<BrushLabels>`; every region carries the
  0-based `item_index` of its frame. Optional smart `<RectangleLabels>` / `<KeyPointLabels>` on
  the same image are prompts.
- video: `<Video value="$video"/>` + `<VideoRectangle>` (+ `<Labels>` naming the objects); a
  region is a track whose keyframes (`sequence`) have a 1-based `frame`.

Object identity across frames: regions this backend predicted carry the id `xl<object>f<frame>`
(`xl<object>k<frame>` on a person's keyframe), and keep it when a person accepts and edits them;
any other brush region is matched by label and by its rank among that label's regions on its
frame (the first "Chair" on every frame is one object, the second another).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
from label_studio_sdk.label_interface import LabelInterface

from xmem_label.model import InputError
from xmem_label.model.keyframes import Keyframes, ObjectIds
from xmem_label.model.suggest import Suggestion

from .rle import mask_to_rle, rle_to_mask

# Ids of predicted regions: xl<object>f<frame> when propagated, xl<object>k<frame> on a frame a
# person gave (so it stays a keyframe after the person accepts the prediction unchanged).
PREDICTED_ID = re.compile(r"^xl(\d+)([fk])\d+$")
PERSON_ORIGINS = {"manual", "prediction-changed", None}  # "prediction" = accepted unchanged
# A TextArea of this name in the label config receives a failed job's reason.
STATUS_NAME = "xmem_status"


@dataclasses.dataclass(frozen=True)
class SequenceConfig:
    """An image-sequence project: brush masks on a list of frames."""

    brush_name: str
    image_name: str
    frames_key: str
    labels: tuple[str, ...]
    prompt_names: tuple[str, ...]  # smart RectangleLabels / KeyPointLabels on the same image
    status_name: str | None = None  # the read-only <TextArea name="xmem_status"> for failures

    @property
    def media_name(self) -> str:
        return self.image_name


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """A video project: VideoRectangle tracks."""

    box_name: str
    video_name: str
    video_key: str
    framerate: float
    labels: tuple[str, ...]
    status_name: str | None = None

    @property
    def media_name(self) -> str:
        return self.video_name


ProjectConfig = SequenceConfig | VideoConfig


@functools.lru_cache(maxsize=64)
def parse_label_config(label_config: str) -> ProjectConfig:
    """The supported tag pair of a label config, or an InputError saying what is missing."""
    if not label_config or not label_config.strip():
        raise InputError("the request has no label config")
    try:
        interface = LabelInterface(label_config)
    except Exception as exc:  # the SDK raises several types for broken XML
        raise InputError(f"cannot parse the label config: {exc}") from None
    objects = {obj.name: obj for obj in interface.objects}
    controls = list(interface.controls)
    status = (
        STATUS_NAME
        if any(c.tag == "TextArea" and c.name == STATUS_NAME for c in controls)
        else None
    )

    for control in controls:
        target = objects.get(control.to_name[0]) if control.to_name else None
        if control.tag == "BrushLabels" and target is not None and target.tag == "Image":
            frames_key = (target.attr.get("valueList") or "").lstrip("$")
            if not frames_key:
                raise InputError(
                    f'<Image name="{target.name}"> needs valueList="$frames" (an image sequence) '
                    "for masks across frames"
                )
            prompts = tuple(
                c.name
                for c in controls
                if c.tag in ("RectangleLabels", "KeyPointLabels")
                and c.to_name == control.to_name
                and c.attr.get("smart", "").lower() == "true"
            )
            return SequenceConfig(
                brush_name=control.name,
                image_name=target.name,
                frames_key=frames_key,
                labels=tuple(control.labels),
                prompt_names=prompts,
                status_name=status,
            )
        if control.tag == "VideoRectangle" and target is not None and target.tag == "Video":
            labels = next(
                (
                    tuple(c.labels)
                    for c in controls
                    if c.tag == "Labels" and c.to_name == control.to_name
                ),
                (),
            )
            return VideoConfig(
                box_name=control.name,
                video_name=target.name,
                video_key=(target.value or "").lstrip("$"),
                framerate=float(target.attr.get("framerate") or 24.0),
                labels=labels,
                status_name=status,
            )
    raise InputError(
        'the label config has no supported tag pair: use <Image valueList="$frames"/> with '
        "<BrushLabels>, or <Video/> with <VideoRectangle>"
    )


def task_media(task: dict, config: ProjectConfig) -> list[str] | str:
    """The frame URLs (image sequence) or the video URL of a task."""
    data = task.get("data") or {}
    task_id = task.get("id")
    if isinstance(config, SequenceConfig):
        frames = data.get(config.frames_key)
        if not isinstance(frames, list) or not frames:
            raise InputError(f"task {task_id} has no frames: data.{config.frames_key} is empty")
        if not all(isinstance(url, str) and url for url in frames):
            raise InputError(
                f"task {task_id}: every frame in data.{config.frames_key} must be a URL"
            )
        return frames
    video = data.get(config.video_key)
    if not isinstance(video, str) or not video:
        raise InputError(f"task {task_id} has no video: data.{config.video_key} is empty")
    return video


def latest_annotation(task: dict) -> dict | None:
    """The most recently updated annotation of a task that was not skipped."""
    annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not annotations:
        return None
    return max(annotations, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0))


# ----- image sequences: brush keyframes ---------------------------------------------------------


@dataclasses.dataclass
class BrushKeyframes:
    """Objects drawn by a person: ids 1..N with their labels, and their masks per frame."""

    labels: dict[int, str]  # object id -> label
    given: Keyframes  # frame -> object id -> bool mask (model/keyframes.py's rule)
    regions: dict[int, dict[int, dict]]  # frame -> object id -> the person's region, verbatim
    size: tuple[int, int]  # (width, height) the regions were drawn at


def brush_keyframes(results: list[dict], config: SequenceConfig, num_frames: int) -> BrushKeyframes:
    """Keyframe masks from an annotation's result list.

    A frame is a keyframe when a person drew or edited a region on it (origin "manual",
    "prediction-changed" or none, or an `xl<o>k<f>` id); then every region on it counts as
    given, and an object of the task with no region there is absent there (model/keyframes.py).
    Raises InputError for a malformed region or an annotation without keyframes.
    """
    regions = [r for r in results or [] if r.get("from_name") == config.brush_name]
    by_frame: dict[int, list[dict]] = {}
    for region in regions:
        frame = region.get("item_index") or 0
        if not isinstance(frame, int) or not 0 <= frame < num_frames:
            raise InputError(f"brush region on frame {frame}: the task has {num_frames} frames")
        by_frame.setdefault(frame, []).append(region)
    keyframes = sorted(
        frame for frame, on_frame in by_frame.items() if any(_made_by_person(r) for r in on_frame)
    )
    if not keyframes:
        raise InputError(
            f"no keyframe: the annotation has no {config.brush_name} region drawn or edited by a "
            "person"
        )

    object_ids = ObjectIds()
    result = BrushKeyframes(labels={}, given=Keyframes(), regions={}, size=(0, 0))
    for frame in keyframes:
        for region in by_frame[frame]:
            label, mask, size = _decode_brush_region(region, frame)
            label = label or (config.labels[0] if config.labels else "")  # unlabelled stroke
            if result.size != (0, 0) and size != result.size:
                raise InputError(
                    f"brush regions differ in size: {size[0]}x{size[1]} on frame {frame}, "
                    f"{result.size[0]}x{result.size[1]} before"
                )
            result.size = size
            predicted = PREDICTED_ID.match(str(region.get("id", "")))
            object_id = object_ids.id_for(
                frame, label, int(predicted.group(1)) if predicted else None
            )
            result.labels.setdefault(object_id, label)
            frame_regions = result.regions.setdefault(frame, {})
            if object_id in result.given.masks.get(frame, {}):
                frame_regions.pop(object_id, None)  # two regions of one object: re-encoded
            else:
                frame_regions[object_id] = region
            result.given.add(frame, object_id, mask)
    return result


def _made_by_person(region: dict) -> bool:
    predicted = PREDICTED_ID.match(str(region.get("id", "")))
    return region.get("origin") in PERSON_ORIGINS or bool(predicted and predicted.group(2) == "k")


def _decode_brush_region(region: dict, frame: int) -> tuple[str, np.ndarray, tuple[int, int]]:
    value = region.get("value") or {}
    labels = value.get("brushlabels") or []
    width, height = region.get("original_width"), region.get("original_height")
    if not isinstance(width, int) or not isinstance(height, int) or width < 1 or height < 1:
        raise InputError(f"brush region on frame {frame} has no original_width/original_height")
    if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
        raise InputError(f"brush region on frame {frame} has no RLE mask (value.rle)")
    mask = rle_to_mask(value["rle"], width, height)
    return (labels[0] if labels else ""), mask, (width, height)


def brush_region(
    config: SequenceConfig,
    object_id: int,
    label: str,
    frame: int,
    mask: np.ndarray,
    score: float,
    provenance: tuple[str, tuple[int, ...]] | None = None,
) -> dict:
    """One predicted brush region: one object on one frame; its provenance (where the mask
    comes from) in the region's meta text, which the labeling screen shows."""
    height, width = mask.shape
    meta = {}
    if provenance is not None:
        meta = {"meta": {"text": [provenance_text(*provenance)]}}
    return {
        "id": f"xl{object_id}f{frame}",
        "from_name": config.brush_name,
        "to_name": config.image_name,
        "type": "brushlabels",
        "item_index": frame,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "score": round(float(score), 4),
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
        **meta,
    }


def provenance_text(source: str, keyframes: tuple[int, ...]) -> str:
    """Where a predicted mask comes from, in words (frames numbered from 1, as Label Studio
    shows them)."""
    frames = " and ".join(str(frame + 1) for frame in keyframes)
    if source == "fused":
        return f"xmem-label: fused from keyframes {frames}"
    if source in ("forward", "backward"):
        return f"xmem-label: {source} from keyframe {frames}"
    return f"xmem-label: {source}"


def suggestions_text(config: SequenceConfig, suggestions: list[Suggestion]) -> dict:
    """The status TextArea of a prediction: the frames to check next and why."""
    lines = [f"check frame {s.index + 1}: " + "; ".join(s.reasons) for s in suggestions] or [
        "xmem-label: no frame to check"
    ]
    return status_text(config, lines)


FIRST_BATCH_NOTE = "frames so far, the rest follows"


def first_batch_text(config: SequenceConfig, done: int, total: int) -> dict:
    """The status TextArea of a job's first batch (replaced by its whole prediction)."""
    return status_text(config, [f"xmem-label: {done} of {total} {FIRST_BATCH_NOTE}"])


def is_first_batch(prediction: dict) -> bool:
    """Whether a stored prediction is a job's first batch, by its status note."""
    return any(
        FIRST_BATCH_NOTE in text
        for region in prediction.get("result") or []
        if region.get("type") == "textarea"
        for text in region["value"]["text"]
    )


def status_text(config: SequenceConfig, lines: list[str]) -> dict:
    """A region holding `lines` in the config's read-only status TextArea."""
    return {
        "from_name": config.status_name,
        "to_name": config.image_name,
        "type": "textarea",
        "value": {"text": lines},
    }


# ----- image sequences: smart prompts ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A smart box or point a person placed on one frame, in pixels."""

    frame: int
    label: str
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1
    point: tuple[float, float] | None
    positive: bool = True


def prompts_from_context(context: dict | None, config: SequenceConfig) -> list[Prompt]:
    """Smart RectangleLabels / KeyPointLabels regions of an interactive call's context."""
    prompts = []
    for region in (context or {}).get("result") or []:
        if region.get("from_name") not in config.prompt_names:
            continue
        value = region.get("value") or {}
        width, height = region.get("original_width"), region.get("original_height")
        if not width or not height:
            raise InputError("a smart prompt has no original_width/original_height")
        labels = value.get("rectanglelabels") or value.get("keypointlabels") or []
        label = labels[0] if labels else ""
        frame = region.get("item_index") or 0
        x, y = value.get("x", 0.0) * width / 100, value.get("y", 0.0) * height / 100
        if region.get("type") == "rectanglelabels":
            box = (
                x,
                y,
                x + value.get("width", 0.0) * width / 100,
                y + value.get("height", 0.0) * height / 100,
            )
            prompts.append(Prompt(frame=frame, label=label, box=box, point=None))
        else:
            # Alt+click marks a negative point: "is_positive": false (SAM examples) or
            # value.negative, depending on the Label Studio version.
            positive = bool(region.get("is_positive", not value.get("negative", False)))
            prompts.append(
                Prompt(frame=frame, label=label, box=None, point=(x, y), positive=positive)
            )
    return prompts


# ----- video: box tracks -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BoxKeyframe:
    frame: int  # 0-based
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    ends_track: bool  # enabled false: the object is gone after this frame


@dataclasses.dataclass(frozen=True)
class Track:
    label: str
    keyframes: tuple[BoxKeyframe, ...]


def video_tracks(results: list[dict], config: VideoConfig, size: tuple[int, int]) -> list[Track]:
    """The person's VideoRectangle tracks (keyframes in pixels for a (width, height) video)."""
    width, height = size
    tracks = []
    for region in results or []:
        if region.get("from_name") != config.box_name:
            continue
        value = region.get("value") or {}
        labels = value.get("labels") or []
        keyframes = []
        for item in value.get("sequence") or []:
            frame = item.get("frame")
            if not isinstance(frame, int) or frame < 1:
                raise InputError(f"video box keyframe with frame {frame!r}: frames are 1-based")
            x0, y0 = item.get("x", 0.0) * width / 100, item.get("y", 0.0) * height / 100
            box = (
                x0,
                y0,
                x0 + item.get("width", 0.0) * width / 100,
                y0 + item.get("height", 0.0) * height / 100,
            )
            keyframes.append(BoxKeyframe(frame - 1, box, ends_track=not item.get("enabled", True)))
        if keyframes:
            tracks.append(Track(label=labels[0] if labels else "", keyframes=tuple(keyframes)))
    if not tracks:
        raise InputError(f"no keyframe: the annotation has no {config.box_name} box")
    return tracks


def video_track_region(
    config: VideoConfig,
    object_id: int,
    label: str,
    boxes: list[tuple[int, int, int, int] | None],
    size: tuple[int, int],
    score: float,
) -> dict:
    """One videorectangle track: a box on every frame where the object is present; `enabled`
    false on the last box before a gap and on the last box of all."""
    width, height = size
    sequence = []
    for index, box in enumerate(boxes):
        if box is None:
            continue
        present_next = index + 1 < len(boxes) and boxes[index + 1] is not None
        x0, y0, x1, y1 = box
        sequence.append(
            {
                "frame": index + 1,
                "enabled": present_next,
                "rotation": 0,
                "time": (index + 1) / config.framerate,
                "x": 100.0 * x0 / width,
                "y": 100.0 * y0 / height,
                "width": 100.0 * (x1 - x0) / width,
                "height": 100.0 * (y1 - y0) / height,
            }
        )
    value = {
        "framesCount": len(boxes),
        "duration": len(boxes) / config.framerate,
        "sequence": sequence,
    }
    if label:
        value["labels"] = [label]
    return {
        "id": f"xl{object_id}track",
        "from_name": config.box_name,
        "to_name": config.video_name,
        "type": "videorectangle",
        "score": round(float(score), 4),
        "value": value,
    }
