"""The plugin's operators: "propagate masks", "propagate corrections", "suggest frames to
review", "review frames" and "propagation status".

They work on the dataset, the current view or the selected samples (`ctx.target_view()`).
Parameters are checked in `resolve_input`, so the App shows a bad one next to its field and
FiftyOne refuses it before running or queueing anything. What needs the videos (keyframes
beyond the end, empty masks, unreadable files) is checked when the run starts, before it
writes anything: an immediate run's error message, or, for a delegated run, the one-line
reason recorded on the failed operation.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Generator
from typing import NamedTuple

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone.core.odm import get_db_conn

from xmem_label.model import InputError, XMemLabelError
from xmem_label.model.engine import registered_engines

from . import cache, runs
from .corrections import DIGEST_ATTRIBUTE, frames_to_write, keyframe_digests, recorded_digests
from .fields import (
    check_keyframe_field,
    check_output_field,
    declare_output,
    default_output_field,
    is_output,
    keyframe_candidates,
    prompt_fields,
)
from .first_batch import EarlyFrames, first_batch
from .videos import (
    VideoJob,
    choose_engine,
    frame_field_name,
    iter_video_labels,
    plan_videos,
    write_frame_labels,
)

logger = logging.getLogger(__name__)

REVIEW_VIEW_DESCRIPTION = "xmem-label review frames:"  # marks the saved views it may replace
LONG_JOB_FRAMES = 2000  # more frames than this: delegated execution is offered first
PROGRESS_INTERVAL_S = 1.0
PROPAGATING_OPERATORS = ("propagate_masks", "propagate_corrections")  # runs it reports on


def _frame_count(collection) -> int:
    """Frames in `collection` according to its metadata (0 when unknown)."""
    if collection is None or collection.media_type != "video":
        return 0
    return int(collection.sum("metadata.total_frame_count") or 0)


def _samples_per_run(params: dict) -> int:
    try:
        return int(params.get("samples_per_run") or 0)
    except (TypeError, ValueError):
        raise InputError("samples per run must be a whole number") from None


def check_params(ctx) -> dict[str, str]:
    """Parameter name -> what is wrong with it, for everything that can be checked without
    opening a video (cheap enough for every change of the App form)."""
    params = ctx.params
    target = ctx.target_view()
    # the form's defaults, as the App fills them in, so a fresh form shows no error
    default_prompt = next(iter(keyframe_candidates(target)), "")
    prompt_field = frame_field_name(params.get("prompt_field") or default_prompt)
    label_field = frame_field_name(params.get("label_field") or default_output_field(target))
    checks = [
        ("prompt_field", lambda: check_keyframe_field(target, prompt_field, True)),
        (
            "output_as_keyframes",
            lambda: check_keyframe_field(
                target, prompt_field, bool(params.get("output_as_keyframes"))
            ),
        ),
        ("label_field", lambda: check_output_field(target, label_field, prompt_field)),
        ("samples_per_run", lambda: _check_samples_per_run(params)),
    ]
    for name, check in checks:  # the first problem only: later checks build on earlier ones
        try:
            check()
        except InputError as error:
            return {name: str(error)}
    return {}


def _requested_by_the_app(ctx) -> bool:
    """Whether the App (or anything else posting to the App server's operator endpoints, which
    require the operator's URI in the request) asked, rather than `foo.execute_operator`."""
    return "operator_uri" in ctx.request_params


def _check_samples_per_run(params: dict) -> None:
    if _samples_per_run(params) < 0:
        raise InputError("samples per run must be 0 (one run) or more")


class PropagateMasks(foo.Operator):
    """Keyframe masks in `frames.<prompt field>` -> masks on every frame in
    `frames.<output field>`, computed from scratch and written on every frame."""

    INCREMENTAL = False  # see PropagateCorrections

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
        fields = prompt_fields(ctx.dataset)
        if not fields:
            inputs.view(
                "no_prompts",
                types.Warning(
                    label="Needs a video dataset with a Detections or Segmentation frame field"
                ),
            )
            return types.Property(inputs, view=types.View(label=self.config.label))
        # In a worker the parameters were checked when the run was queued; what changed since
        # is found by execute, which records a one-line reason on the failed operation.
        problems = {} if ctx.delegated else check_params(ctx)

        def invalid(name: str) -> dict:
            return {"invalid": True, "error_message": problems[name]} if name in problems else {}

        candidates = keyframe_candidates(ctx.dataset)
        choices = types.Dropdown(label="Keyframe field")
        for field in fields:
            note = " (an xmem-label output)" if is_output(ctx.dataset, field) else ""
            choices.add_choice(field, label=f"frames.{field}{note}")
        # A string, not an enum: a field that is not there gets the operator's own message.
        inputs.str(
            "prompt_field",
            required=True,
            default=candidates[0] if candidates else None,
            view=choices,
            **invalid("prompt_field"),
        )
        prompt_field = frame_field_name(ctx.params.get("prompt_field"))
        if prompt_field and is_output(ctx.dataset, prompt_field):
            inputs.bool(
                "output_as_keyframes",
                default=False,
                label=f"Use the output frames.{prompt_field} as keyframes",
                description="Every frame it holds becomes a keyframe, kept as it is",
                **invalid("output_as_keyframes"),
            )
        inputs.str(
            "label_field",
            required=True,
            default=default_output_field(ctx.dataset),
            label="Output frame field",
            description="New, or an earlier xmem-label output (replaced on these samples)",
            **invalid("label_field"),
        )
        engines = types.RadioGroup(label="Engine")
        engines.add_choice("auto", label="auto (XMem if its weights are here, else flow)")
        for spec in registered_engines().values():
            engines.add_choice(spec.name, label=f"{spec.name}: {spec.description}")
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
        inputs.int(
            "samples_per_run",
            default=0,
            min=0,
            label="Samples per run (delegated)",
            description="Above 0: delegate, split into one run per this many samples, so "
            "several workers share the view (0 = one run)",
            **invalid("samples_per_run"),
        )
        return types.Property(inputs, view=types.View(label=self.config.label))

    def resolve_delegation(self, ctx) -> bool | None:
        try:
            split = _samples_per_run(ctx.params) > 0
        except InputError:  # refused by resolve_input's check before this is asked
            split = False
        return True if ctx.params.get("delegate") or split else None

    def resolve_execution_options(self, ctx) -> foo.ExecutionOptions:
        return foo.ExecutionOptions(
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            default_choice_to_delegated=_frame_count(ctx.target_view()) > LONG_JOB_FRAMES,
        )

    def resolve_run_name(self, ctx) -> str:
        prompt_field = frame_field_name(ctx.params.get("prompt_field"))
        label_field = frame_field_name(ctx.params.get("label_field"))
        part = ctx.params.get("part")
        name = f"{self.config.label}: frames.{prompt_field} -> frames.{label_field}"
        return f"{name} (part {part})" if part else name

    def execute(self, ctx):
        """Delegated: run, report progress (the heartbeat) on the operation, return the
        summary; a failure is recorded on the operation as a one-line reason.
        Immediate, from the App: a generator, so the App shows progress while it runs (it
        calls generator operators through a streaming request); it ends with a notification.
        Immediate, from Python: the summary (FiftyOne drops what a generator returns).
        Input is checked here, before anything runs, so bad input fails at once."""
        if ctx.delegated:
            return self._run_delegated(ctx)
        stale = runs.fail_stale_runs(ctx.dataset.name, self.uri)
        run = _PropagationRun(ctx, self.uri, self.INCREMENTAL)
        if _requested_by_the_app(ctx):
            return self._stream(ctx, _throttled(run.steps()), stale)
        return {**_drain(run.steps(), lambda progress: None), "stale_runs_failed": stale}

    def _run_delegated(self, ctx) -> dict | None:
        op_id = runs.operation_id(ctx)
        try:
            # the heartbeat covers every step, reading the keyframes of a large view included
            with runs.Heartbeat(ctx) as heartbeat:
                stale = runs.fail_stale_runs(ctx.dataset.name, self.uri)
                run = _PropagationRun(ctx, self.uri, self.INCREMENTAL)
                per_run = _samples_per_run(ctx.params)
                if 0 < per_run < len(run.jobs):
                    parts = self._queue_parts(ctx, run, per_run)
                    return {**run.empty_summary(), "runs": parts, "stale_runs_failed": stale}
                steps = run.steps(may_write=lambda: runs.is_still_running(op_id))
                stored = [0]

                def report(progress: Progress) -> None:
                    now, stored[0] = progress.stored > stored[0], progress.stored
                    heartbeat.update(progress.fraction, progress.label, now=now)

                summary = _drain(steps, report)
            return {**summary, "stale_runs_failed": stale}
        except XMemLabelError as error:
            runs.fail(op_id, str(error))
        except Exception as error:  # recorded, not raised: FiftyOne would store a traceback
            logger.exception("propagation run %s failed", op_id)
            runs.fail(op_id, f"{type(error).__name__}: {error}", traceback.format_exc())
        return None

    def _queue_parts(self, ctx, run: _PropagationRun, per_run: int) -> list[str]:
        """Queue one delegated run per `per_run` samples with keyframes; returns their ids.
        The output field is declared first, so every part finds it marked as xmem-label's."""
        declare_output(ctx.dataset, run.label_field, run.provenance())
        sample_ids = [job.sample_id for job in run.jobs]
        batches = [sample_ids[i : i + per_run] for i in range(0, len(sample_ids), per_run)]
        queued = []
        for number, batch in enumerate(batches, start=1):
            params = {
                **ctx.params,
                "delegate": True,
                "samples_per_run": 0,
                "view_target": "CURRENT_VIEW",
                "part": f"{number}/{len(batches)}",
            }
            result = foo.execute_operator(
                self.uri,
                ctx=dict(
                    view=ctx.dataset.select(batch, ordered=True),
                    request_delegation=True,
                    params=params,
                ),
            )
            queued.append(str(result.result["id"]))
        return queued

    @staticmethod
    def _stream(ctx, updates, stale: list[str]):
        stored = 0
        while True:
            try:
                progress = next(updates)
            except StopIteration as finished:
                summary = finished.value
                break
            yield ctx.ops.set_progress(label=progress.label, progress=progress.fraction)
            if progress.stored > stored:  # a first batch is in the database: show it
                stored = progress.stored
                yield ctx.ops.reload_dataset()
        yield ctx.ops.set_progress(label="done", progress=1.0)
        yield ctx.ops.reload_dataset()
        message = (
            f"xmem-label: {summary['frames']} frames of {summary['samples']} videos written to "
            f"{summary['label_field']}"
        )
        if stale:
            message += f"; marked failed (their worker died): {', '.join(stale)}"
        yield ctx.ops.notify(message, variant="success")

    def resolve_output(self, ctx) -> types.Property:
        outputs = types.Object()
        outputs.int("samples", label="Videos propagated")
        outputs.int("frames", label="Frames written")
        outputs.int("network_steps", label="Network steps (frames the engine computed)")
        outputs.int("skipped_samples", label="Videos without a keyframe (left alone)")
        outputs.str("label_field", label="Output field")
        outputs.str("engine", label="Engine")
        outputs.list("runs", types.String(), label="Delegated runs queued (one per part)")
        outputs.list("stale_runs_failed", types.String(), label="Dead runs marked failed")
        return types.Property(outputs)


class Progress(NamedTuple):
    """What a run reports as it goes: the fraction of its frames done, and how many frames it
    has stored so far ahead of its final write (its videos' first batches)."""

    fraction: float
    stored: int = 0

    @property
    def label(self) -> str:
        done = f"{self.fraction:.0%} of frames"
        return f"{done}, first {self.stored} stored" if self.stored else done


class _PropagationRun:
    """One run of "propagate masks" or "propagate corrections": its checked input, then
    `steps()`, which propagates every video and yields its `Progress` after every frame. A
    video with enough frames to write has its first batch written as soon as it exists
    (`first_batch.py`); every other label is written in one bulk call at the end. A run that
    fails puts the first batches' frames back as they were, so it leaves the labels as they
    were. `steps()` returns the summary.

    incremental: keep each video's passes in the plugin's cache (`cache.py`) and write only the
    frames a changed keyframe can change (`corrections.py`); otherwise compute from scratch
    and write every frame."""

    def __init__(self, ctx, operator_uri: str, incremental: bool = False):
        for message in check_params(ctx).values():
            raise InputError(message)
        target = ctx.target_view()
        self.prompt_field = frame_field_name(ctx.params.get("prompt_field"))
        self.label_field = frame_field_name(
            ctx.params.get("label_field") or default_output_field(target)
        )
        self.operator_uri = operator_uri
        self.incremental = incremental
        self.dataset = ctx.dataset
        self.jobs, self.skipped = plan_videos(target, self.prompt_field)
        self.engine = choose_engine(
            ctx.params.get("engine") or "auto",
            ctx.params.get("checkpoint") or None,
            ctx.params.get("device") or None,
        )
        self.op_id = runs.operation_id(ctx)

    def provenance(self) -> dict:
        return {
            "operator": self.operator_uri,
            "prompt_field": f"frames.{self.prompt_field}",
            "engine": self.engine.describe().as_dict(),
            "run": str(self.op_id) if self.op_id else "immediate",
        }

    def empty_summary(self) -> dict:
        return {
            "samples": 0,
            "frames": 0,
            "network_steps": 0,
            "skipped_samples": len(self.skipped),
            "label_field": f"frames.{self.label_field}",
            "engine": self.engine.describe().engine,
        }

    def steps(self, may_write=lambda: True) -> Generator[Progress, None, dict]:
        """may_write() is asked before the first write and once more before the final one;
        False (the run was marked failed meanwhile) stops the run, its first batches put
        back as they were."""
        early = EarlyFrames(self.dataset, self.label_field)
        try:
            return (yield from self._steps(may_write, early))
        except BaseException:  # a failure, or the consumer closing the run (GeneratorExit)
            early.restore()
            raise

    def _steps(self, may_write, early: EarlyFrames) -> Generator[Progress, None, dict]:
        total = max(sum(job.num_frames for job in self.jobs), 1)
        recorded = {}
        if self.incremental:
            sample_ids = [job.sample_id for job in self.jobs]
            recorded = recorded_digests(self.dataset.select(sample_ids), self.label_field)
        root = cache.cache_root()
        finished, network_steps, written = 0, 0, 0
        labels = {}
        for job in self.jobs:
            previous = recorded.get(job.sample_id, {})
            digests = keyframe_digests(job, self.engine)
            wanted = frames_to_write(previous, digests, job.num_frames)
            if not wanted:  # no keyframe changed since the last run
                finished += job.num_frames
                continue
            batch = first_batch(wanted)
            engine_done = [0.0, 0]  # the engine's own progress, backward pass included

            def note(done: int, steps: int, engine_done=engine_done) -> None:
                engine_done[0], engine_done[1] = done / max(steps, 1), done

            folder = None
            if self.incremental:
                folder = cache.sample_folder(root, job.sample_id, job.filepath, self.label_field)
            frames = {}
            with cache.in_use(folder) if folder else contextlib.nullcontext():
                for frame_number, detections in iter_video_labels(
                    job, self.engine, note, cache_dir=folder, only=set(wanted)
                ):
                    if frame_number in digests:
                        detections[DIGEST_ATTRIBUTE] = digests[frame_number]
                    frames[frame_number] = detections
                    if batch and len(frames) == len(batch):  # frames come in order
                        self._store_first_batch(job, frames, digests, previous, may_write, early)
                    yield Progress(
                        (finished + job.num_frames * engine_done[0]) / total, early.count
                    )
            if batch:  # written already, but with the digests of the last complete run
                frames = {
                    n: d
                    for n, d in frames.items()
                    if n not in batch or digests.get(n) != previous.get(n)
                }
            labels[job.sample_id] = frames
            finished += job.num_frames
            network_steps += engine_done[1]
            written += len(wanted)
        if not may_write():
            raise InputError(
                "this run was marked failed while it worked (no heartbeat); nothing written"
            )
        if not early.count:
            self._declare()
        write_frame_labels(self.dataset, self.label_field, labels)
        if self.incremental:
            cache.evict(root, cache.cache_cap_bytes())
        return {
            **self.empty_summary(),
            "samples": len(labels),
            "frames": written,
            "network_steps": network_steps,
        }

    def _declare(self) -> None:
        """Check the output field once more and declare it, before the run's first write."""
        _refresh(self.dataset)  # another run may have made the field since the check
        check_output_field(self.dataset, self.label_field, self.prompt_field)
        declare_output(self.dataset, self.label_field, self.provenance())

    def _store_first_batch(
        self,
        job: VideoJob,
        frames: dict[int, fo.Detections],
        digests: dict[int, str],
        previous: dict[int, str],
        may_write,
        early: EarlyFrames,
    ) -> None:
        """Write a video's first batch now. Its frames carry the keyframe digests the last
        complete run recorded there, not this run's (`corrections.py`): a run killed before
        its final write leaves the recorded digests as they were, so the next run rewrites the
        same frames, these included. The final write gives them this run's digests."""
        if not may_write():
            raise InputError(
                "this run was marked failed while it worked (no heartbeat); nothing written"
            )
        if not early.count:
            self._declare()
        marked = [number for number in frames if number in digests or number in previous]
        for number in marked:
            frames[number][DIGEST_ATTRIBUTE] = previous.get(number)
        try:
            early.write(job.sample_id, frames)
        finally:
            for number in marked:
                frames[number][DIGEST_ATTRIBUTE] = digests.get(number)


def _refresh(dataset: fo.Dataset) -> None:
    """Reload `dataset` when its document changed in the database since this process loaded
    it (FiftyOne stamps every change of a dataset document, its fields' included, with
    `last_modified_at`). A reload rebuilds the dataset's document classes, a few hundredths of
    a second per run; the stamp is one small database read."""
    stored = get_db_conn().datasets.find_one({"_id": dataset._doc.id}, {"last_modified_at": True})
    if stored is None or stored.get("last_modified_at") != dataset._doc.last_modified_at:
        dataset.reload()


class PropagateCorrections(PropagateMasks):
    """Propagate masks, for the annotation loop: after a curator fixed, added or removed
    keyframe labels, recompute only the segments around them (the engine's passes are kept
    per video in the plugin's cache) and write only the frames that can change. Frames
    outside them keep their label documents (and ids) untouched."""

    INCREMENTAL = True

    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="propagate_corrections",
            label="Propagate corrections",
            description="Re-propagate only the segments around changed keyframes and write only "
            "the frames they change (xmem-label)",
            dynamic=True,
            execute_as_generator=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )


