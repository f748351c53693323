"""FiftyOne zoo model source for xmem-label's prompted video model.

Copy this folder to `$FIFTYONE_MODEL_ZOO_DIR/xmem-label` (the folder name must be
the manifest's "name"), then:

    model = foz.load_zoo_model("xmem-label-video", engine="flow")
    dataset.apply_model(model, label_field="xmem", prompt_field="frames.gt")

FiftyOne imports this file by path, so the model comes from the installed package.
"""

import json
import os

from xmem_label.plugin.model import XMemLabelVideoModel


def download_model(model_name: str, model_path: str) -> None:
    """Nothing to download: the engine ships with the package and XMem fetches its own weights.
    FiftyOne counts a model as downloaded when `model_path` exists, so a note is written there."""
    os.makedirs(os.path.dirname(model_path), exist_ok=True)
    with open(model_path, "w", encoding="utf-8") as f:
        json.dump({"model": model_name, "weights": "resolved by xmem-label"}, f)


def load_model(model_name: str, model_path: str, **kwargs) -> XMemLabelVideoModel:
    """kwargs: engine ("auto", "xmem", "flow"), checkpoint, device, prompt_field."""
    return XMemLabelVideoModel(**kwargs)
