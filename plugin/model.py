"""A prompted video `Model` for `dataset.apply_model`:

    model = XMemLabelVideoModel(engine="flow")
    dataset.apply_model(model, label_field="xmem", prompt_field="frames.gt")

`apply_model` hands each video sample to `predict` with the prompt field loaded; the model
reads the keyframes from it, propagates, and returns {frame number: fo.Detections}, which
FiftyOne writes into `frames.<label_field>` (give `label_field` without the `frames.` prefix).
The labels are the same as those of the "propagate masks" operator.
"""

from __future__ import annotations

import inspect

import fiftyone as fo
import fiftyone.core.models as fom

from xmem_label.model import InputError

from .fields import check_output_field, declare_output
from .videos import choose_engine, frame_field_name, plan_video, propagate_video


def apply_model_label_field() -> str | None:
    """The `label_field` of the `apply_model` call running this model, or None outside one.

    FiftyOne does not tell a model where its labels go; it writes them after `predict`
    returns, so a wrong field (`frames.x` for a video model) would only fail after the whole
    clip ran, as a warning. It is read from FiftyOne's video loop
    (`fiftyone.core.models._apply_video_model`, FiftyOne 1.22) so it is checked first.
    """
    frame = inspect.currentframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_apply_video_model" and frame.f_globals.get("__name__") == (
            "fiftyone.core.models"
        ):
            return frame.f_locals.get("label_field")
        frame = frame.f_back
    return None


class XMemLabelVideoModel(fom.SamplesMixin, fom.Model):
    """Keyframe masks (or boxes) in the sample's prompt field -> masks on every frame.

    engine: "auto" (XMem when its weights are on this machine, else flow), "xmem" or "flow".
    checkpoint, device: for XMem. prompt_field: the default when apply_model gets none.
    """

    def __init__(
        self,
        engine: str = "auto",
        checkpoint: str | None = None,
        device: str | None = None,
        prompt_field: str | None = None,
    ):
        fom.SamplesMixin.__init__(self)
        self.engine = choose_engine(engine, checkpoint, device)
        self.default_prompt_field = prompt_field

    @property
    def media_type(self) -> str:
        return "video"

    @property
    def ragged_batches(self) -> bool:
        return False

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self) -> bool:
        return False

    @preprocess.setter
    def preprocess(self, value: bool) -> None:
        pass

    def prompt_field(self) -> str:
        """The frame field holding the keyframes, without its `frames.` prefix."""
        field = self.needs_fields.get("prompt_field") or self.default_prompt_field
        if not field:
            raise InputError("give the keyframe field: apply_model(..., prompt_field='frames.gt')")
        return frame_field_name(field)

    def predict(self, video_reader, sample: fo.Sample | None = None):
        """Labels for every frame of `sample`, or None when it has no keyframe (apply_model
        then leaves it alone). The engine decodes `sample.filepath` itself; `video_reader` is
        unused so both ways of running give identical frames."""
        if sample is None:
            raise InputError("XMemLabelVideoModel needs the sample: use dataset.apply_model")
        field = self.prompt_field()
        dataset = sample.dataset
        label_field = apply_model_label_field()
        if label_field is not None and label_field.startswith("frames."):
            raise InputError(
                f"label_field={label_field!r}: give video models the frame field without its "
                f"'frames.' prefix (label_field={frame_field_name(label_field)!r})"
            )
        mask_targets = None
        if dataset is not None:
            mask_targets = dataset.mask_targets.get(f"frames.{field}") or (
                dataset.default_mask_targets
            )
        job = plan_video(sample, field, mask_targets)
        if job is None:
            return None
        if dataset is not None and label_field is not None:
            check_output_field(dataset, label_field, field)
        labels = propagate_video(job, self.engine)
        if dataset is not None and label_field is not None:
            provenance = {
                "operator": "XMemLabelVideoModel (apply_model)",
                "prompt_field": f"frames.{field}",
                "engine": self.engine.describe().as_dict(),
                "run": "apply_model",
            }
            declare_output(dataset, label_field, provenance)
        return labels
