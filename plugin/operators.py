"""The plugin's two operators: "propagate masks" and "review frames".

Both work on the dataset, the current view or the selected samples (`ctx.target_view()`).
Bad input raises `xmem_label.model.InputError` before anything is written; FiftyOne turns it
into the operation's error message (`ExecutionResult.error_message`, shown by the App).
"""

from __future__ import annotations

import time

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from xmem_label.model import InputError

from .videos import (
    PROMPT_TYPES,
    choose_engine,
    frame_field_name,
    plan_videos,
    propagate_video,
    write_frame_labels,
)

DEFAULT_OUTPUT_FIELD = "xmem"
LONG_JOB_FRAMES = 2000  # more frames than this: delegated execution is offered first
PROGRESS_INTERVAL_S = 1.0


def _prompt_fields(collection) -> list[str]:
    if collection is None or collection.media_type != "video":
        return []
    return sorted(collection.get_frame_field_schema(embedded_doc_type=PROMPT_TYPES))


def _frame_count(collection) -> int:
    """Frames in `collection` according to its metadata (0 when unknown)."""
    try:
        return int(collection.sum("metadata.total_frame_count") or 0)
    except Exception:  # no metadata field on this dataset yet
        return 0


class PropagateMasks(foo.Operator):
    """Keyframe masks in `frames.<prompt field>` -> masks on every frame in
    `frames.<output field>`."""

    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="propagate_masks",
            label="Propagate masks",
            description="Turn keyframe masks or boxes into masks on every frame (xmem-label)",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx) -> types.Property:
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Propagate on")
        fields = _prompt_fields(ctx.dataset)
        if not fields:
            inputs.view(
                "no_prompts",
                types.Warning(
                    label="Needs a video dataset with a Detections or Segmentation frame field"
                ),
            )
            return types.Property(inputs, view=types.View(label="Propagate masks"))
        choices = types.Dropdown(label="Keyframe field")
        for field in fields:
            choices.add_choice(field, label=f"frames.{field}")
        # A string, not an enum: a field that is not there gets the operator's own message.
        inputs.str("prompt_field", required=True, default=fields[0], view=choices)
        inputs.str(
            "label_field",
            required=True,
            default=DEFAULT_OUTPUT_FIELD,
            label="Output frame field",
            description="Replaced on the propagated samples",
        )
        engines = types.RadioGroup(label="Engine")
        engines.add_choice("auto", label="auto (XMem if its weights are here, else flow)")
        engines.add_choice("xmem", label="XMem")
        engines.add_choice("flow", label="flow (no weights)")
        inputs.enum("engine", engines.values(), default="auto", view=engines)
        inputs.str("checkpoint", label="XMem checkpoint (path or name, optional)")
        inputs.str("device", label="Device (cpu, cuda, cuda:1, mps; empty = best available)")
        long_job = _frame_count(ctx.target_view()) > LONG_JOB_FRAMES
        inputs.bool(
            "delegate",
            default=long_job,
            label="Delegate",
            description="Queue for `fiftyone delegated launch` (immediate runs stop at 600 s)",
        )
        return types.Property(inputs, view=types.View(label="Propagate masks"))

    def resolve_delegation(self, ctx) -> bool | None:
        return True if ctx.params.get("delegate") else None

    def resolve_execution_options(self, ctx) -> foo.ExecutionOptions:
        return foo.ExecutionOptions(
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            default_choice_to_delegated=_frame_count(ctx.target_view()) > LONG_JOB_FRAMES,
        )

    def execute(self, ctx) -> dict:
        prompt_field = frame_field_name(ctx.params.get("prompt_field"))
        label_field = frame_field_name(ctx.params.get("label_field") or DEFAULT_OUTPUT_FIELD)
        if label_field == prompt_field:
            raise InputError("the output field must differ from the keyframe field")
        jobs, skipped = plan_videos(ctx.target_view(), prompt_field)
        engine = choose_engine(
            ctx.params.get("engine") or "auto",
            ctx.params.get("checkpoint") or None,
            ctx.params.get("device") or None,
        )
        progress = _Progress(ctx, sum(job.num_frames for job in jobs))
        labels = {}
        for job in jobs:
            labels[job.sample_id] = propagate_video(job, engine, progress.for_video(job))
            progress.video_done(job)
        write_frame_labels(ctx.dataset, label_field, labels)
        if not ctx.delegated:
            ctx.trigger("reload_dataset")
        return {
            "samples": len(labels),
            "frames": sum(len(frames) for frames in labels.values()),
            "skipped_samples": len(skipped),
            "label_field": f"frames.{label_field}",
            "engine": engine.describe()["engine"],
        }

    def resolve_output(self, ctx) -> types.Property:
        outputs = types.Object()
        outputs.int("samples", label="Videos propagated")
        outputs.int("frames", label="Frames written")
        outputs.int("skipped_samples", label="Videos without a keyframe (left alone)")
        outputs.str("label_field", label="Output field")
        outputs.str("engine", label="Engine")
        return types.Property(outputs)


