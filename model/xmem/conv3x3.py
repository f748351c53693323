"""The network's 3x3 convolution (padding 1), with two faster CPU kernels for inference.

- Winograd (`winograd.py`), float32: exact mode, the same results up to rounding.
- int8 (`int8.py`), under bf16 autocast: the "int8" precision, a fast mode.
- tap products (`narrow.py`), float32: convolutions with few output channels (the mask logits),
  the same results up to rounding.

`use_winograd` / `use_int8` choose the convolutions wide enough to gain, `use_narrow` those
narrow enough on the output side (the direct kernel is slowest there). Anything else, and
every call with gradients, off the CPU, or in another precision, runs the ordinary convolution,
so CUDA, MPS and training see a plain `nn.Conv2d`. Winograd keeps nothing beside the weight (it
only stores the weight in the memory layout it reads, with the same values: `winograd.tap_major`);
what int8 derives from the weight is kept out of the state dict and derived again when the
weight changes (`load_state_dict`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import int8, narrow, winograd


class Conv3x3(nn.Conv2d):
    """`nn.Conv2d(in_channels, out_channels, 3, padding=1)` with optional CPU kernels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.uses_winograd = False
        self.uses_int8 = False
        self.uses_narrow = False
        # `int8.quantize_weight` per slice of input channels (see `_conv_split`).
        self._int8_weights: dict[tuple[int | None, int | None], tuple[Tensor, Tensor, Tensor]] = {}
        self._derived_version = -1

    @property
    def winograd_weight(self) -> Tensor | None:
        """The weight as the Winograd kernel reads it, or None where this convolution runs
        direct."""
        return self.weight if self.uses_winograd else None

    def prepare_winograd(self) -> None:
        self.uses_winograd = True
        self.weight.data = winograd.tap_major(self.weight.data)
        self._derived_version = self._weight_version()

    def prepare_narrow(self) -> None:
        self.uses_narrow = True

    def prepare_int8(self) -> None:
        self.uses_int8 = True
        self._int8_weights = {}  # packed per slice on first use
        self._derived_version = self._weight_version()

    def forward(
        self, x: Tensor, *, relu_input: bool = False, residual: Tensor | None = None
    ) -> Tensor:
        """The convolution of x, or of relu(x) with `relu_input` (which int8 folds into its
        quantisation of x and Winograd into its copy of x, instead of a pass of their own),
        plus `residual` if given (Winograd adds it as it writes its output)."""
        return self.forward_input_channels(
            x, slice(None), with_bias=True, relu_input=relu_input, residual=residual
        )

    def forward_input_channels(
        self,
        x: Tensor,
        channels: slice,
        *,
        with_bias: bool,
        relu_input: bool = False,
        residual: Tensor | None = None,
    ) -> Tensor:
        """The convolution of x (relu(x) with `relu_input`) with the filters' input channels
        `channels` only, plus `residual` (broadcastable to the output) if given."""
        bias = self.bias if with_bias else None
        kernels = x.device.type == "cpu" and not (
            torch.is_grad_enabled() and self.weight.requires_grad
        )
        if kernels and self._weight_version() != self._derived_version:  # weights loaded again
            self._derive_again()
        autocast = torch.is_autocast_enabled("cpu")
        if kernels and self.uses_int8 and autocast:
            packed = self._int8_weight(channels)
            out = int8.int8_conv3x3(x, *packed, bias, relu_input=relu_input)
        elif kernels and self.uses_winograd and x.dtype == torch.float32 and not autocast:
            weight = self.weight[:, channels]
            return winograd.winograd_conv3x3(
                x, weight, bias, relu_input=relu_input, residual=residual
            )
        elif kernels and self.uses_narrow and x.dtype == torch.float32 and not autocast:
            out = narrow.narrow_conv3x3(x, self.weight[:, channels], bias, relu_input=relu_input)
        else:
            x = F.relu(x) if relu_input else x
            out = F.conv2d(x, self.weight[:, channels], bias, padding=1)
        return out if residual is None else out + residual

    def _int8_weight(self, channels: slice) -> tuple[Tensor, Tensor, Tensor]:
        key = (channels.start, channels.stop)
        if key not in self._int8_weights:
            self._int8_weights[key] = int8.quantize_weight(self.weight[:, channels])
        return self._int8_weights[key]

    def _weight_version(self) -> int:
        """The weight's in-place version counter, by which a reload (`load_state_dict`) is
        noticed. A weight made under `torch.inference_mode` has none (it is then 0): such a
        weight can only be changed inside inference mode, which a reload there is not seen in."""
        return 0 if self.weight.is_inference() else self.weight._version

    def _derive_again(self) -> None:
        if self.uses_winograd:
            self.prepare_winograd()
        if self.uses_int8:
            self.prepare_int8()
        self._derived_version = self._weight_version()


def _prepare(
    module: nn.Module, chosen: Callable[[Conv3x3], bool], prepare: Callable[[Conv3x3], None]
) -> int:
    """Prepare every `Conv3x3` in `module` that `chosen` picks; returns how many."""
    convs = [conv for conv in module.modules() if isinstance(conv, Conv3x3) and chosen(conv)]
    for conv in convs:
        prepare(conv)
    return len(convs)


def _wide(min_channels: int) -> Callable[[Conv3x3], bool]:
    return lambda conv: min(conv.in_channels, conv.out_channels) >= min_channels


def use_winograd(module: nn.Module) -> int:
    """Prepare every `Conv3x3` in `module` at least `winograd.MIN_CHANNELS` wide on both sides
    for the Winograd path; returns how many were prepared."""
    return _prepare(module, _wide(winograd.MIN_CHANNELS), Conv3x3.prepare_winograd)


def use_narrow(module: nn.Module) -> int:
    """Prepare every `Conv3x3` in `module` with at most `narrow.MAX_OUT_CHANNELS` outputs for
    the tap-product path (float32); returns how many were prepared."""
    return _prepare(
        module, lambda conv: conv.out_channels <= narrow.MAX_OUT_CHANNELS, Conv3x3.prepare_narrow
    )


def use_int8(module: nn.Module) -> int:
    """Prepare every `Conv3x3` in `module` at least `int8.MIN_CHANNELS` wide on both sides for
    the int8 path (taken under bf16 autocast on CPU); returns how many were prepared."""
    return _prepare(module, _wide(int8.MIN_CHANNELS), Conv3x3.prepare_int8)
