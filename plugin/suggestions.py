"""The "suggest frames to review" operator: the engine's suggestions, where a curator sees them.

For every video it runs the engine's session on the keyframes of the propagated output (from
the plugin's pass cache, so no network step runs when "propagate corrections" ran last) and
asks it for the frames to check next (`Session.suggest`: spread over the clip, with reasons).
They go into a frame-level `fo.Classification` field (label: the reasons; `rank`, 1 first per
video; `reasons`; `confidence`: the engine's review score), and into a saved frames view sorted
by rank, in which the App steps from one suggested frame to the next (frames are shown from
the video itself: nothing is extracted to disk). Only a field and a view this operator made
are ever replaced.
"""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F

from xmem_label.model import InputError

from . import cache
from .corrections import keyframe_digests, recorded_digests
from .fields import MARKER, output_provenance, prompt_fields
from .videos import choose_engine, frame_field_name, plan_videos, suggest_video

VIEW_DESCRIPTION = "xmem-label suggested frames:"  # marks the saved views it may replace


def review_field_name(label_field: str) -> str:
    return f"{label_field}_review"


def check_review_field(collection, review_field: str) -> None:
    """Raise InputError unless `frames.<review_field>` is new or was written by this operator."""
    if not review_field.isidentifier():
        raise InputError(f"review field {review_field!r} is not a plain field name")
    existing = collection.get_frame_field_schema().get(review_field)
    if existing is None:
        return
    info = getattr(existing, "info", None) or {}
    if (info.get(MARKER) or {}).get("suggestions") is not True:
        raise InputError(
            f"frames.{review_field} was not written by suggest frames and is never replaced; "
            "choose another review field"
        )


def check_view_name(dataset: fo.Dataset, name: str) -> None:
    if name in dataset.list_saved_views():
        description = dataset.get_saved_view_info(name).get("description") or ""
        if not description.startswith(VIEW_DESCRIPTION):
            raise InputError(
                f"a saved view {name!r} exists and was not made by suggest frames; "
                "choose another name"
            )


class SuggestFrames(foo.Operator):
    """Write the engine's suggested frames (rank and reasons) and a saved view of them."""

    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="suggest_frames",
            label="Suggest frames to review",
            description="The frames to check next in each video, with the engine's reasons "
            "(xmem-label)",
            dynamic=True,
        )

    def resolve_input(self, ctx) -> types.Property:
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Suggest in")
        outputs = [f for f in prompt_fields(ctx.dataset) if output_provenance(ctx.dataset, f)]
        choices = types.Dropdown(label="Propagated field")
        for field in outputs:
            choices.add_choice(field, label=f"frames.{field}")
        inputs.str(
            "label_field", required=True, default=outputs[0] if outputs else None, view=choices
        )
        inputs.int("count", default=5, min=1, label="Frames per video")
        inputs.str("review_field", label="Review frame field (default: <field>_review)")
        inputs.str("view_name", label="Saved view (default: <field> review)")
        return types.Property(inputs, view=types.View(label=self.config.label))

    def execute(self, ctx) -> dict:
        label_field = frame_field_name(ctx.params.get("label_field"))
        provenance = output_provenance(ctx.dataset, label_field)
        if provenance is None:
            raise InputError(
                f"frames.{label_field} is not an xmem-label output: propagate masks first"
            )
        try:
            count = int(ctx.params.get("count") or 5)
        except (TypeError, ValueError):
            raise InputError("frames per video must be a whole number") from None
        if count < 1:
            raise InputError("frames per video must be 1 or more")
        review_field = frame_field_name(
            ctx.params.get("review_field") or review_field_name(label_field)
        )
        view_name = (ctx.params.get("view_name") or f"{label_field} review").strip()
        check_review_field(ctx.dataset, review_field)
        check_view_name(ctx.dataset, view_name)
        described = provenance["engine"]
        engine = choose_engine(described["engine"], described.get("weights"))
        jobs, _ = plan_videos(ctx.target_view(), provenance["prompt_field"])
        sample_ids = [job.sample_id for job in jobs]
        recorded = recorded_digests(ctx.dataset.select(sample_ids), label_field)
        for job in jobs:
            if recorded.get(job.sample_id) != keyframe_digests(job, engine):
                raise InputError(
                    f"the keyframes of {job.filepath} changed since frames.{label_field} was "
                    "written: run propagate corrections first"
                )
        root = cache.cache_root()
        values: dict[str, dict[int, fo.Classification | None]] = {}
        for job in jobs:
            folder = cache.sample_folder(root, job.sample_id, job.filepath, label_field)
            with cache.in_use(folder):
                suggestions = suggest_video(job, engine, count, folder)
            values[job.sample_id] = {
                suggestion.index + 1: fo.Classification(
                    label=f"#{rank}: {'; '.join(suggestion.reasons) or 'review'}",
                    confidence=float(suggestion.score),
                    rank=rank,
                    reasons=list(suggestion.reasons),
                )
                for rank, suggestion in enumerate(suggestions, start=1)
            }
        cache.evict(root, cache.cache_cap_bytes())
        _write(ctx.dataset, review_field, label_field, values)
        view = (
            ctx.dataset.select(sample_ids)
            .to_frames(sample_frames="dynamic")
            .match(F(review_field) != None)  # noqa: E711  (a MongoDB expression)
            .sort_by(F(f"{review_field}.rank"))
        )
        ctx.dataset.save_view(
            view_name,
            view,
            description=f"{VIEW_DESCRIPTION} frames.{review_field}, by rank",
            overwrite=True,  # only a view this operator saved, checked above
        )
        if not ctx.delegated:
            ctx.trigger("reload_dataset")
        return {
            "frames": sum(len(frames) for frames in values.values()),
            "samples": len(values),
            "review_field": f"frames.{review_field}",
            "view": view_name,
        }

    def resolve_output(self, ctx) -> types.Property:
        outputs = types.Object()
        outputs.int("frames", label="Frames suggested")
        outputs.int("samples", label="Videos")
        outputs.str("review_field", label="Review field")
        outputs.str("view", label="Saved view (sorted by rank)")
        return types.Property(outputs)


def _write(
    dataset: fo.Dataset,
    review_field: str,
    label_field: str,
    values: dict[str, dict[int, fo.Classification | None]],
) -> None:
    """Declare the review field (marked as this operator's), clear the earlier suggestions of
    these videos and write the new ones, in one bulk call."""
    dataset.add_frame_field(
        review_field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification
    )
    dataset.add_frame_field(f"{review_field}.rank", fo.IntField)
    dataset.add_frame_field(f"{review_field}.reasons", fo.ListField, subfield=fo.StringField)
    field = dataset.get_field(f"frames.{review_field}")
    field.info = {
        **(field.info or {}),
        MARKER: {"suggestions": True, "from": f"frames.{label_field}"},
    }
    field.save()
    earlier = dataset.select(list(values)).values(
        ["id", "frames.frame_number", f"frames.{review_field}.rank"]
    )
    for sample_id, numbers, ranks in zip(*earlier, strict=True):
        for number, rank in zip(numbers or [], ranks or [], strict=True):
            if rank is not None:
                values[sample_id].setdefault(number, None)
    dataset.set_values(f"frames.{review_field}", values, key_field="id")
