"""XMem network and checkpoint loading against tests/fixtures/xmem_reference.

The fixture tensors were computed by the official implementation with the seed-1 synthetic
weights; an intermediate matches when max|ours - fixture| / max|fixture| <= 2e-3 (float16 storage
alone accounts for ~5e-4, the smallest deliberate bug tried for ~4e-2).
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from xmem_label.model.allocator import keep_freed_memory
from xmem_label.model.errors import WeightsError
from xmem_label.model.xmem import backbones
from xmem_label.model.xmem import network as network_module
from xmem_label.model.xmem.backbones import BasicBlock, Bottleneck
from xmem_label.model.xmem.checkpoint import build_network, load_state_dict
from xmem_label.model.xmem.network import XMemNetwork, soft_aggregate

TOLERANCE = 2e-3
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
PAD_LEFT, PAD_RIGHT = 4, 5  # 311 -> 320 columns, no rows (fixture_meta.json "padding")
TOP_K = 30
BF16_MAX_PROB_DIFFERENCE = 0.03  # fast mode vs float32, frame 1 (0.016 measured)


def relative_error(ours: torch.Tensor, reference: np.ndarray) -> float:
    reference = torch.from_numpy(reference.astype(np.float32))
    return float((ours.float() - reference).abs().max() / reference.abs().max())


def load_frame(fixture_dir, index: int) -> torch.Tensor:
    """The fixture's preprocessing: /255, ImageNet normalisation, zero padding to (240, 320)."""
    rgb = np.asarray(
        Image.open(fixture_dir / "clip" / "frames" / f"{index:05d}.png").convert("RGB")
    )
    image = (torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255 - MEAN) / STD
    return torch.nn.functional.pad(image, (PAD_LEFT, PAD_RIGHT, 0, 0)).unsqueeze(0)


def first_frame_masks(fixture_dir) -> torch.Tensor:
    """(1, 3, 240, 320): the annotation one-hot, padded, soft-aggregated as the reference does."""
    labels = torch.from_numpy(np.array(Image.open(fixture_dir / "clip" / "mask_00000.png")))
    one_hot = torch.stack([labels == k for k in (1, 2, 3)]).float()
    one_hot = torch.nn.functional.pad(one_hot, (PAD_LEFT, PAD_RIGHT, 0, 0))
    return soft_aggregate(one_hot.unsqueeze(0), dim=1)[:, 1:]


def top_k_readout(memory, query_key, query_selection, reference_c64):
    """Frame 1's memory read with frame 0 as the only memory (the reference's dense top-k path).

    Where the 30th and 31st similarities of a pixel are closer than float32 noise can separate
    (1e-4 relative), the reference's choice cannot be reproduced from the keys alone: there the
    candidate whose first 64 channels are closer to the fixture's is used.
    """
    memory_key, memory_shrinkage, memory_value = memory
    keys = memory_key.flatten(2)[0]  # (Ck, N)
    shrinkage = memory_shrinkage.flatten(2)[0, 0]  # (N,)
    query = query_key.flatten(2)[0]  # (Ck, HW)
    selection = query_selection.flatten(2)[0]
    # The reference's expanded form of sum_c e (k - q)^2.
    distance = (keys**2).T @ selection - 2 * keys.T @ (query * selection)
    distance = distance + (selection * query**2).sum(0, keepdim=True)
    similarity = -distance * shrinkage[:, None] / keys.shape[0] ** 0.5  # (N, HW)
    values = memory_value[0].flatten(2)  # (K, Cv, N)

    def read(indices: torch.Tensor) -> torch.Tensor:  # indices (TOP_K, HW) -> (K, Cv, HW)
        weights = torch.softmax(similarity.gather(0, indices), dim=0)
        affinity = torch.zeros_like(similarity).scatter_(0, indices, weights)
        return values @ affinity

    ranked = similarity.topk(TOP_K + 1, dim=0)
    readout = read(ranked.indices[:TOP_K])
    gap = ranked.values[TOP_K - 1] - ranked.values[TOP_K]
    near_ties = (gap < 1e-4 * ranked.values[TOP_K - 1].abs()).nonzero()[:, 0]
    if len(near_ties):
        swapped = ranked.indices[:TOP_K].clone()
        swapped[TOP_K - 1] = ranked.indices[TOP_K]
        alternative = read(swapped)
        target = torch.from_numpy(reference_c64.astype(np.float32)).flatten(2)
        for pixel in near_ties:
            error = (readout[:, :64, pixel] - target[:, :, pixel]).abs().max()
            if (alternative[:, :64, pixel] - target[:, :, pixel]).abs().max() < error:
                readout[:, :, pixel] = alternative[:, :, pixel]
    return readout.view(1, *values.shape[:2], *query_key.shape[-2:])


