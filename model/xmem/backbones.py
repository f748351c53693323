"""The two ResNet trunks of XMem, cut after layer3 (stride 16), written without torchvision.

Parameter names follow torchvision's ResNet so official checkpoints load unchanged. Batch norm
always runs with its running statistics (XMem never trains it at inference), and it is folded
into the preceding convolution at call time: one convolution instead of a convolution plus a
normalisation pass, with the stored parameters untouched. In float32 on CPU (exact mode) the
ReLU and the residual sum after a convolution are oneDNN post-ops of the convolution itself
(`_fused`): the same arithmetic, without a pass over the activation each, at the 1/4 scale
larger than the 1x1 convolutions they follow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def folded_batch_norm(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(scale, shift) of a batch norm in inference: bn(y) = y * scale + shift per channel."""
    assert bn.running_var is not None and bn.running_mean is not None  # in every checkpoint
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fused(x: Tensor) -> bool:
    """Whether oneDNN's convolution with post-ops applies: float32 on CPU, without autocast
    (its bf16 convolutions), gradients or torch.compile (which fuses on its own)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.is_available()
    )


def conv_bn(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    *,
    relu: bool,
    residual: Tensor | None = None,
) -> Tensor:
    """`bn(conv(x))` (plus `residual`, then ReLU) with the normalisation folded into the
    convolution."""
    scale, bias = folded_batch_norm(bn)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
    if _fused(x):
        mkldnn = torch.ops.mkldnn
        if residual is None:
            unary = "relu" if relu else "none"
            return mkldnn._convolution_pointwise(
                x, weight, bias, padding, stride, dilation, conv.groups, unary, [], ""
            )
        return mkldnn._convolution_pointwise.binary(
            x, residual, weight, bias, padding, stride, dilation, conv.groups,
            "add", None, "relu" if relu else None, [], "",
        )  # fmt: skip
    out = F.conv2d(x, weight, bias, conv.stride, conv.padding)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False
    )


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """torchvision's projection shortcut: 1x1 convolution (index 0) and batch norm (index 1)."""
    return nn.Sequential(_conv(in_channels, out_channels, 1, stride), nn.BatchNorm2d(out_channels))


def _shortcut(x: Tensor, downsample: nn.Sequential | None) -> Tensor:
    if downsample is None:
        return x
    conv, bn = downsample[0], downsample[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)  # see _downsample
    return conv_bn(x, conv, bn, relu=False)


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * 4
        self.conv1 = _conv(in_channels, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.downsample = (
            _downsample(in_channels, out_channels, stride) if needs_projection else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = conv_bn(x, self.conv1, self.bn1, relu=True)
        out = conv_bn(out, self.conv2, self.bn2, relu=True)
        shortcut = _shortcut(x, self.downsample)
        return conv_bn(out, self.conv3, self.bn3, relu=True, residual=shortcut)


class BasicBlock(nn.Module):
    """ResNet-18 block: two 3x3 convolutions, the first carrying the stride."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv(in_channels, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_projection = stride != 1 or in_channels != planes
        self.downsample = _downsample(in_channels, planes, stride) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        out = conv_bn(x, self.conv1, self.bn1, relu=True)
        shortcut = _shortcut(x, self.downsample)
        return conv_bn(out, self.conv2, self.bn2, relu=True, residual=shortcut)


def make_stage(
    block: type[Bottleneck] | type[BasicBlock],
    in_channels: int,
    planes: int,
    num_blocks: int,
    stride: int,
) -> nn.Sequential:
    """One ResNet stage; only its first block changes resolution and width."""
    expansion = 4 if block is Bottleneck else 1
    blocks = [block(in_channels, planes, stride)]
    blocks += [block(planes * expansion, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class KeyEncoder(nn.Module):
    """ResNet-50 stem and layers 1-3 on the RGB frame; returns f16, f8, f4 (1024/512/256 ch).

    Layer 1 is called `res2` in XMem checkpoints.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.res2 = make_stage(Bottleneck, 64, 64, 3, stride=1)
        self.layer2 = make_stage(Bottleneck, 256, 128, 4, stride=2)
        self.layer3 = make_stage(Bottleneck, 512, 256, 6, stride=2)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = conv_bn(image, self.conv1, self.bn1, relu=True)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        f4 = self.res2(x)
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        return f16, f8, f4