class _Progress:
    """Turns the engine's per-video (done, total) steps into one 0..1 progress over all
    videos, reported at most once a second (delegated runs store each report)."""

    def __init__(self, ctx, total_frames: int):
        self.ctx, self.total = ctx, max(total_frames, 1)
        self.frames_done, self.last_report = 0, 0.0

    def for_video(self, job):
        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if now - self.last_report < PROGRESS_INTERVAL_S:
                return
            self.last_report = now
            fraction = (self.frames_done + job.num_frames * done / max(total, 1)) / self.total
            self.ctx.set_progress(progress=min(fraction, 1.0), label=f"{fraction:.0%} of frames")

        return report

    def video_done(self, job) -> None:
        self.frames_done += job.num_frames


class ReviewFrames(foo.Operator):
    """Rank propagated frames by confidence; tag (or save a view of) the k least confident
    per video, so a person corrects those first and adds them as keyframes."""

    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="review_frames",
            label="Review frames",
            description="Tag the least confident propagated frames of each video",
            dynamic=True,
        )

    def resolve_input(self, ctx) -> types.Property:
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Review")
        fields = _prompt_fields(ctx.dataset)
        choices = types.Dropdown(label="Propagated field")
        for field in fields:
            choices.add_choice(field, label=f"frames.{field}")
        default = DEFAULT_OUTPUT_FIELD if DEFAULT_OUTPUT_FIELD in fields else None
        inputs.str("label_field", required=True, default=default, view=choices)
        inputs.int("k", default=10, min=1, label="Frames per video")
        actions = types.RadioGroup(label="Then")
        actions.add_choice("tag", label="tag their labels")
        actions.add_choice("view", label="save a view of them")
        inputs.enum("action", actions.values(), default="tag", view=actions)
        inputs.str("tag", default="review", label="Tag / view name")
        return types.Property(inputs, view=types.View(label="Review frames"))

    def execute(self, ctx) -> dict:
        label_field = frame_field_name(ctx.params.get("label_field"))
        k = int(ctx.params.get("k") or 10)
        action = ctx.params.get("action") or "tag"
        name = (ctx.params.get("tag") or "review").strip()
        if k < 1:
            raise InputError("k must be at least 1")
        target = ctx.target_view()
        schema = target.get_frame_field_schema() if target.media_type == "video" else {}
        if getattr(schema.get(label_field), "document_type", None) is not fo.Detections:
            raise InputError(f"frames.{label_field} is not a propagated Detections field")
        chosen = least_confident_frames(target, label_field, k)
        frame_ids = [frame_id for frames in chosen.values() for frame_id, _ in frames]
        if action == "view":
            ctx.dataset.save_view(name, ctx.dataset.select_frames(frame_ids), overwrite=True)
        else:
            target.untag_labels(name, label_fields=[f"frames.{label_field}"])
            target.select_frames(frame_ids).tag_labels(name, label_fields=[f"frames.{label_field}"])
        if not ctx.delegated:
            ctx.trigger("reload_dataset")
        confidences = [conf for frames in chosen.values() for _, conf in frames]
        return {
            "frames": len(frame_ids),
            "samples": len(chosen),
            "action": action,
            "name": name,
            "lowest_confidence": min(confidences, default=None),
        }

    def resolve_output(self, ctx) -> types.Property:
        outputs = types.Object()
        outputs.int("frames", label="Frames chosen")
        outputs.int("samples", label="Videos")
        outputs.str("name", label="Tag / view")
        outputs.float("lowest_confidence", label="Lowest confidence")
        return types.Property(outputs)


def least_confident_frames(collection, label_field: str, k: int) -> dict[str, list[tuple]]:
    """sample id -> [(frame id, confidence)] of its k least confident propagated frames.

    A frame's confidence is its `min_confidence` (which counts objects that vanished), else
    its lowest detection confidence. Keyframes, where a person drew, are never chosen.
    """
    path = f"frames.{label_field}"
    sample_ids, frame_ids, min_confidences, confidences, keyframes = collection.values(
        [
            "id",
            "frames.id",
            f"{path}.min_confidence",
            f"{path}.detections.confidence",
            f"{path}.detections.keyframe",
        ]
    )
    chosen = {}
    for sample_id, *frames in zip(
        sample_ids, frame_ids, min_confidences, confidences, keyframes, strict=True
    ):
        ranked = []
        for frame_id, min_confidence, dets_confidence, dets_keyframe in zip(*frames, strict=True):
            if any(dets_keyframe or []):
                continue
            if min_confidence is None:
                known = [c for c in dets_confidence or [] if c is not None]
                if not known:
                    continue
                min_confidence = min(known)
            ranked.append((min_confidence, frame_id))
        ranked.sort()
        if ranked:
            chosen[sample_id] = [(frame_id, conf) for conf, frame_id in ranked[:k]]
    return chosen
