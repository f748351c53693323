"""Frame fields as the plugin sees them: which can be keyframes, which are its own outputs,
and the attributes it declares on them.

An output field carries a marker in its field-level `info` (`info["xmem_label"]`: the
provenance of the run that last wrote it). The marker is how the App form keeps outputs out
of the keyframe choice (taking one as keyframes needs an explicit confirmation), and how a run
knows it may replace a field: it never replaces one that xmem-label did not write.
"""

from __future__ import annotations

import datetime

import fiftyone as fo

from xmem_label.model import InputError

from .videos import PROMPT_TYPES, check_prompt_field

MARKER = "xmem_label"
DEFAULT_OUTPUT_FIELD = "xmem"

# Attributes the plugin writes beyond FiftyOne's own Detection fields, declared so the App
# can filter on them.
DECLARED_ATTRIBUTES = {
    "min_confidence": (fo.FloatField, {}),
    "keyframe_digest": (fo.StringField, {}),
    "detections.keyframe": (fo.BooleanField, {}),
    "detections.source": (fo.StringField, {}),
    "detections.keyframes": (fo.ListField, {"subfield": fo.IntField}),
}


def prompt_fields(collection) -> list[str]:
    """Frame fields that can hold keyframes (Detections or Segmentation), by name."""
    if collection is None or collection.media_type != "video":
        return []
    return sorted(collection.get_frame_field_schema(embedded_doc_type=PROMPT_TYPES))


def output_provenance(collection, field: str) -> dict | None:
    """The marker of `frames.<field>` if xmem-label wrote it, else None."""
    if collection is None or collection.media_type != "video":
        return None
    schema_field = collection.get_frame_field_schema().get(field)
    info = getattr(schema_field, "info", None) or {}
    return info.get(MARKER)


def is_output(collection, field: str) -> bool:
    return output_provenance(collection, field) is not None


def keyframe_candidates(collection) -> list[str]:
    """Keyframe fields the form offers first: those that are not xmem-label outputs."""
    return [field for field in prompt_fields(collection) if not is_output(collection, field)]


def default_output_field(collection) -> str:
    """`xmem`, or `xmem_2`, `xmem_3`, ... when `xmem` is a field xmem-label did not write."""
    if collection is None or collection.media_type != "video":
        return DEFAULT_OUTPUT_FIELD
    schema = collection.get_frame_field_schema()
    name, number = DEFAULT_OUTPUT_FIELD, 1
    while name in schema and not is_output(collection, name):
        number += 1
        name = f"{DEFAULT_OUTPUT_FIELD}_{number}"
    return name


def check_keyframe_field(collection, prompt_field: str, output_as_keyframes: bool) -> None:
    """Raise InputError unless `frames.<prompt_field>` can be the keyframes: a Detections or
    Segmentation field, and not an xmem-label output unless the user confirmed it."""
    check_prompt_field(collection, prompt_field)
    if is_output(collection, prompt_field) and not output_as_keyframes:
        raise InputError(
            f"frames.{prompt_field} was written by xmem-label: every propagated frame would be "
            "a keyframe; confirm (output_as_keyframes) to use it as keyframes anyway"
        )


def check_output_field(collection, label_field: str, prompt_field: str) -> None:
    """Raise InputError unless the run may write `frames.<label_field>`: a new field, or one
    xmem-label wrote before (it replaces that one on the samples it covers)."""
    if label_field == prompt_field:
        raise InputError("the output field must differ from the keyframe field")
    if not label_field.isidentifier():
        raise InputError(f"output field {label_field!r} is not a plain field name")
    existing = collection.get_frame_field_schema().get(label_field)
    if existing is None:
        return
    if getattr(existing, "document_type", None) is not fo.Detections:
        raise InputError(
            f"frames.{label_field} already holds something other than Detections; "
            "choose another output field"
        )
    if not is_output(collection, label_field):
        raise InputError(
            f"frames.{label_field} was not written by xmem-label and is never replaced; "
            "choose another output field"
        )


def declare_output(dataset: fo.Dataset, label_field: str, provenance: dict) -> None:
    """Declare `frames.<label_field>` and the attributes the plugin writes on it (so the App
    can filter them), and record the run's provenance in the field's info: the output marker.
    Idempotent, so runs on several workers may all call it."""
    dataset.add_frame_field(label_field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    for attribute, (field_type, options) in DECLARED_ATTRIBUTES.items():
        dataset.add_frame_field(f"{label_field}.{attribute}", field_type, **options)
    field = dataset.get_field(f"frames.{label_field}")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    field.info = {**(field.info or {}), MARKER: {**provenance, "written_at": stamp}}
    field.save()
