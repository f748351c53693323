"""What every propagation engine provides, and how one is chosen by name.

An `Engine` holds what is expensive and shared (network weights, device); a `Tracker` is one
pass over a clip in one direction and holds the memory of that pass. The session
(`session.py`) drives trackers and knows nothing of how an engine computes its masks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .errors import InputError, WeightsError


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


@dataclasses.dataclass(frozen=True)
class EngineDescription:
    """What computes the masks: the engine, its weights and settings (summary.json, the
    plugin's provenance, the backend's model version)."""

    engine: str
    settings: dict[str, Any]
    weights: str | None = None
    sha256: str | None = None
    device: str | None = None
    precision: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form; device and precision only for engines that have them."""
        described = dataclasses.asdict(self)
        return {
            key: value
            for key, value in described.items()
            if value is not None or key in ("weights", "sha256")
        }


class Engine(Protocol):
    """A loaded engine; `new_tracker` starts an independent pass."""

    name: str

    def describe(self) -> EngineDescription:
        """Engine name, weights (path and sha256) and settings, for summaries and model_version."""
        ...

    def new_tracker(self, num_frames: int | None) -> Tracker:
        """A fresh pass over a clip of `num_frames` frames (None when unknown)."""
        ...


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """An engine as the command line, the backend, the plugin and the demo see it.

    loader: "module:function" returning an Engine, imported only when the engine is used. Its
    keyword-only parameters are the engine's options (the CLI's flags and --set, the plugin's
    checkpoint and device). check: "module:function" taking the same options and refusing bad
    ones without loading anything; None when loading is cheap and is the check.
    find_weights: "module:function" of an engine that needs a checkpoint, called as
    `find_weights(weights, download=...)` with its `weights` option (a path, a name, or None for
    the default): returns the file to load, or raises WeightsError saying what is missing and
    where to put it. The checkpoint is found (and may be downloaded) before loading, and "auto"
    requires it to be on the machine already. None for an engine without weights.
    """

    name: str
    description: str  # a noun phrase: "weight-free flow engine (...)"
    loader: str
    check: str | None = None
    find_weights: str | None = None

    def load_function(self) -> Callable[..., Engine]:
        return _import(self.loader, self.name)

    def check_function(self) -> Callable[..., Any]:
        return _import(self.check, self.name) if self.check else self.load_function()

    def find_weights_function(self) -> Callable[..., Path]:
        """The engine's checkpoint finder (see `find_weights`); only for `needs_weights`."""
        if self.find_weights is None:
            raise ValueError(f"the {self.name} engine takes no weights")
        return _import(self.find_weights, self.name)

    def options(self) -> dict[str, Any]:
        """The loader's keyword-only options and their defaults."""
        parameters = inspect.signature(self.load_function()).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @property
    def takes_any_setting(self) -> bool:
        """Whether the loader also takes settings by keyword beyond its named options (XMem's
        memory settings, which its check validates)."""
        parameters = inspect.signature(self.load_function()).parameters.values()
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)

    @property
    def needs_weights(self) -> bool:
        return self.find_weights is not None

    def missing(self, weights: str | None = None) -> str | None:
        """Why the engine cannot run here without a download (None: it can)."""
        if not self.needs_weights:
            return None
        try:
            self.find_weights_function()(weights, download=False)
        except WeightsError as error:
            return str(error)
        return None


BUILT_IN_ENGINES = (
    EngineSpec(
        "xmem",
        "XMem engine (Cheng & Schwing, ECCV 2022) with an official checkpoint",
        "xmem_label.model.xmem.engine:load_xmem_engine",
        check="xmem_label.model.xmem.engine:check_xmem_options",
        find_weights="xmem_label.model.xmem.weights:resolve_weights",
    ),
    EngineSpec(
        "flow",
        "weight-free flow engine (optical flow and keyframe colours)",
        "xmem_label.model.flow.engine:load_flow_engine",
    ),
)
# Installed packages add engines here: `<name> = "package.module:SPEC"` naming an EngineSpec.
ENTRY_POINT_GROUP = "xmem_label.engines"


def registered_engines() -> dict[str, EngineSpec]:
    """Every engine by name: the built-in ones first (in the order "auto" tries them), then
    those installed packages register under the `xmem_label.engines` entry-point group.

    Reading the entry points takes milliseconds (every installed package's metadata), and the
    plugin asks on every run, so the answer is kept for the process as long as the places
    packages are found in are the same: `sys.path` and each entry's modification time, which
    moves when a package is installed or removed there (a package put on the path later, as
    tests/test_third_engine.py does, is seen at once)."""
    return dict(_registered_engines(_search_path_stamp()))


def _search_path_stamp() -> tuple[tuple[str, int | None], ...]:
    """`sys.path` with each entry's modification time (None: not there)."""
    stamp = []
    for entry in sys.path:
        try:
            modified: int | None = os.stat(entry or ".").st_mtime_ns
        except OSError:
            modified = None
        stamp.append((entry, modified))
    return tuple(stamp)


@functools.lru_cache(maxsize=4)
def _registered_engines(stamp: tuple[tuple[str, int | None], ...]) -> dict[str, EngineSpec]:
    """`registered_engines` for one search path `stamp` (the key only; not read here)."""
    engines = {spec.name: spec for spec in BUILT_IN_ENGINES}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = entry.load()
        except Exception as error:  # another package's broken engine must not break ours
            warnings.warn(
                f"engine {entry.name!r} ({entry.value}) did not load: {error}", stacklevel=3
            )
            continue
        if isinstance(spec, EngineSpec) and spec.name not in engines:
            engines[spec.name] = spec
    return engines


def engine_spec(name: str) -> EngineSpec:
    engines = registered_engines()
    if name not in engines:
        raise InputError(f"unknown engine {name!r}; choose one of: {', '.join(engines)}")
    return engines[name]


def auto_engine(weights: str | None = None) -> tuple[EngineSpec, list[str]]:
    """The first registered engine that can run here without downloading anything, and why
    each one before it could not (what "auto" and the demo tell the user)."""
    reasons: list[str] = []
    for spec in registered_engines().values():
        missing = spec.missing(weights)
        if missing is None:
            return spec, reasons
        reasons.append(f"{spec.name}: {missing}")
    raise InputError("no engine can run here: " + "; ".join(reasons))


def load_engine(name: str = "xmem", **options: Any) -> Engine:
    """Load engine `name` (see `registered_engines`); options go to that engine's loader
    (for XMem: weights, device, precision, threads and any memory setting)."""
    return engine_spec(name).load_function()(**options)


def _import(target: str, engine: str) -> Callable[..., Any]:
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise InputError(f"the {engine} engine is not part of this installation") from None
        raise
    return getattr(module, function_name)


def check_threads(threads: object) -> int | None:
    """An engine's `threads` option: None (leave the process's setting) or a whole number of
    1 or more; refused here so a bad value is one clear line, before anything loads."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads takes a whole number of 1 or more, not {threads!r}")
    return threads


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
