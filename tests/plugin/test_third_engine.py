"""A toy engine in a package of its own (tests/conftest.py) works through the FiftyOne plugin
without any plugin file naming it: the operator's form offers it and the prompted Model runs
it through `apply_model`."""

from __future__ import annotations

import fiftyone as fo  # noqa: F401, I001  (conftest has set the environment)

from xmem_label.plugin.model import XMemLabelVideoModel

from .conftest import full_frame


def test_apply_model_with_the_toy_engine(toy_engine, dataset, chair_truth):
    model = XMemLabelVideoModel(engine="toy")
    assert model.engine.describe().engine == "toy"
    dataset.apply_model(model, label_field="toy", prompt_field="frames.gt")
    dataset.reload()
    sample = dataset.first()
    hw = chair_truth[0].shape
    first = chair_truth[0] == 1
    frames = [sample.frames[number]["toy"] for number in range(1, len(sample.frames) + 1)]
    assert len(frames) == len(chair_truth)
    assert all((full_frame(detections, hw) == 1).sum() > 0.9 * first.sum() for detections in frames)
