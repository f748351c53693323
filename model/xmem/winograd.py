"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) and F(6x6, 3x3) (Lavin & Gray, CVPR
2016).

Why: on CPU the decoder's wide 3x3 convolutions are most of XMem's time, and oneDNN's direct float32
kernels already run near the CPU's peak, so the only way to go faster at float32 is to multiply
less. Winograd's algorithm computes each 4x4 output tile from a 6x6 input tile with 36
multiplications per input/output channel pair instead of 144. The input and output transforms cost
little next to the multiplications when both channel counts are wide (>= 192), so those convolutions
run 2-2.5x faster on a 2-core machine. The results differ from a direct float32 convolution by
rounding only: about 5e-5 absolute on outputs of magnitude ~7, against ~1e-5 for the direct kernel
(the equivalence test against the official implementation covers it). Convolutions of at most 576
input channels use 6x6 output tiles from 8x8 input tiles instead (`F6`: 64 multiplications for 36
outputs), faster on all of the decoder's but the 1024-channel one.

The transformed weight (36 or 64 values per 3x3 filter) is made on every call and dropped after it:
keeping it took 470 MB for the decoder alone, more than the official implementation's whole
activation memory, while transforming on the fly is one small matrix product (36x9 or 64x9 by 9 x
Cin*Cout, at most 2.4 ms for the widest here, against 15-35 ms for the convolution) when the weight
is stored tap-major (`tap_major`): each of the 9 taps one contiguous (Cin, Cout) matrix, so any
slice of input channels is a plain matrix too.

