"""3x3 convolutions in 8-bit integers on CPU (oneDNN, AVX512-VNNI / AVX-VNNI): the "int8"
precision.

Why: in bf16 the network's convolutions already run at this kind of CPU's bf16 peak, and the
VNNI instructions multiply 8-bit integers at twice that rate. Weights are quantised once, per
output channel (symmetric int8); activations are quantised on every call, per tensor, from
their own minimum and maximum (asymmetric uint8), so no calibration data is needed and any
checkpoint works. The products are summed in int32 and the result comes back in bfloat16.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Only convolutions at least this wide on both sides run in int8: the fusion and upsampling
# blocks of the decoder and the value encoder, most of the work. The narrow ones (key
# projection, hidden-state update, mask head) stay in bf16.
MIN_CHANNELS = 256


def int8_available() -> bool:
    """Whether this PyTorch build has oneDNN's quantised convolution."""
    return hasattr(torch.ops.onednn, "qconv2d_pointwise") and torch.backends.mkldnn.is_available()


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(Cout, Cin, 3, 3) float -> (oneDNN-packed int8 weight, float32 scale and zero point (0,
    symmetric) per output channel)."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / 127
    quantized = torch.round(weight / scales.view(-1, 1, 1, 1)).clamp(-127, 127).to(torch.int8)
    quantized = quantized.contiguous(memory_format=torch.channels_last)
    packed = torch.ops.onednn.qconv_prepack(
        quantized, scales, 1.0, 0, [1, 1], [1, 1], [1, 1], 1, None
    )
    return packed, scales, torch.zeros(len(scales), dtype=torch.long)


def int8_conv3x3(
    x: Tensor, packed: Tensor, scales: Tensor, zero_points: Tensor, bias: Tensor | None
) -> Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` with int8 weights from `quantize_weight` and x
    quantised to uint8 over its own range; returns bfloat16, channels-last."""
    low, high = float(x.amin()), float(x.amax())
    low, high = min(low, 0.0), max(high, 0.0)  # zero must be exact (padding)
    step = (high - low) / 255 or 1.0
    zero_point = round(-low / step)
    quantized = (
        x.to(torch.float32, copy=True)  # a copy: x itself must not change
        .mul_(1 / step)
        .add_(zero_point)
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        .contiguous(memory_format=torch.channels_last)
    )
    return torch.ops.onednn.qconv2d_pointwise(
        quantized,
        step,
        zero_point,
        packed,
        scales,
        zero_points,
        None if bias is None else bias.float(),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        1.0,
        0,
        torch.bfloat16,
        "none",
        [],
        "",
    )
