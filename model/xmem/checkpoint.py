"""Reading an XMem checkpoint and building the network from it, with one-line refusals.

Checkpoints are plain `state_dict()` files as the official training code saves them. The
network's widths are read from the weights the way the official loader does, and a
single-object checkpoint (no "other objects" mask channel) is adapted by giving that channel
zero weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import WeightsError
from .network import XMemNetwork

VALUE_CONV1 = "value_encoder.conv1.weight"
HIDDEN_TRANSFORM = "decoder.hidden_update.transform.weight"
_SHOWN_PER_KIND = 3  # differences named per kind in a refusal message


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file on the CPU without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"XMem weights not found: {path}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file can fail anywhere inside the unpickler
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(f"cannot read XMem weights {path}: {reason[:200]}") from None
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise WeightsError(f"{path} is not an XMem state dict (found {type(state_dict).__name__})")
    bad = [key for key, value in state_dict.items() if not isinstance(value, Tensor)]
    if bad:
        raise WeightsError(f"{path} is not an XMem state dict: entry {bad[0]!r} is not a tensor")
    return dict(state_dict)


def _dims(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """key/value/hidden widths as the official loader reads them (defaults if a key is missing)."""
    dims = {"key_dim": 64, "value_dim": 512, "hidden_dim": 64}
    sources = {
        "key_dim": ("key_proj.key_proj.weight", 1),
        "value_dim": ("value_encoder.fuser.block2.conv2.weight", 1),
        "hidden_dim": (HIDDEN_TRANSFORM, 3),
    }
    for name, (key, divisor) in sources.items():
        tensor = state_dict.get(key)
        if isinstance(tensor, Tensor) and tensor.ndim >= 1 and tensor.shape[0] % divisor == 0:
            dims[name] = tensor.shape[0] // divisor
    return dims


def _with_others_channel(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Single-object checkpoints see [RGB, mask]; give the "other objects" channel zero weights."""
    conv1 = state_dict.get(VALUE_CONV1)
    if conv1 is None or conv1.ndim != 4 or conv1.shape[1] != 4:
        return state_dict
    zeros = torch.zeros_like(conv1[:, :1])
    return {**state_dict, VALUE_CONV1: torch.cat([conv1, zeros], dim=1)}


def _differences(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    mismatched = [
        f"{key} {tuple(given[key].shape)} instead of {tuple(expected[key].shape)}"
        for key in expected
        if key in given and given[key].shape != expected[key].shape
    ]
    parts = []
    for kind, items in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)):
        if items:
            shown = ", ".join(items[:_SHOWN_PER_KIND])
            more = (
                f" (+{len(items) - _SHOWN_PER_KIND} more)" if len(items) > _SHOWN_PER_KIND else ""
            )
            parts.append(f"{kind} {len(items)}: {shown}{more}")
    return parts


def build_network(state_dict: Mapping[str, Tensor]) -> XMemNetwork:
    """An `XMemNetwork` holding these weights, in eval mode, without gradients.

    Raises WeightsError naming the first differences if the weights do not fit the network.
    """
    state_dict = _with_others_channel(dict(state_dict))
    if HIDDEN_TRANSFORM not in state_dict and "decoder.pred.weight" in state_dict:
        raise WeightsError(
            "XMem weights without sensory memory (e.g. XMem-no-sensory.pth) are not supported"
        )
    network = XMemNetwork(**_dims(state_dict))
    problems = _differences(network.state_dict(), state_dict)
    if problems:
        raise WeightsError("weights do not fit the XMem network: " + "; ".join(problems))
    not_finite = [key for key, value in state_dict.items() if not torch.isfinite(value).all()]
    if not_finite:
        raise WeightsError(
            f"weights hold NaN or infinite values (first in {not_finite[0]!r}): the file is "
            "damaged or from a diverged training run"
        )
    network.load_state_dict(state_dict, strict=True)
    network.eval()
    network.requires_grad_(False)
    return network
