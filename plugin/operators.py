"""The plugin's two operators: "propagate masks" and "review frames".

Both work on the dataset, the current view or the selected samples (`ctx.target_view()`).
Bad input raises `xmem_label.model.InputError` before anything is written; FiftyOne turns it
into the operation's error message (`ExecutionResult.error_message`, shown by the App).
"""

from __future__ import annotations

import time
from collections.abc import Generator

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from xmem_label.model import InputError

from .videos import (
    PROMPT_TYPES,
    choose_engine,
    frame_field_name,
    iter_video_labels,
    plan_videos,
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
    if collection is None or collection.media_type != "video":
        return 0
    return int(collection.sum("metadata.total_frame_count") or 0)


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
            execute_as_generator=True,
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

    def execute(self, ctx):
        """Delegated: run, report progress to the operation's record, return the summary.
        Immediate: a generator, so the App shows progress while it runs (the App calls
        generator operators through a streaming request); it ends with a notification.
        Input is checked here, before anything runs, so bad input fails at once."""
        run = _PropagationRun(ctx)
        updates = _throttled(run.steps())
        if ctx.delegated:
            return _drain(updates, lambda fraction: ctx.set_progress(fraction, _percent(fraction)))
        return self._stream(ctx, updates)

    @staticmethod
    def _stream(ctx, updates):
        while True:
            try:
                fraction = next(updates)
            except StopIteration as finished:
                summary = finished.value
                break
            yield ctx.ops.set_progress(label=_percent(fraction), progress=fraction)
        yield ctx.ops.set_progress(label="done", progress=1.0)
        yield ctx.ops.reload_dataset()
        yield ctx.ops.notify(
            f"xmem-label: {summary['frames']} frames of {summary['samples']} videos written to "
            f"{summary['label_field']}",
            variant="success",
        )

    def resolve_output(self, ctx) -> types.Property:
        outputs = types.Object()
        outputs.int("samples", label="Videos propagated")
        outputs.int("frames", label="Frames written")
        outputs.int("skipped_samples", label="Videos without a keyframe (left alone)")
        outputs.str("label_field", label="Output field")
        outputs.str("engine", label="Engine")
        return types.Property(outputs)


class _PropagationRun:
    """One run of "propagate masks": its checked input, then `steps()`, which propagates
    every video, yields the fraction done after every frame, writes every label in one bulk
    call at the end (a failed or killed run writes nothing) and returns the summary."""

    def __init__(self, ctx):
        self.prompt_field = frame_field_name(ctx.params.get("prompt_field"))
        self.label_field = frame_field_name(
            ctx.params.get("label_field") or DEFAULT_OUTPUT_FIELD
        )
        if self.label_field == self.prompt_field:
            raise InputError("the output field must differ from the keyframe field")
        if not self.label_field.isidentifier():
            raise InputError(f"output field {self.label_field!r} is not a plain field name")
        self.dataset = ctx.dataset
        self.jobs, self.skipped = plan_videos(ctx.target_view(), self.prompt_field)
        existing = self.dataset.get_frame_field_schema().get(self.label_field)
        if existing is not None and getattr(existing, "document_type", None) is not fo.Detections:
            raise InputError(
                f"frames.{self.label_field} already holds something other than Detections; "
                "choose another output field"
            )
        self.engine = choose_engine(
            ctx.params.get("engine") or "auto",
            ctx.params.get("checkpoint") or None,
            ctx.params.get("device") or None,
        )

    def steps(self) -> Generator[float, None, dict]:
        total = max(sum(job.num_frames for job in self.jobs), 1)
        finished = 0
        labels = {}
        for job in self.jobs:
            engine_done = [0.0]  # the engine's own progress, backward pass included

            def note(done: int, steps: int, engine_done=engine_done) -> None:
                engine_done[0] = done / max(steps, 1)

            frames = {}
            for frame_number, detections in iter_video_labels(job, self.engine, note):
                frames[frame_number] = detections
                yield (finished + job.num_frames * engine_done[0]) / total
            labels[job.sample_id] = frames
            finished += job.num_frames
        write_frame_labels(self.dataset, self.label_field, labels)
        return {
            "samples": len(labels),
            "frames": sum(len(frames) for frames in labels.values()),
            "skipped_samples": len(self.skipped),
            "label_field": f"frames.{self.label_field}",
            "engine": self.engine.describe()["engine"],
        }


def _throttled(steps: Generator[float, None, dict]) -> Generator[float, None, dict]:
    """Pass on at most one progress update per PROGRESS_INTERVAL_S (delegated runs store each
    one in the database); returns what `steps` returns."""
    last = float("-inf")
    while True:
        try:
            fraction = next(steps)
        except StopIteration as finished:
            return finished.value
        if time.monotonic() - last >= PROGRESS_INTERVAL_S:
            last = time.monotonic()
            yield min(fraction, 1.0)


def _drain(updates: Generator[float, None, dict], report) -> dict:
    """Run `updates` to the end, calling report(fraction) for each; returns its result."""
    while True:
        try:
            report(next(updates))
        except StopIteration as finished:
            return finished.value


def _percent(fraction: float) -> str:
    return f"{fraction:.0%} of frames"


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
