"""int8 convolutions: within the error that 8-bit quantisation allows, used only where they apply
(prepared convolutions under bf16 autocast on CPU, no gradients), invisible to state dicts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmem_label.model import load_engine
from xmem_label.model.errors import InputError
from xmem_label.model.xmem import int8
from xmem_label.model.xmem.conv3x3 import Conv3x3, use_int8

pytestmark = pytest.mark.skipif(not int8.int8_available(), reason="no oneDNN int8 convolution")


def wide_conv(in_channels: int = 256, out_channels: int = 256) -> Conv3x3:
    torch.manual_seed(0)
    conv = Conv3x3(in_channels, out_channels)
    assert use_int8(conv) == 1
    return conv


def error_bound(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """What rounding x to uint8 steps and weight to int8 steps per output channel can change
    in each output, plus the bfloat16 output's own rounding: the convolution of |x| with half a
    weight step, of half an x step with |w|, and of the two half steps."""
    x, weight = x.double(), weight.double()
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    x_step = (high - low) / 255
    w_step = weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    ones = torch.ones_like(x)
    bound = F.conv2d(x.abs(), (w_step / 2).expand_as(weight), padding=1)
    bound += F.conv2d(ones, weight.abs() * x_step / 2, padding=1)
    bound += F.conv2d(ones, (w_step * x_step / 4).expand_as(weight), padding=1)
    return bound + out.abs().double() * 2**-8


@pytest.mark.parametrize("signed", [False, True], ids=["after-relu", "signed"])
def test_matches_the_direct_convolution_within_quantisation_error(signed):
    conv = wide_conv()
    x = torch.randn(1, 256, 12, 15)
    x = x if signed else F.relu(x)
    original = x.clone()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert torch.equal(x, original)  # quantised in a copy
    assert out.dtype == torch.bfloat16 and out.shape == (1, 256, 12, 15)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    error = (out.double() - exact).abs()
    assert (error <= error_bound(x, conv.weight, exact)).all()
    assert error.mean() < 0.02 * exact.abs().mean()  # far inside the bound on average


def test_relu_input_is_folded_into_the_quantisation():
    conv = wide_conv()
    x = torch.randn(1, 256, 12, 15)
    original = x.clone()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x, relu_input=True)
    assert torch.equal(x, original)
    relu = F.relu(x)
    exact = F.conv2d(relu.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert ((out.double() - exact).abs() <= error_bound(relu, conv.weight, exact)).all()
    with torch.inference_mode():  # float32: the ordinary convolution of relu(x)
        assert torch.equal(conv(x, relu_input=True), conv(relu))


def test_input_channel_slices_are_quantised_on_their_own():
    conv = wide_conv()
    x = F.relu(torch.randn(1, 100, 9, 9))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv.forward_input_channels(x, slice(None, 100), with_bias=False)
        conv(F.relu(torch.randn(1, 256, 9, 9)))
    weight = conv.weight[:, :100]
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    assert ((out.double() - exact).abs() <= error_bound(x, weight, exact)).all()
    assert set(conv._int8_weights) == {(None, 100), (None, None)}


def test_int8_only_under_bf16_autocast_without_gradients(count_calls):
    conv = wide_conv()
    x = torch.randn(1, 256, 8, 8)
    calls = count_calls(int8, "int8_conv3x3")
    with torch.inference_mode():
        assert conv(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x).float().sum().backward()  # training: weights require gradients, direct path
    assert conv.weight.grad is not None
    assert calls == []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x)
    assert calls == [1]


def test_weights_loaded_later_are_quantised_again_and_state_dicts_are_unchanged():
    conv = wide_conv()
    x = F.relu(torch.randn(1, 256, 8, 8))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x)
        assert set(conv.state_dict()) == {"weight", "bias"}
        other = Conv3x3(256, 256)
        conv.load_state_dict(other.state_dict())
        out = conv(x)
    exact = F.conv2d(x.double(), other.weight.double(), other.bias.double(), padding=1)
    assert ((out.double() - exact).abs() <= error_bound(x, other.weight, exact)).all()


def test_narrow_convolutions_stay_in_bf16():
    network = torch.nn.Sequential(Conv3x3(256, 1), Conv3x3(576, 192), Conv3x3(512, 256))
    assert use_int8(network) == 1
    assert [conv.uses_int8 for conv in network] == [False, False, True]


def test_int8_precision_prepares_the_wide_convolutions(xmem_weights_path):
    engine = load_engine("xmem", weights=xmem_weights_path, device="cpu", precision="int8")
    convs = [m for m in engine.network.modules() if isinstance(m, Conv3x3) and m.uses_int8]
    decoder = set(map(id, engine.network.decoder.modules()))
    value_encoder = set(map(id, engine.network.value_encoder.modules()))
    assert len(convs) == 17
    assert all(id(conv) in decoder | value_encoder for conv in convs)
    assert not any(conv.winograd_weight is not None for conv in convs)
    with pytest.raises(InputError, match="compile"):
        load_engine("xmem", weights=xmem_weights_path, device="cpu", precision="int8", compile=True)
