"""3x3 convolutions with few output channels (the decoder's mask logits, 256 -> 1) as one matrix
product and nine shifted sums, for float32 on CPU.

Why: oneDNN's direct kernel vectorises over output channels, so with one of them it reaches
about 20 GFLOP/s, and that convolution took 20 ms per frame with 3 objects at 854x480. The
product of every pixel's channels with the filters of all nine taps, (pixels, Cin) x
(Cin, 9 Cout), runs at matrix-product speed instead; each output pixel is then the sum of nine
of those products, taken at the neighbouring pixels. A ReLU of the input (`relu_input`) is
applied block by block as the rows go into the product, where the block is still in cache,
instead of in a pass over the whole activation. The same sums as the direct convolution, in
another order (float32 rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Convolutions with at most this many output channels take this path.
MAX_OUT_CHANNELS = 8
# Input elements per block of rows (2 MB in float32): the ReLU'd block is read back from cache.
BLOCK_ELEMENTS = 1 << 19


def narrow_conv3x3(
    x: Tensor, weight: Tensor, bias: Tensor | None, *, relu_input: bool = False
) -> Tensor:
    """`F.conv2d(relu(x) if relu_input else x, weight, bias, padding=1)` for float32 x
    (N, Cin, H, W), best channels-last, and weight (Cout, Cin, 3, 3)."""
    n, channels, height, width = x.shape
    out_channels = weight.shape[0]
    pixels = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view when x is channels-last
    filters = weight.permute(1, 2, 3, 0).reshape(channels, 9 * out_channels)
    products = x.new_empty(pixels.shape[0], 9 * out_channels)
    rows = max(1, BLOCK_ELEMENTS // channels)
    block = x.new_empty(rows, channels) if relu_input else None
    for start in range(0, pixels.shape[0], rows):
        part = pixels[start : start + rows]
        if block is not None:
            part = torch.clamp_min(part, 0, out=block[: part.shape[0]])
        torch.mm(part, filters, out=products[start : start + rows])
    taps = products.view(n, height, width, 3, 3, out_channels)
    # Output pixel y takes tap dy of input pixel y + dy - 1: the input pixels' products for tap
    # (dy, dx) land 1 - dy rows and 1 - dx columns away (in a frame one pixel wider each side).
    framed = x.new_zeros(n, height + 2, width + 2, out_channels)
    for dy in range(3):
        for dx in range(3):
            framed[:, 2 - dy : 2 - dy + height, 2 - dx : 2 - dx + width] += taps[:, :, :, dy, dx]
    out = framed[:, 1 : height + 1, 1 : width + 1]
    out = out + bias if bias is not None else out.contiguous()
    return out.permute(0, 3, 1, 2)  # channels-last memory