def _throttled(steps: Generator[Progress, None, dict]) -> Generator[Progress, None, dict]:
    """Pass on at most one progress update per PROGRESS_INTERVAL_S (delegated runs store each
    one in the database), and at once the one saying frames were stored; returns what `steps`
    returns."""
    last, stored = float("-inf"), 0
    while True:
        try:
            progress = next(steps)
        except StopIteration as finished:
            return finished.value
        if time.monotonic() - last >= PROGRESS_INTERVAL_S or progress.stored > stored:
            last, stored = time.monotonic(), progress.stored
            yield progress._replace(fraction=min(progress.fraction, 1.0))


def _drain(updates: Generator[Progress, None, dict], report) -> dict:
    """Run `updates` to the end, calling report(progress) for each; returns its result."""
    while True:
        try:
            report(next(updates))
        except StopIteration as finished:
            return finished.value


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
        fields = prompt_fields(ctx.dataset)
        choices = types.Dropdown(label="Propagated field")
        for field in fields:
            choices.add_choice(field, label=f"frames.{field}")
        outputs = [field for field in fields if is_output(ctx.dataset, field)]
        default = outputs[0] if outputs else None
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
        target = ctx.target_view()
        schema = target.get_frame_field_schema() if target.media_type == "video" else {}
        if getattr(schema.get(label_field), "document_type", None) is not fo.Detections:
            raise InputError(f"frames.{label_field} is not a propagated Detections field")
        if action == "view" and name in ctx.dataset.list_saved_views():
            description = ctx.dataset.get_saved_view_info(name).get("description") or ""
            if not description.startswith(REVIEW_VIEW_DESCRIPTION):
                raise InputError(
                    f"a saved view {name!r} exists and was not made by review frames; "
                    "choose another name"
                )
        chosen = least_confident_frames(target, label_field, k)
        frame_ids = [frame_id for frames in chosen.values() for frame_id, _ in frames]
        if action == "view":
            ctx.dataset.save_view(
                name,
                ctx.dataset.select_frames(frame_ids),
                description=f"{REVIEW_VIEW_DESCRIPTION} the {k} least confident frames of "
                f"each video in frames.{label_field}",
                overwrite=True,  # only a view this operator saved, checked above
            )
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


