"""The XMem engine: loaded weights on a device, in a precision, with settings; starts passes."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..allocator import keep_freed_memory
from ..engine import EngineDescription, check_threads, pick_device
from ..errors import InputError
from ..outputs import sha256_of
from .checkpoint import build_network, load_state_dict
from .conv3x3 import use_int8, use_narrow, use_winograd
from .inference import IMAGENET_MEAN, IMAGENET_STD, FrameGeometry, XMemTracker
from .int8 import int8_available
from .network import XMemNetwork
from .settings import XMemSettings, xmem_settings
from .weights import resolve_weights

# Precisions per device type: "fp32" is exact mode; bf16/fp16 autocast is fast mode, and "int8"
# (CPU) is bf16 autocast with the wide 3x3 convolutions in 8-bit integers.
PRECISIONS = {
    "cpu": ("fp32", "bf16", "int8") if int8_available() else ("fp32", "bf16"),
    "cuda": ("fp32", "bf16", "fp16"),
    "mps": ("fp32", "fp16"),
}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16}


class XMemEngine:
    """XMem with its weights; `new_tracker` starts a pass with its own memory."""

    name = "xmem"

    def __init__(
        self,
        network: XMemNetwork,
        settings: XMemSettings,
        *,
        device: torch.device,
        precision: str,
        weights_path: Path,
        compiled: bool = False,
    ):
        self.network = network
        self.compiled = compiled
        self.settings = settings
        self.device = device
        self.precision = precision
        self.weights_path = weights_path
        self._weights_sha256: str | None = None
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def describe(self) -> EngineDescription:
        if self._weights_sha256 is None:  # hashing 250 MB takes a second: only when asked
            self._weights_sha256 = sha256_of(self.weights_path)
        return EngineDescription(
            engine="xmem",
            settings=dataclasses.asdict(self.settings),
            weights=str(self.weights_path),
            sha256=self._weights_sha256,
            device=str(self.device),
            precision=self.precision,
        )

    def new_tracker(self, num_frames: int | None) -> XMemTracker:
        return XMemTracker(self, num_frames)

    def network_context(self) -> contextlib.ExitStack:
        """The context of the network calls: autocast in fast mode (memory reads stay float32),
        and with `compile`, inductor's weight freezing (weights folded as constants and
        prepacked for oneDNN), the setting meant for inference; the first call of each shape
        compiles under it."""
        stack = contextlib.ExitStack()
        if self.precision != "fp32":
            stack.enter_context(
                torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])
            )
        if self.compiled:
            import torch._inductor.config as inductor_config

            stack.enter_context(inductor_config.patch(freezing=True))
        return stack

    def prepare_image(self, frame: np.ndarray, geometry: FrameGeometry) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, Hp, Wp) float32 normalised, resized, padded, channels
        last, on the device (pinned, asynchronous copy on CUDA)."""
        if not frame.flags.writeable or not frame.flags.c_contiguous:
            frame = np.array(frame)  # torch.from_numpy wants a writeable, contiguous array
        pixels = torch.from_numpy(frame)
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        else:
            pixels = pixels.to(self.device)
        image = pixels.permute(2, 0, 1).unsqueeze(0).float()
        image = geometry.image_to_network((image - self._mean) / self._std)
        return image.contiguous(memory_format=torch.channels_last)


def check_xmem_options(
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    compile: bool = False,
    threads: int | None = None,
    **settings: Any,
) -> tuple[torch.device, XMemSettings]:
    """The device and settings XMem would run with; every option is checked here, so a caller
    (the CLI) can refuse a bad one before resolving or downloading weights."""
    resolved_settings = xmem_settings(**settings)
    check_threads(threads)
    device = pick_device(device)
    allowed = PRECISIONS.get(device.type, ("fp32",))
    if precision not in allowed:
        raise InputError(
            f"precision {precision!r} is not available on {device.type}; choose {allowed}"
        )
    if not isinstance(compile, bool):
        raise InputError(f"compile takes true or false, not {compile!r}")
    if compile and precision == "int8":
        raise InputError("compile is not available with precision 'int8'; use bf16 to compile")
    return device, resolved_settings


def load_xmem_engine(
    *,
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    compile: bool = False,
    threads: int | None = None,
    **settings: Any,
) -> XMemEngine:
    """Load XMem.

    weights: a checkpoint path or name from manifest.yml (None: the default one), resolved as
    `xmem_label.model.xmem.weights.resolve_weights` does (path, environment, cache, download).
    device: None picks CUDA, then MPS, then CPU. precision: "fp32" (exact), "bf16"/"fp16"
    autocast (fast), or "int8" (fastest, CPU). compile: wrap the three networks in
    torch.compile (not with int8, whose kernels run eagerly). threads: torch's intra-op
    threads on CPU, set when the engine loads (None leaves the process's setting: torch's
    default is one per physical core, or OMP_NUM_THREADS). Torch's setting is per process, so
    it holds for every engine and pass in the process, and the engine loaded last decides.
    settings: XMem settings under the official names, and `size` (internal short side, -1 =
    native); defaults come from manifest.yml.
    """
    device, resolved_settings = check_xmem_options(
        device=device, precision=precision, compile=compile, threads=threads, **settings
    )
    if threads is not None:
        torch.set_num_threads(threads)
    path = resolve_weights(weights)
    network = build_network(load_state_dict(path)).to(device).eval()
    network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    if device.type == "cpu":
        keep_freed_memory()
        if precision == "fp32":
            use_winograd(network)  # the decoder's and the value encoder's fusion convolutions
            use_narrow(network.decoder)
        elif precision == "int8":
            use_int8(network)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if compile:
        for part in ("key_encoder", "value_encoder", "decoder"):
            setattr(network, part, torch.compile(getattr(network, part)))
    return XMemEngine(
        network,
        resolved_settings,
        device=device,
        precision=precision,
        weights_path=path,
        compiled=compile,
    )
