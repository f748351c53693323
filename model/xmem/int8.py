"""3x3 convolutions in 8-bit integers on CPU (oneDNN, AVX512-VNNI / AVX-VNNI): the "int8"
precision.

Why: in bf16 the network's convolutions already run at this kind of CPU's bf16 peak, and the
VNNI instructions multiply 8-bit integers at twice that rate. Weights are quantised once, per
output channel (symmetric int8); activations are quantised on every call, per tensor, from
their own minimum and maximum (asymmetric uint8), so no calibration data is needed and any
checkpoint works. The products are summed in int32 and the result comes back in bfloat16.

The activations' quantisation is what int8 costs beyond the convolution (on AMX cores the 1/4
scale convolutions run in a third of bf16's time, and quantising their input naively took
longer than the convolution): the range is one `aminmax` over the channels-last memory as a
flat vector (a reduction over the 4-d tensor is several times slower), and the values are
scaled in chunks small enough that the float32 intermediate stays in the core's cache. A ReLU
before the convolution is folded into this step (`relu_input`): clamping at the zero point is
the ReLU, so it costs no pass of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Only convolutions at least this wide on both sides run in int8: the fusion and upsampling
# blocks of the decoder and the value encoder, most of the work. The narrow ones (key
# projection, hidden-state update, mask head) stay in bf16.
MIN_CHANNELS = 256

# Activation values quantised per step: the float32 intermediate (1 MB) stays in the core's L2
# cache, so the steps after the first read no main memory.
QUANTIZE_CHUNK = 1 << 18


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


def quantize_activation(x: Tensor, *, relu: bool = False) -> tuple[Tensor, float, int]:
    """x (N, C, H, W) -> (uint8 channels-last, step, zero point) over x's own range, zero
    exact (padding); with `relu`, the quantisation of relu(x)."""
    x = x.contiguous(memory_format=torch.channels_last)
    values = x.permute(0, 2, 3, 1).reshape(-1)  # a view: channels-last memory order
    low, high = (float(v) for v in torch.aminmax(values))
    low, high = 0.0 if relu else min(low, 0.0), max(high, 0.0)
    step = (high - low) / 255 or 1.0
    zero_point = round(-low / step)
    quantized = torch.empty(x.shape, dtype=torch.uint8, memory_format=torch.channels_last)
    out = quantized.permute(0, 2, 3, 1).view(-1)
    buffer = torch.empty(min(QUANTIZE_CHUNK, len(values)))
    for start in range(0, len(values), QUANTIZE_CHUNK):
        chunk = buffer[: min(QUANTIZE_CHUNK, len(values) - start)]
        # Rounding half up is truncating v + 0.5 (the conversion to uint8 truncates); the clamp
        # keeps rounding at the range's ends inside [0, 255] and, with `relu`, is the ReLU.
        chunk.copy_(values[start : start + len(chunk)]).mul_(1 / step)
        chunk.add_(zero_point + 0.5).clamp_(0, 255.5)
        out[start : start + len(chunk)].copy_(chunk)
    return quantized, step, zero_point


def int8_conv3x3(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zero_points: Tensor,
    bias: Tensor | None,
    *,
    relu_input: bool = False,
) -> Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` (of relu(x) with `relu_input`) with int8 weights
    from `quantize_weight` and x quantised to uint8 over its own range; returns bfloat16,
    channels-last. x itself is not changed."""
    quantized, step, zero_point = quantize_activation(x, relu=relu_input)
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