@pytest.fixture(scope="module")
def network(xmem_weights_path) -> XMemNetwork:
    return build_network(load_state_dict(xmem_weights_path))


@pytest.fixture(scope="module")
def reference(xmem_fixture_dir):
    return dict(np.load(xmem_fixture_dir / "intermediates.npz"))


def run_two_frames(network, fixture_dir, reference, *, channels_last=False, bf16=False):
    """Frames 0 and 1 as the reference loop runs them (frame 0 annotated, frame 1 segmented)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), precision:
        image0, image1 = (
            load_frame(fixture_dir, index).contiguous(memory_format=memory_format)
            for index in (0, 1)
        )
        frame0 = network.encode_key(image0, need_shrinkage=True, need_selection=True)
        frame1 = network.encode_key(image1, need_shrinkage=True, need_selection=True)
        masks = first_frame_masks(fixture_dir)
        hidden = torch.zeros(1, 3, network.hidden_dim, 15, 20)
        value0, hidden0 = network.encode_value(image0, frame0.f16, hidden, masks, deep_update=True)
        memory = (frame0.key, frame0.shrinkage, value0)
        with torch.autocast("cpu", enabled=False):  # the memory read is not the network's
            readout1 = top_k_readout(
                memory, frame1.key, frame1.selection, reference["readout1_c64"]
            )
        hidden1, logits1, prob1 = network.segment(frame1, readout1, hidden0, update_hidden=True)
    return {
        "frames": (frame0, frame1),
        "image1": image1,
        "value0": value0,
        "hidden0": hidden0,
        "readout1": readout1,
        "hidden1": hidden1,
        "logits1": logits1,
        "prob1": prob1,
    }


@pytest.fixture(scope="module")
def two_frames(network, reference, xmem_fixture_dir):
    torch.set_num_threads(1)
    return run_two_frames(network, xmem_fixture_dir, reference)


def test_state_dict_layout_matches_the_official_network(xmem_fixture_dir):
    manifest = json.loads((xmem_fixture_dir / "state_dict_manifest.json").read_text())
    ours = [
        [key, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]
        for key, tensor in XMemNetwork().state_dict().items()
    ]
    assert ours == manifest


@pytest.mark.parametrize("frame", [0, 1])
def test_key_encoder_matches_reference(two_frames, reference, frame):
    features = two_frames["frames"][frame]
    ours = {
        f"key{frame}": features.key[0],
        f"shrinkage{frame}": features.shrinkage[0],
        f"selection{frame}": features.selection[0],
        f"f16_{frame}_c8": features.f16[0, :8],
        f"f8_{frame}_c8": features.f8[0, :8],
        f"f4_{frame}_c8": features.f4[0, :8],
    }
    for name, tensor in ours.items():
        assert tuple(tensor.shape) == reference[name].shape, name
        assert relative_error(tensor, reference[name]) <= TOLERANCE, name


def test_value_encoder_matches_reference(two_frames, reference):
    assert relative_error(two_frames["value0"][0], reference["value0"]) <= TOLERANCE
    assert relative_error(two_frames["hidden0"][0], reference["hidden0"]) <= TOLERANCE


def test_decoder_matches_reference(two_frames, reference):
    readout = two_frames["readout1"][0, :, :64]
    assert relative_error(readout, reference["readout1_c64"]) <= TOLERANCE
    assert relative_error(two_frames["hidden1"][0], reference["hidden1"]) <= TOLERANCE
    prob = two_frames["prob1"][0, :, :, PAD_LEFT:-PAD_RIGHT]
    assert prob.shape == (4, 240, 311)
    assert relative_error(prob, reference["prob1"]) <= TOLERANCE
    assert two_frames["logits1"].shape == (1, 3, 240, 320)


def test_segment_without_hidden_update_returns_no_hidden_state(network, two_frames):
    frame1 = two_frames["frames"][1]
    with torch.inference_mode():
        hidden, _, prob = network.segment(
            frame1, two_frames["readout1"], two_frames["hidden0"], update_hidden=False
        )
        value, no_hidden = network.encode_value(
            two_frames["image1"], frame1.f16, two_frames["hidden0"], prob[:, 1:], deep_update=False
        )
    assert hidden is None and no_hidden is None
    torch.testing.assert_close(prob, two_frames["prob1"])
    assert value.shape == (1, 3, 512, 15, 20) and value.dtype == torch.float32


def test_unpadded_image_is_refused(network):
    with pytest.raises(ValueError, match="multiples of 16"):
        network.encode_key(torch.zeros(1, 3, 40, 33), need_shrinkage=False, need_selection=False)


def test_soft_aggregate_sums_to_one_and_keeps_order():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.0], [1.0, 0.5]]).reshape(1, 3, 2, 1)  # K=3, 2 px
    out = soft_aggregate(probs, dim=1)
    assert out.shape == (1, 4, 2, 1)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 2, 1))
    assert out[0, :, 0, 0].argmax() == 3  # the certain object wins over the background


def test_single_object_checkpoint_gets_a_zero_others_channel(xmem_weights_path):
    state_dict = load_state_dict(xmem_weights_path)
    state_dict["value_encoder.conv1.weight"] = state_dict["value_encoder.conv1.weight"][:, :4]
    network = build_network(state_dict)
    weight = network.value_encoder.conv1.weight
    assert weight.shape == (64, 5, 7, 7)
    assert torch.equal(weight[:, 4], torch.zeros(64, 7, 7))
    assert not network.training and not any(p.requires_grad for p in network.parameters())


def test_network_dims_are_read_from_the_weights():
    small = XMemNetwork(key_dim=32, value_dim=256, hidden_dim=16).state_dict()
    network = build_network(small)
    assert (network.key_dim, network.value_dim, network.hidden_dim) == (32, 256, 16)


@pytest.fixture(scope="module")
def good_state_dict() -> dict[str, torch.Tensor]:
    return XMemNetwork().state_dict()


def test_refuses_missing_key(good_state_dict):
    broken = dict(good_state_dict)
    del broken["decoder.pred.bias"]
    with pytest.raises(WeightsError, match=r"missing 1: decoder\.pred\.bias") as caught:
        build_network(broken)
    assert "\n" not in str(caught.value)


def test_refuses_weights_without_sensory_memory(good_state_dict):
    no_sensory = {key: value for key, value in good_state_dict.items() if "hidden" not in key}
    with pytest.raises(WeightsError, match="without sensory memory"):
        build_network(no_sensory)


def test_refuses_unexpected_key_and_wrong_shape(good_state_dict):
    broken = dict(good_state_dict)
    broken["decoder.extra.weight"] = torch.zeros(1)
    broken["decoder.pred.weight"] = torch.zeros(1, 128, 3, 3)
    with pytest.raises(WeightsError) as caught:
        build_network(broken)
    message = str(caught.value)
    assert "unexpected 1: decoder.extra.weight" in message
    assert "decoder.pred.weight (1, 128, 3, 3) instead of (1, 256, 3, 3)" in message
    assert "\n" not in message


def test_refuses_a_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="is not an XMem state dict"):
        load_state_dict(path)
    path = tmp_path / "mixed.pth"
    torch.save({"a": torch.zeros(1), "b": 3}, path)
    with pytest.raises(WeightsError, match="entry 'b' is not a tensor"):
        load_state_dict(path)


def test_refuses_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="cannot read XMem weights") as caught:
        load_state_dict(garbage)
    assert "\n" not in str(caught.value)
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "absent.pth")


def test_channels_last_is_exact_and_bf16_autocast_stays_close(
    network, two_frames, reference, xmem_fixture_dir
):
    fast = copy.deepcopy(network).to(memory_format=torch.channels_last)
    exact = run_two_frames(fast, xmem_fixture_dir, reference, channels_last=True)
    for name in ("value0", "hidden0", "hidden1"):
        assert relative_error(exact[name][0], reference[name]) <= TOLERANCE, name
    prob = exact["prob1"][0, :, :, PAD_LEFT:-PAD_RIGHT]
    assert relative_error(prob, reference["prob1"]) <= TOLERANCE

    bf16 = run_two_frames(fast, xmem_fixture_dir, reference, channels_last=True, bf16=True)
    for name in ("value0", "hidden0", "hidden1", "logits1", "prob1"):
        assert bf16[name].dtype == torch.float32, name
    assert bf16["frames"][1].key.dtype == torch.float32
    # With random weights the probabilities are soft (a third of the pixels are decided by less
    # than 0.01), so argmax agreement is only meaningful where float32 is clearly decided.
    exact_prob = two_frames["prob1"]
    assert (bf16["prob1"] - exact_prob).abs().max() < BF16_MAX_PROB_DIFFERENCE
    top2 = exact_prob.topk(2, dim=1).values
    decided = top2[:, 0] - top2[:, 1] > BF16_MAX_PROB_DIFFERENCE
    assert torch.equal(bf16["prob1"].argmax(1)[decided], exact_prob.argmax(1)[decided])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning")
def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory() is True
    assert torch.ones(64 << 20, dtype=torch.uint8).sum() == 64 << 20  # large allocations still work


def test_objects_in_several_batches_give_the_same_result(network, monkeypatch):
    objects = network_module.OBJECTS_PER_BATCH + 2
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 64, 96, generator=generator)
    masks = torch.rand(1, objects, 64, 96, generator=generator)
    hidden = torch.randn(1, objects, network.hidden_dim, 4, 6, generator=generator)
    readout = torch.randn(1, objects, network.value_dim, 4, 6, generator=generator)

    def run():
        with torch.inference_mode():
            features = network.encode_key(image, need_shrinkage=False, need_selection=False)
            value, reinforced = network.encode_value(
                image, features.f16, hidden, masks, deep_update=True
            )
            return (
                value,
                reinforced,
                *network.segment(features, readout, hidden, update_hidden=True),
            )

    in_batches = run()
    monkeypatch.setattr(network_module, "OBJECTS_PER_BATCH", objects)
    at_once = run()
    for ours, expected in zip(in_batches, at_once, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", ["bottleneck", "basic"])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=str)
def test_backbone_blocks_with_fused_post_ops_match_the_plain_path(block, memory_format):
    """In float32 inference the ReLU and residual sum run as oneDNN post-ops of the convolution
    (`backbones._fused`); with gradients enabled the same block runs convolution, sum and ReLU
    apart. Both must agree, with a projection shortcut (stride 2) and an identity one."""
    torch.manual_seed(0)
    if block == "bottleneck":
        blocks = torch.nn.Sequential(Bottleneck(64, 32, stride=2), Bottleneck(128, 32))
    else:
        blocks = torch.nn.Sequential(BasicBlock(32, 64, stride=2), BasicBlock(64, 64))
    for bn in (m for m in blocks.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
    blocks.eval()
    x = torch.randn(2, blocks[0].conv1.in_channels, 30, 42).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        assert backbones._fused(x)
        fused = blocks(x)
    plain = blocks(x)  # gradients enabled: F.conv2d, then the sum and the ReLU
    assert plain.requires_grad
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-5, atol=1e-5)
    assert fused.min() == 0  # the ReLU was applied
