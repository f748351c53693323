"""Conv3x3's float32 kernels run only where they apply: float32 on CPU, without autocast (fast
mode's precision) and without gradients (training sees a plain convolution)."""

from __future__ import annotations

import pytest
import torch

from xmem_label.model.xmem import narrow, winograd
from xmem_label.model.xmem.conv3x3 import Conv3x3, use_narrow, use_winograd


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "prepare", "kernel", "name"),
    [
        (200, 192, use_winograd, winograd, "winograd_conv3x3"),
        (64, 1, use_narrow, narrow, "narrow_conv3x3"),
    ],
    ids=["winograd", "narrow"],
)
def test_direct_path_under_autocast_and_gradients(
    count_calls, in_channels, out_channels, prepare, kernel, name
):
    torch.manual_seed(0)
    conv = Conv3x3(in_channels, out_channels)
    assert prepare(conv) == 1
    x = torch.randn(1, in_channels, 8, 8)
    calls = count_calls(kernel, name)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    conv(x).sum().backward()  # training: weights require gradients, direct path
    assert conv.weight.grad is not None
    assert calls == []
    with torch.inference_mode():
        conv(x)
    assert calls == [1]
