"""Code paths that matter on a GPU, checked on the CPU (there is no GPU here): no host
synchronisation in the per-frame loop, channels-last input, autocast, torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xmem_label.model import load_engine

# Operators that make the host wait for the device when their input lives there.
SYNCING_OPERATORS = ("aten._local_scalar_dense", "aten.nonzero", "aten.equal")


class SyncRecorder(TorchDispatchMode):
    """Records syncing operators applied to floating-point tensors (device data; the memory's
    bool validity masks are host-side bookkeeping and never live on the device)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNCING_OPERATORS and any(
            isinstance(a, torch.Tensor) and a.is_floating_point() for a in args
        ):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tiny_engine(xmem_weights_path):
    return load_engine("xmem", weights=xmem_weights_path, size=-1, device="cpu")


def test_per_frame_loop_never_reads_device_values(tiny_engine):
    """Ordinary and memory frames (no consolidation yet): no .item(), no nonzero on data."""
    generator = np.random.default_rng(0)
    frames = [generator.integers(0, 255, (64, 96, 3), dtype=np.uint8) for _ in range(7)]
    mask = np.zeros((64, 96), bool)
    mask[10:40, 20:60] = True
    tracker = tiny_engine.new_tracker(len(frames))
    tracker.step(frames[0], {1: mask})
    recorder = SyncRecorder()
    with recorder:
        for frame in frames[1:]:  # frame 5 is a memory frame
            tracker.step(frame)
    assert tracker.memory.working.size == 2 * 4 * 6
    assert recorder.calls == []


def test_input_is_channels_last_and_fast_mode_is_autocast(xmem_weights_path, tiny_engine):
    from xmem_label.model.xmem.inference import FrameGeometry

    frame = np.zeros((50, 70, 3), np.uint8)
    image = tiny_engine.prepare_image(frame, FrameGeometry((50, 70), -1))
    assert image.shape == (1, 3, 64, 80)
    assert image.is_contiguous(memory_format=torch.channels_last)
    fast = load_engine("xmem", weights=xmem_weights_path, device="cpu", precision="bf16")
    with fast.network_context():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_compile_option_wraps_the_three_networks(xmem_weights_path):
    engine = load_engine(
        "xmem", weights=xmem_weights_path, device="cpu", precision="bf16", compile=True
    )
    for part in ("key_encoder", "value_encoder", "decoder"):
        assert hasattr(getattr(engine.network, part), "_orig_mod")


def test_unavailable_precision_is_refused(xmem_weights_path):
    from xmem_label.model import InputError

    with pytest.raises(InputError, match="fp16"):
        load_engine("xmem", weights=xmem_weights_path, device="cpu", precision="fp16")