class PropagationStatus(foo.Operator):
    """The dataset's delegated propagation runs and their state. A running one whose worker
    stopped reporting is marked failed here (FiftyOne never does), with how to re-run it."""

    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="propagation_status",
            label="Propagation status",
            description="List xmem-label's delegated runs; mark those whose worker died failed",
        )

    def resolve_input(self, ctx) -> types.Property:
        inputs = types.Object()
        inputs.float(
            "stale_after_s",
            default=runs.STALE_AFTER_S,
            min=1,
            label="Dead after (seconds without a heartbeat)",
        )
        return types.Property(inputs, view=types.View(label="Propagation status"))

    def execute(self, ctx) -> dict:
        stale_after_s = float(ctx.params.get("stale_after_s") or runs.STALE_AFTER_S)
        uris = [f"{self.plugin_name}/{name}" for name in PROPAGATING_OPERATORS]
        marked = [
            m for uri in uris for m in runs.fail_stale_runs(ctx.dataset.name, uri, stale_after_s)
        ]
        described = [line for uri in uris for line in runs.describe_runs(ctx.dataset.name, uri)]
        return {"runs": described, "marked_failed": marked}

    def resolve_output(self, ctx) -> types.Property:
        outputs = types.Object()
        outputs.list("runs", types.String(), label="Runs (id, state, progress, name, reason)")
        outputs.list("marked_failed", types.String(), label="Marked failed now (worker died)")
        return types.Property(outputs)
