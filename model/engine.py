"""What every propagation engine provides, and how one is chosen by name.

An `Engine` holds what is expensive and shared (network weights, device); a `Tracker` is one
pass over a clip in one direction and holds the memory of that pass. The session
(`session.py`) drives trackers and knows nothing of how an engine computes its masks.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from .errors import InputError

# Engine name -> "module:function" returning an Engine; imported only when chosen.
ENGINES = {
    "xmem": "xmem_label.model.xmem.engine:load_xmem_engine",
    "flow": "xmem_label.model.flow.engine:load_flow_engine",
}


class Tracker(Protocol):
    """One propagation pass: frames arrive one at a time, in the pass's order."""

    object_ids: list[int]
    """Object ids known to this pass, in the order of the probability channels 1..K."""

    def step(
        self,
        frame: np.ndarray,
        prompt: Mapping[int, np.ndarray] | None = None,
        *,
        last: bool = False,
    ) -> torch.Tensor:
        """Process the next frame and return its probabilities.

        frame: (H, W, 3) uint8 RGB. prompt: object id -> (H, W) bool mask given by a person on
        this frame; an all-False mask declares the object absent here. Objects not in `prompt`
        keep being propagated. last: no later frame follows in this pass (XMem then skips the
        memory write, like the official evaluation).
        Returns (1 + len(object_ids), H, W) float32, background first, on any device; the
        channels of prompted objects equal their prompt masks.
        """
        ...


class Engine(Protocol):
    """A loaded engine; `new_tracker` starts an independent pass."""

    name: str

    def describe(self) -> dict[str, Any]:
        """Engine name, weights (path and sha256) and settings, for summaries and model_version."""
        ...

    def new_tracker(self, num_frames: int | None) -> Tracker:
        """A fresh pass over a clip of `num_frames` frames (None when unknown)."""
        ...


def load_engine(name: str = "xmem", **options: Any) -> Engine:
    """Load engine `name` ("xmem" or "flow"); options go to that engine's loader
    (for XMem: weights, device, precision and any memory setting)."""
    if name not in ENGINES:
        raise InputError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")
    module_name, function_name = ENGINES[name].split(":")
    loader = getattr(importlib.import_module(module_name), function_name)
    return loader(**options)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given (it must exist on this machine), else CUDA when present, else MPS,
    else CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if chosen.type not in DEVICE_TYPES:
        raise InputError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {device!r}: this machine or torch build has no CUDA device")
        if chosen.index is not None and chosen.index >= count:
            raise InputError(
                f"device {device!r}: there are {count} CUDA devices (cuda:0..cuda:{count - 1})"
            )
    if chosen.type == "mps" and not _mps_available():
        raise InputError(f"device {device!r}: MPS (Apple GPU) is not available here")
    if chosen.type == "cpu" and chosen.index not in (None, 0):
        raise InputError(f"device {device!r}: the CPU device has no index; use cpu")
    return chosen


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()
