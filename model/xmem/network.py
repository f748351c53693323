"""The XMem network (Cheng & Schwing, ECCV 2022): key encoder, value encoder and mask decoder.

Own implementation of the published architecture; module and parameter names match the official
checkpoints (`XMem.pth`). The memory (what to read for a frame) lives in `memory.py`; this module
only turns tensors into tensors. Shapes: batch 1, K objects, h, w = H/16, W/16; the caller
normalises the image (ImageNet mean/std) and zero-pads it to multiples of 16.

Work that is the same for every object is done once per frame: the part of the first fusion
convolutions that sees the frame features, the RGB part of the value encoder's first
convolution, and the decoder's skip convolutions. The weights are split by input channel at call
time, so the state dict keeps the official layout. Tensors the memory stores (key, shrinkage,
selection, value, hidden state) and the outputs of `segment` are float32 even under
`torch.autocast`; the frame features f16/f8/f4 keep the autocast dtype, so call all three
methods of a frame in the same precision context.

Element-wise passes over large activations are folded where a kernel makes a pass anyway: the
residual blocks' ReLUs and sums are arguments of their convolutions (`relu_input`, `residual`:
Winograd applies them in its band copies, int8 folds the ReLU into its quantisation, other paths
apply them as before), the backbones' ReLUs and sums are oneDNN post-ops in float32
(`backbones.conv_bn`), and the hidden-state update pools g4 and the logits apart rather than
concatenating them at 1/4 scale.

Speed on CPU: `conv3x3.use_winograd(network)` runs the wide 3x3 convolutions (the decoder's
and the value encoder's fusion blocks) with at most a quarter of the multiplications (float32;
rounding differences), `conv3x3.use_narrow(network.decoder)` the mask-logit convolution as a
matrix product;
`network.to(memory_format=torch.channels_last)` with channels-last images changes
results only by rounding; `torch.autocast("cpu", dtype=torch.bfloat16)` around the calls is the
bf16 fast mode (probabilities within ~0.03), and `conv3x3.use_int8(network)` under it the int8
one (the wide 3x3 convolutions in 8-bit integers); `allocator.keep_freed_memory()` once per
process saves the page faults of the large activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import BasicBlock, KeyEncoder, folded_batch_norm, make_stage
from .conv3x3 import Conv3x3

# Objects that go through the full-resolution half of the networks together. Two at a time:
# the activations there (about 150 MB per object at 854x480 in float32) are bounded whatever
# the number of objects, and per-call overhead is negligible at these sizes (3 objects at
# 854x480, batches of 4 -> 2: exact mode's peak RSS 2.03 -> 1.82 GB at the same speed within
# this machine's noise; one at a time saved 0.08 GB more, but its results differ from one
# batch of all objects by more than the batching test's tolerance).
OBJECTS_PER_BATCH = 2


@dataclass
class KeyFeatures:
    """What `encode_key` computes for one frame."""

    key: Tensor  # (1, Ck, h, w)
    shrinkage: Tensor | None  # (1, 1, h, w), >= 1
    selection: Tensor | None  # (1, Ck, h, w), in (0, 1)
    f16: Tensor  # (1, 1024, h, w)
    f8: Tensor  # (1, 512, 2h, 2w)
    f4: Tensor  # (1, 256, 4h, 4w)


def soft_aggregate(object_probs: Tensor, dim: int = 1) -> Tensor:
    """Per-object probabilities (K along `dim`) -> K+1 probabilities, background first.

    Background is the probability that no object is present; the K+1 values are clamped away
    from 0 and 1, turned into logits and renormalised with a softmax (XMem's `aggregate`).
    """
    object_probs = object_probs.float()
    background = torch.prod(1 - object_probs, dim=dim, keepdim=True)
    probs = torch.cat([background, object_probs], dim=dim).clamp(1e-7, 1 - 1e-7)
    return torch.softmax(torch.log(probs / (1 - probs)), dim=dim)


def _upsample4(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)


def _conv_split(shared: Tensor, own: Tensor, conv: Conv3x3, *, relu_input: bool = False) -> Tensor:
    """`conv(cat([shared expanded to every object, own], 1))`, the shared part computed once
    (of the ReLU of that with `relu_input`).

    shared: (1, Cs, h, w), the same for every object; own: (K, Co, h, w).
    """
    split = shared.shape[1]
    shared_part = conv.forward_input_channels(
        shared, slice(None, split), with_bias=True, relu_input=relu_input
    )
    return conv.forward_input_channels(
        own, slice(split, None), with_bias=False, relu_input=relu_input, residual=shared_part
    )


class GroupResBlock(nn.Module):
    """`conv2(relu(conv1(relu(x)))) + shortcut(x)`, 3x3 convolutions with bias.

    The shortcut is a 3x3 convolution (`downsample`) when the width changes, else identity.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.downsample = (
            Conv3x3(in_channels, out_channels) if in_channels != out_channels else None
        )
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.conv2 = Conv3x3(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        # The ReLUs and the sum are the convolutions' (`relu_input`, `residual`): Winograd folds
        # both, int8 the ReLUs, into passes they make anyway.
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv1(x, relu_input=True)
        return self.conv2(out, relu_input=True, residual=shortcut)

    def forward_split(self, shared: Tensor, own: Tensor) -> Tensor:
        """`forward(cat([shared expanded to every object, own], 1))` without the expansion."""
        assert self.downsample is not None  # split inputs change the channel count
        shortcut = _conv_split(shared, own, self.downsample)
        out = _conv_split(shared, own, self.conv1, relu_input=True)
        return self.conv2(out, relu_input=True, residual=shortcut)


class ChannelGate(nn.Module):
    """CBAM channel attention: a shared MLP on the average- and max-pooled channel vectors."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        attention = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(attention)[:, :, None, None]


class SpatialGate(nn.Module):
    """CBAM spatial attention: a 7x7 convolution on the channel-wise max and mean."""

    def __init__(self) -> None:
        super().__init__()
        self.spatial = nn.ModuleDict({"conv": nn.Conv2d(2, 1, 7, padding=3)})

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial["conv"](pooled))


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al. 2018): channel gate, then spatial gate."""

    def __init__(self, channels: int):
        super().__init__()
        self.ChannelGate = ChannelGate(channels)  # noqa: N815 (checkpoint name)
        self.SpatialGate = SpatialGate()  # noqa: N815 (checkpoint name)

    def forward(self, x: Tensor) -> Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class FeatureFusionBlock(nn.Module):
    """Fuses the frame's f16 with per-object features: res block, `g + CBAM(g)`, res block."""

    def __init__(
        self, frame_channels: int, object_channels: int, mid_channels: int, out_channels: int
    ):
        super().__init__()
        self.block1 = GroupResBlock(frame_channels + object_channels, mid_channels)
        self.attention = CBAM(mid_channels)
        self.block2 = GroupResBlock(mid_channels, out_channels)

    def forward(self, f16: Tensor, object_features: Tensor) -> Tensor:
        """f16: (1, Cf, h, w); object_features: (K, Cg, h, w) -> (K, out, h, w)."""
        g = self.block1.forward_split(f16, object_features)
        g = g + self.attention(g)
        return self.block2(g)


def _gated_update(values: Tensor, hidden: Tensor) -> Tensor:
    """XMem's GRU-like rule: `h' = forget * h * (1 - update) + update * candidate`."""
    forget, update, candidate = values.float().chunk(3, dim=1)
    forget, update = torch.sigmoid(forget), torch.sigmoid(update)
    return forget * hidden * (1 - update) + update * torch.tanh(candidate)


class HiddenReinforcer(nn.Module):
    """Deep update of the sensory memory from the new value (memory frames)."""

    def __init__(self, value_dim: int, hidden_dim: int):
        super().__init__()
        self.transform = Conv3x3(value_dim + hidden_dim, hidden_dim * 3)

    def forward(self, value: Tensor, hidden: Tensor) -> Tensor:
        return _gated_update(self.transform(torch.cat([value, hidden.to(value.dtype)], 1)), hidden)


class HiddenUpdater(nn.Module):
    """Sensory memory update from the decoder's features at 1/16, 1/8 and 1/4 (with the logit)."""

    def __init__(self, hidden_dim: int, mid_channels: int = 256):
        super().__init__()
        self.g16_conv = nn.Conv2d(512, mid_channels, 1)
        self.g8_conv = nn.Conv2d(256, mid_channels, 1)
        self.g4_conv = nn.Conv2d(257, mid_channels, 1)
        self.transform = Conv3x3(mid_channels + hidden_dim, hidden_dim * 3)

    def forward(
        self, g16: Tensor, g8: Tensor, g4: Tensor, logits: Tensor, hidden: Tensor
    ) -> Tensor:
        """XMem's update from g4 and the logits concatenated; pooling is per channel, so they are
        pooled apart and only the pooled tensors joined (not a copy of g4 at 1/4 scale)."""
        # Area downsampling by exact factors is average pooling.
        g4 = torch.cat([F.avg_pool2d(g4, 4), F.avg_pool2d(logits, 4)], dim=1)
        g = self.g16_conv(g16) + self.g8_conv(F.avg_pool2d(g8, 2)) + self.g4_conv(g4)
        return _gated_update(self.transform(torch.cat([g, hidden.to(g.dtype)], 1)), hidden)


class ValueEncoder(nn.Module):
    """ResNet-18 (layers up to 3) on [RGB, object mask, other objects' masks], fused with f16."""

    def __init__(self, value_dim: int, hidden_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(5, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = make_stage(BasicBlock, 64, 64, 2, stride=1)
        self.layer2 = make_stage(BasicBlock, 64, 128, 2, stride=2)
        self.layer3 = make_stage(BasicBlock, 128, 256, 2, stride=2)
        self.fuser = FeatureFusionBlock(1024, 256, value_dim, value_dim)
        self.hidden_reinforce = HiddenReinforcer(value_dim, hidden_dim)

    def stem(self, image: Tensor, masks: Tensor) -> Tensor:
        """conv1 + bn1 + ReLU + max pool; the RGB part of conv1 is computed once for all objects.

        image: (1, 3, H, W); masks: (K, 2, H, W) object mask and other objects' masks.
        """
        scale, bias = folded_batch_norm(self.bn1)
        weight = self.conv1.weight * scale.view(-1, 1, 1, 1)
        rgb = F.conv2d(image, weight[:, :3], bias, stride=2, padding=3)
        x = F.conv2d(masks, weight[:, 3:], None, stride=2, padding=3) + rgb
        # XMem pools before the ReLU; both orders give the same result.
        return F.max_pool2d(F.relu(x), kernel_size=3, stride=2, padding=1)

    def forward(
        self, image: Tensor, f16: Tensor, masks: Tensor, hidden: Tensor, deep_update: bool
    ) -> tuple[Tensor, Tensor | None]:
        """masks (K, H, W) probabilities, hidden (K, Ch, h, w) -> value (K, Cv, h, w), hidden."""
        others = (
            masks.sum(0, keepdim=True) - masks if masks.shape[0] > 1 else torch.zeros_like(masks)
        )
        masks = torch.stack([masks, others], dim=1).to(image.dtype)
        g = torch.cat(
            [
                self.layer3(self.layer2(self.layer1(self.stem(image, chunk))))
                for chunk in masks.split(OBJECTS_PER_BATCH)
            ]
        )
        value = self.fuser(f16, g)
        new_hidden = self.hidden_reinforce(value, hidden) if deep_update else None
        return value, new_hidden


class KeyProjection(nn.Module):
    """Key, shrinkage and selection heads on f16 (3x3 convolutions)."""

    def __init__(self, in_channels: int, key_dim: int):
        super().__init__()
        self.key_proj = Conv3x3(in_channels, key_dim)
        self.d_proj = Conv3x3(in_channels, 1)
        self.e_proj = Conv3x3(in_channels, key_dim)

    def forward(
        self, f16: Tensor, need_shrinkage: bool, need_selection: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        key = self.key_proj(f16).float()
        shrinkage = self.d_proj(f16).float() ** 2 + 1 if need_shrinkage else None
        selection = torch.sigmoid(self.e_proj(f16).float()) if need_selection else None
        return key, shrinkage, selection


class UpsampleBlock(nn.Module):
    """Decoder stage: skip convolution of the frame feature + bilinear x2 of the coarser output."""

    def __init__(self, skip_channels: int, up_channels: int, out_channels: int):
        super().__init__()
        self.skip_conv = Conv3x3(skip_channels, up_channels)
        self.out_conv = GroupResBlock(up_channels, out_channels)

    def forward(self, projected_skip: Tensor, coarse: Tensor) -> Tensor:
        """projected_skip: `skip_conv` of the frame feature, (1, Cu, 2h, 2w), computed once per
        frame for all objects; coarse: (K, Cu, h, w)."""
        up = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
        return self.out_conv(up + projected_skip)


class Decoder(nn.Module):
    """Memory readout + sensory memory + frame features -> per-object mask logits."""

    def __init__(self, value_dim: int, hidden_dim: int):
        super().__init__()
        self.fuser = FeatureFusionBlock(1024, value_dim + hidden_dim, 512, 512)
        self.hidden_update = HiddenUpdater(hidden_dim)
        self.up_16_8 = UpsampleBlock(512, 512, 256)
        self.up_8_4 = UpsampleBlock(256, 256, 256)
        self.pred = Conv3x3(256, 1)

    def forward(
        self,
        features: KeyFeatures,
        readout: Tensor,
        hidden: Tensor,
        update_hidden: bool,
    ) -> tuple[Tensor | None, Tensor]:
        """readout (K, Cv, h, w), hidden (K, Ch, h, w) -> new hidden or None, logits (K, H, W)."""
        object_features = torch.cat([readout, hidden], dim=1).to(features.f16.dtype)
        g16 = self.fuser(features.f16, object_features)
        skip8 = self.up_16_8.skip_conv(features.f8)
        skip4 = self.up_8_4.skip_conv(features.f4)
        new_hidden, logits = [], []
        for start in range(0, g16.shape[0], OBJECTS_PER_BATCH):
            chunk = slice(start, start + OBJECTS_PER_BATCH)
            g8 = self.up_16_8(skip8, g16[chunk])
            g4 = self.up_8_4(skip4, g8)
            chunk_logits = self.pred(F.relu(g4))
            if update_hidden:
                update = self.hidden_update(g16[chunk], g8, g4, chunk_logits, hidden[chunk])
                new_hidden.append(update)
            logits.append(_upsample4(chunk_logits.float()))
        return torch.cat(new_hidden) if update_hidden else None, torch.cat(logits)[:, 0]


class XMemNetwork(nn.Module):
    """The three networks of XMem behind the calls the inference loop makes."""

    def __init__(self, key_dim: int = 64, value_dim: int = 512, hidden_dim: int = 64):
        super().__init__()
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.hidden_dim = hidden_dim
        self.key_encoder = KeyEncoder()
        self.value_encoder = ValueEncoder(value_dim, hidden_dim)
        self.key_proj = KeyProjection(1024, key_dim)
        self.decoder = Decoder(value_dim, hidden_dim)

    def encode_key(
        self, image: Tensor, *, need_shrinkage: bool, need_selection: bool
    ) -> KeyFeatures:
        """image: (1, 3, H, W) normalised and padded -> key, shrinkage, selection, f16/f8/f4."""
        if image.shape[-2] % 16 or image.shape[-1] % 16:
            raise ValueError(
                f"image size {tuple(image.shape[-2:])} is not padded to multiples of 16"
            )
        f16, f8, f4 = self.key_encoder(image)
        key, shrinkage, selection = self.key_proj(f16, need_shrinkage, need_selection)
        return KeyFeatures(key, shrinkage, selection, f16, f8, f4)

    def encode_value(
        self, image: Tensor, f16: Tensor, hidden: Tensor, masks: Tensor, *, deep_update: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Value of every object for the memory, and the deep-updated hidden state if asked.

        image (1, 3, H, W); f16 (1, 1024, h, w); hidden (1, K, Ch, h, w); masks (1, K, H, W)
        object probabilities -> value (1, K, Cv, h, w), hidden (1, K, Ch, h, w) or None.
        """
        value, new_hidden = self.value_encoder(image, f16, masks[0], hidden[0], deep_update)
        value = value.float().unsqueeze(0)
        return value, None if new_hidden is None else new_hidden.unsqueeze(0)

    def segment(
        self, features: KeyFeatures, readout: Tensor, hidden: Tensor, *, update_hidden: bool
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Decode the masks of all objects from the memory readout.

        readout (1, K, Cv, h, w), hidden (1, K, Ch, h, w) -> new hidden (1, K, Ch, h, w) or
        None, logits (1, K, H, W), probabilities (1, K+1, H, W) soft-aggregated, background first.
        """
        new_hidden, logits = self.decoder(features, readout[0], hidden[0], update_hidden)
        logits = logits.unsqueeze(0)
        probs = soft_aggregate(torch.sigmoid(logits), dim=1)
        return None if new_hidden is None else new_hidden.unsqueeze(0), logits, probs
