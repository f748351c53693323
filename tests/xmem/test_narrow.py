"""Tap-product convolutions (few output channels): equal to the direct convolution up to float32
rounding, used only where they apply (float32 on CPU, no autocast, no gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmem_label.model import load_engine
from xmem_label.model.xmem import narrow
from xmem_label.model.xmem.conv3x3 import Conv3x3, use_narrow

TOLERANCE = 1e-4  # float32 sums of 256 x 9 products of magnitude ~1, in another order


def narrow_conv(in_channels: int = 64, out_channels: int = 1) -> Conv3x3:
    torch.manual_seed(0)
    conv = Conv3x3(in_channels, out_channels)
    assert use_narrow(conv) == 1
    return conv


def direct(x: torch.Tensor, conv: Conv3x3) -> torch.Tensor:
    return F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)


@pytest.mark.parametrize("out_channels", [1, 3])
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 13, 17), (2, 1, 5)], ids=str)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_matches_the_direct_convolution(monkeypatch, out_channels, shape, channels_last):
    # Blocks of 7 rows: several per image, the last one partial.
    monkeypatch.setattr(narrow, "BLOCK_ELEMENTS", 7 * 64)
    conv = narrow_conv(64, out_channels)
    x = torch.randn(shape[0], 64, *shape[1:])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        plain = conv(x)
        rectified = conv(x, relu_input=True)
        summed = conv(x, residual=torch.ones(1, out_channels, 1, 1))
    assert plain.shape == (shape[0], out_channels, *shape[1:])
    assert (plain.double() - direct(x, conv)).abs().max() < TOLERANCE
    assert (rectified.double() - direct(F.relu(x), conv)).abs().max() < TOLERANCE
    assert (summed.double() - direct(x, conv) - 1).abs().max() < TOLERANCE
    # relu_input works on a copy: x itself is unchanged.
    assert (x < 0).any()


def test_only_narrow_outputs_are_prepared():
    network = torch.nn.Sequential(Conv3x3(256, 1), Conv3x3(64, 8), Conv3x3(8, 9))
    assert use_narrow(network) == 2
    assert [conv.uses_narrow for conv in network] == [True, True, False]


def test_exact_mode_on_cpu_prepares_the_mask_logits_and_fast_mode_does_not(xmem_weights_path):
    exact = load_engine("xmem", weights=xmem_weights_path, device="cpu")
    fast = load_engine("xmem", weights=xmem_weights_path, device="cpu", precision="bf16")
    assert exact.network.decoder.pred.uses_narrow
    assert not fast.network.decoder.pred.uses_narrow