Element-wise work around the convolution is folded into passes it makes anyway, since on the
decoder's largest activations a pass of its own costs a sizeable part of the convolution: a ReLU of
the input (`relu_input`) is applied as each band is copied into its zero-padded buffer (of which
only the padding is zeroed), the bias is added to the transformed products at one tile position
(1/36 or 1/64 of them) instead of to the whole output, and a residual (`residual`: a residual
block's shortcut, or the shared part of a convolution split by input channel) as the tiles are
copied out.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor


class Transforms:
    """Winograd's F(m x m, 3x3) for one output tile size m, derived from its interpolation
    points (Lavin & Gray, section 4): input transform B^T, the filter transform as a (span^2, 9)
    matrix on the 9 taps (G w G^T for every tile position at once, made in float64 and rounded
    to float32 once) and output transform A^T. With V the Vandermonde matrix of the points
    (infinity the leading coefficient), A^T = V[:, :m]^T, G = V[:, :3], B^T = V^-T; each row of
    B^T is scaled to integers or halves (its smallest entry 1) and G's row by the inverse, so
    the input transform rounds nothing. Point 1 comes second: A^T's column for it is all ones
    (see the bias in `winograd_conv3x3`)."""

    def __init__(self, tile: int, points: tuple[Fraction, ...]):
        self.tile = tile
        self.span = span = tile + 2  # input pixels per tile side
        vandermonde = torch.tensor(
            [[float(p**k) for k in range(span)] for p in points] + [[0.0] * (span - 1) + [1.0]],
            dtype=torch.float64,
        )
        output = vandermonde[:, :tile].t().clone()
        output[:, -1] = 0
        output[-1, -1] = 1
        filters = vandermonde[:, :3].clone()
        filters[-1] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        inputs = torch.linalg.inv(vandermonde).t()
        scale = torch.stack([row[row.abs() > 1e-9].abs().min() for row in inputs])
        self.input = (inputs / scale[:, None]).round(decimals=6).float()
        self.taps = torch.kron(filters * scale[:, None], filters * scale[:, None]).float()
        self.output = output.float()


# F(4x4, 3x3), points 0, 1, -1, 2, -2 (36 multiplications for 16 outputs), and F(6x6, 3x3) with
# 1/2 and -1/2 besides (64 for 36: 21 % fewer). F(6x6) is the faster up to 576 input channels
# (854x480, 2 threads: 1/4 scale 256->256 for 2 objects 100 -> 84 ms; 1/8 scale 512->256 for 2
# objects 40 -> 37 ms; 1/16 scale 576->512 for 3 objects 36 -> 32 ms, where its 6x6 tiles also
# cover 30x54 exactly). At 1024 -> 512 its transformed weight (134 MB) costs more than it saves
# (25 -> 35 ms). Its rounding error is about 1.5x F(4x4)'s (1.7e-4 against 1.1e-4 on outputs of
# magnitude ~8); the fixture's tolerances are met by the same margins either way.
F4 = Transforms(4, tuple(Fraction(p) for p in (0, 1, -1, 2, -2)))
F6 = Transforms(
    6, tuple(Fraction(p) for p in (0, 1, -1, 2, -2)) + (Fraction(1, 2), Fraction(-1, 2))
)
F6_MAX_CHANNELS = 576

# Convolutions narrower than this on either side are faster direct (measured on ResNet widths).
MIN_CHANNELS = 192
# Elements per transformed band of tiles (8 MB in float32): the speed of whole-image transforms
# at a fraction of their memory (exact mode at 854x480, 1 object: bands of 32 MB peaked 180 MB
# higher at the same speed; 4 MB bands 20 MB lower, 10 % slower).
CHUNK_ELEMENTS = 1 << 21


def tap_major(weight: Tensor) -> Tensor:
    """The same (Cout, Cin, 3, 3) values, laid out as (3, 3, Cin, Cout) in memory: the layout
    `transform_weight` reads without a copy (a parameter keeps it through `load_state_dict`)."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def transform_weight(weight: Tensor, transforms: Transforms = F4) -> Tensor:
    """(Cout, Cin, 3, 3) -> (span^2, Cin, Cout) float32: G w G^T for each channel pair, laid
    out as one (Cin, Cout) matrix per position in the input tile. Free of copies when `weight`
    is `tap_major` (or an input-channel slice of it)."""
    cout, cin = weight.shape[:2]
    taps = weight.permute(2, 3, 1, 0).reshape(9, cin * cout)
    positions = transforms.span * transforms.span
    return torch.mm(transforms.taps.to(weight.device), taps).view(positions, cin, cout)


def winograd_conv3x3(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    relu_input: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` for float32 x (N, Cin, H, W) and weight
    (Cout, Cin, 3, 3), best `tap_major`; of relu(x) with `relu_input`, applied as each band is
    copied (a ReLU pass over x and its output cost more than the band copy itself); plus
    `residual` (broadcastable to the output) if given, added as the tiles are written out (a
    separate sum reads the output again and writes a second one).

    The output is (N, Cout, H, W) in channels-last memory. Tiles go through in bands of tile
    rows, each band zero-padded and transformed on its own, so beside x, the output and the
    transformed weight only a few `CHUNK_ELEMENTS` buffers are alive: a whole padded copy of x
    and a second output (for the bias) were 2 of the 4 largest tensors of exact mode's peak
    with 3 objects.
    """
    n, channels, height, width = x.shape
    transforms = F6 if channels <= F6_MAX_CHANNELS else F4
    tile, span = transforms.tile, transforms.span
    transformed_weight = transform_weight(weight, transforms)
    out_channels = transformed_weight.shape[-1]
    rows, cols = -(-height // tile), -(-width // tile)
    source = x.permute(0, 2, 3, 1)  # NHWC view
    out = x.new_empty(n, rows * tile, cols * tile, out_channels)
    # Tiles that overhang the image are written whole and cropped (and the residual added) at
    # the end, in the copy to the output's shape that the crop needs anyway.
    overhang = height % tile or width % tile
    if residual is not None:
        residual = residual.expand(n, out_channels, height, width).permute(0, 2, 3, 1)
    b_t, a_t = transforms.input.to(x.device), transforms.output.to(x.device)
    band = max(1, CHUNK_ELEMENTS // (span * span * n * cols * max(channels, out_channels)))
    for top in range(0, rows, band):
        band_rows = min(band, rows - top)
        tiles = n * band_rows * cols
        # The band's input rows, zero-padded for whole tiles: padded row r is input row first + r.
        first = top * tile - 1
        padded = x.new_empty(n, band_rows * tile + 2, cols * tile + 2, channels)
        low, high = max(first, 0), min(first + band_rows * tile + 2, height)
        # Only the padding is zeroed: the rest is written once, below.
        padded[:, : low - first].zero_()
        padded[:, high - first :].zero_()
        padded[:, low - first : high - first, 0].zero_()
        padded[:, low - first : high - first, width + 1 :].zero_()
        inside = padded[:, low - first : high - first, 1 : width + 1]
        if relu_input:
            torch.clamp_min(source[:, low:high], 0, out=inside)
        else:
            inside.copy_(source[:, low:high])
        s_n, s_h, s_w, s_c = padded.stride()
        # (span, span * tiles * Cin): the band's overlapping windows, window position outermost.
        windows = padded.as_strided(
            (span, span, n, band_rows, cols, channels),
            (s_h, s_w, s_n, tile * s_h, tile * s_w, s_c),
        ).reshape(span, -1)
        del padded  # each buffer is dropped once used: they are the size of the band
        v = (b_t @ windows).view(span, span, -1)  # B^T d
        del windows
        v = torch.matmul(b_t, v).view(span * span, tiles, channels)  # (B^T d) B
        m = torch.bmm(v, transformed_weight)  # (span^2, tiles, Cout): the multiplications
        del v
        if bias is not None:
            # A^T's column for the interpolation point 1 is all ones, so adding the bias at tile
            # position (1, 1) adds it to all outputs of the tile: 1/span^2 of m, not all of out.
            m.view(span, span, tiles, out_channels)[1, 1].add_(bias)
        y = (a_t @ m.view(span, -1)).view(tile, span, -1)
        del m
        y = torch.matmul(a_t, y).view(tile, tile, n, band_rows, cols, out_channels)
        tiles_nhwc = y.permute(2, 3, 0, 4, 1, 5)
        band_shape = (n, band_rows, tile, cols, tile, out_channels)
        band_rows_out = slice(top * tile, (top + band_rows) * tile)
        band_out = out[:, band_rows_out].view(band_shape)
        if residual is None or overhang:
            band_out.copy_(tiles_nhwc)
        else:
            torch.add(tiles_nhwc, residual[:, band_rows_out].view(band_shape), out=band_out)
        del y, tiles_nhwc
    if not overhang:
        return out.permute(0, 3, 1, 2)  # channels-last memory
    result = x.new_empty(n, height, width, out_channels)
    if residual is None:
        result.copy_(out[:, :height, :width])
    else:
        torch.add(out[:, :height, :width], residual, out=result)
    return result.permute(0, 3, 1, 2)
