"""Winograd F(4x4, 3x3) and F(6x6, 3x3) convolutions: equal to the direct convolution up to
float32 rounding, used only where they apply (float32 on CPU, no autocast, no gradients),
invisible to state dicts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmem_label.model import load_engine
from xmem_label.model.xmem import winograd
from xmem_label.model.xmem.conv3x3 import Conv3x3, use_winograd

# The direct float32 kernel is ~1e-5 from float64 on these outputs (magnitude ~5); Winograd's
# transforms add a few times that.
TOLERANCE = 2e-4


def direct(x: torch.Tensor, conv: Conv3x3, channels: slice = slice(None), bias: bool = True):
    bias_value = conv.bias.double() if bias else None
    return F.conv2d(x.double(), conv.weight[:, channels].double(), bias_value, padding=1)


def wide_conv(in_channels: int = 200, out_channels: int = 192) -> Conv3x3:
    torch.manual_seed(0)
    conv = Conv3x3(in_channels, out_channels)
    assert use_winograd(conv) == 1
    return conv


@pytest.mark.parametrize("channels", [200, 600], ids=["F6", "F4"])  # F6_MAX_CHANNELS = 576
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 13, 17), (2, 5, 9)], ids=str)
def test_matches_the_direct_convolution(shape, channels):
    conv = wide_conv(channels)
    x = torch.randn(shape[0], channels, *shape[1:])
    with torch.inference_mode():
        out = conv(x)
    assert out.shape == (shape[0], 192, *shape[1:])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - direct(x, conv)).abs().max() < TOLERANCE


def test_bands_of_tiles_and_input_channel_slices(monkeypatch):
    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 10_000)  # many bands of one tile row
    conv = wide_conv()
    x = torch.randn(2, 200, 23, 31).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        whole = conv(x)
        own = conv.forward_input_channels(x[:, 150:], slice(150, None), with_bias=False)
    assert (whole.double() - direct(x, conv)).abs().max() < TOLERANCE
    reference = direct(x[:, 150:], conv, slice(150, None), bias=False)
    assert (own.double() - reference).abs().max() < TOLERANCE


@pytest.mark.parametrize("shape", [(2, 200, 16, 16), (2, 200, 13, 17)], ids=str)
def test_relu_input_is_the_convolution_of_relu_x(monkeypatch, shape):
    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 10_000)  # the ReLU in every band
    conv = wide_conv()
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = conv(x, relu_input=True)
    assert (out.double() - direct(F.relu(x), conv)).abs().max() < TOLERANCE
    assert x.min() < 0  # the input is left as it was


def test_the_bias_reaches_every_output_of_every_tile(monkeypatch):
    """The bias is added inside the transform (at one tile position), not to the output: a
    large one shows if any output, tile row or overhanging tile missed it."""
    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 10_000)
    conv = wide_conv()
    with torch.no_grad():
        conv.bias.mul_(1000)
    x = torch.randn(2, 200, 13, 18)
    with torch.inference_mode():
        out = conv(x)
    assert (out.double() - direct(x, conv)).abs().max() < TOLERANCE


@pytest.mark.parametrize("shape", [(2, 200, 16, 20), (3, 200, 13, 17)], ids=str)
@pytest.mark.parametrize("objects", ["each", "shared"])
def test_the_residual_is_added_to_the_output(monkeypatch, shape, objects):
    """Whole tiles add it band by band, overhanging ones in the final crop; a residual with one
    sample is broadcast to all (the shared part of `_conv_split`)."""
    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 10_000)
    conv = wide_conv()
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    samples = shape[0] if objects == "each" else 1
    residual = torch.randn(samples, 192, *shape[2:]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = conv(x, relu_input=True, residual=residual)
        plain = Conv3x3(200, 192)
        plain.load_state_dict(conv.state_dict())
        direct_out = plain(x, relu_input=True, residual=residual)  # not prepared: F.conv2d
    expected = direct(F.relu(x), conv) + residual.double()
    assert out.shape == (shape[0], 192, *shape[2:])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - expected).abs().max() < TOLERANCE
    assert (direct_out.double() - expected).abs().max() < TOLERANCE


def test_no_unwritten_memory_is_read(monkeypatch):
    """The kernel's buffers are made uninitialised (only the padded bands' borders are zeroed):
    filled with NaN here, any element read before it is written shows in the output."""

    def new_nan(self: torch.Tensor, *size: int) -> torch.Tensor:
        return torch.full(size, float("nan"), dtype=self.dtype, device=self.device)

    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 10_000)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_nan)
    conv = wide_conv()
    for shape in [(2, 200, 16, 16), (3, 200, 13, 17), (1, 200, 5, 9)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            out = conv(x, relu_input=True, residual=torch.ones(1, 192, *shape[2:]))
        assert (out.double() - direct(F.relu(x), conv) - 1).abs().max() < TOLERANCE


def test_weights_loaded_later_are_transformed_again_and_state_dicts_are_unchanged():
    conv = wide_conv()
    keys = set(conv.state_dict())
    assert keys == {"weight", "bias"}
    other = Conv3x3(200, 192)
    conv.load_state_dict(other.state_dict())
    x = torch.randn(1, 200, 8, 8)
    with torch.inference_mode():
        out = conv(x)
    assert (out.double() - direct(x, other)).abs().max() < TOLERANCE


def test_nothing_is_kept_beside_the_weight_and_it_keeps_its_values():
    torch.manual_seed(0)
    original = Conv3x3(200, 192)
    conv = Conv3x3(200, 192)
    conv.load_state_dict(original.state_dict())
    assert use_winograd(conv) == 1
    assert list(conv.buffers()) == []
    assert torch.equal(conv.weight, original.weight)
    assert conv.weight.permute(2, 3, 1, 0).is_contiguous()  # winograd.tap_major
    # A slice of input channels is transformed in place of the whole, without a copy of it.
    sliced = conv.weight[:, 150:]
    assert sliced.permute(2, 3, 1, 0).reshape(9, -1).data_ptr() == sliced.data_ptr()
    taps = sliced.double().permute(2, 3, 1, 0).reshape(9, -1)
    for transforms in (winograd.F4, winograd.F6):
        positions = transforms.span**2
        expected = (transforms.taps.double() @ taps).view(positions, 50, 192)
        transformed = winograd.transform_weight(sliced, transforms).double()
        assert (transformed - expected).abs().max() < 1e-5


def test_narrow_convolutions_stay_direct():
    network = torch.nn.Sequential(Conv3x3(256, 1), Conv3x3(64, 64), Conv3x3(256, 256))
    assert use_winograd(network) == 1
    assert network[2].winograd_weight is not None
    assert network[0].winograd_weight is None and network[1].winograd_weight is None


def test_exact_mode_on_cpu_prepares_the_fusion_convolutions_and_fast_mode_does_not(
    xmem_weights_path,
):
    def prepared(engine) -> list[Conv3x3]:
        return [
            m
            for m in engine.network.modules()
            if isinstance(m, Conv3x3) and m.winograd_weight is not None
        ]

    exact = load_engine("xmem", weights=xmem_weights_path, device="cpu")
    convs = prepared(exact)
    # The decoder's 13 and the value encoder's 6 (its fusion block and hidden reinforcement);
    # the ResNet trunks are plain convolutions.
    assert len(convs) == 19
    network = exact.network
    fusion_convs = set(map(id, [*network.decoder.modules(), *network.value_encoder.modules()]))
    assert all(id(conv) in fusion_convs for conv in convs)
    fast = load_engine("xmem", weights=xmem_weights_path, device="cpu", precision="bf16")
    assert prepared(fast) == []


def test_a_network_made_under_inference_mode_is_prepared_and_runs():
    """An engine loaded inside `torch.inference_mode()` has inference tensors as weights, which
    keep no version counter: preparing and running them must not need one."""
    x = torch.randn(1, 200, 8, 8)
    with torch.inference_mode():
        conv = wide_conv()  # prepared for Winograd there
        out = conv(x)
    assert (out.double() - direct(x, conv)).abs().max() < TOLERANCE
