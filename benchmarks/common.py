"""What the benchmarks share: a synthetic clip, synthetic XMem weights, memory and time probes.

Speed does not depend on the weights' values, so the deterministic weights of the equivalence
fixtures stand in for the official checkpoint (which cannot be downloaded here).
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import statistics
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from xmem_label.backend.rle import mask_to_rle
from xmem_label.model.frames import RandomAccessSource

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "xmem_reference"


class SyntheticClip(RandomAccessSource):
    """A textured background panning under a moving ellipse; frame i is computed on demand,
    so a 10,000-frame clip costs no memory and no disk."""

    def __init__(self, num_frames: int, height: int, width: int):
        self.num_frames, self.height, self.width = num_frames, height, width
        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
        self.texture = cv2.resize(noise, (width * 2, height * 2), interpolation=cv2.INTER_CUBIC)

    def __len__(self) -> int:
        return self.num_frames

    def read(self, index: int) -> np.ndarray:
        phase = index % 400 / 400 * 2 * np.pi  # loops, so a long clip stays in range
        dx = int((np.sin(phase) + 1) / 2 * self.width)
        dy = int((np.cos(phase) + 1) / 2 * self.height)
        frame = self.texture[dy : dy + self.height, dx : dx + self.width].copy()
        center = self.object_center(index)
        cv2.ellipse(frame, center, self.axes, 0, 0, 360, (230, 40, 40), -1)
        return frame

    @property
    def axes(self) -> tuple[int, int]:
        return self.width // 8, self.height // 5

    def object_center(self, index: int) -> tuple[int, int]:
        phase = index % 200 / 200 * 2 * np.pi
        return (
            int(self.width / 2 + np.sin(phase) * self.width / 4),
            int(self.height / 2 + np.cos(phase) * self.height / 6),
        )

    def first_mask(self, num_objects: int) -> np.ndarray:
        """The ellipse on frame 0, split into `num_objects` vertical strips (ids 1..n), as the
        reference's timing runs split their mask."""
        mask = np.zeros((self.height, self.width), np.uint8)
        cv2.ellipse(mask, self.object_center(0), self.axes, 0, 0, 360, 1, -1)
        ys, xs = np.nonzero(mask)
        edges = np.linspace(xs.min(), xs.max() + 1, num_objects + 1)
        labels = np.zeros_like(mask)
        for object_id in range(1, num_objects + 1):
            in_strip = (xs >= edges[object_id - 1]) & (xs < edges[object_id])
            labels[ys[in_strip], xs[in_strip]] = object_id
        return labels


def painted_region(mask: np.ndarray, label: str, frame: int = 0) -> dict:
    """A person's brush region in Label Studio's format: `mask` painted by hand on `frame`,
    under the names the benchmarks' label configs use (BrushLabels "mask" on Image "image")."""
    height, width = mask.shape
    return {
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "item_index": frame,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "origin": "manual",
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
    }


def synthetic_checkpoint() -> Path:
    """The equivalence fixtures' deterministic weights (seed 1), made once per machine."""
    path = Path(tempfile.gettempdir()) / "xmem-label-bench-weights-seed1.pth"
    if not path.exists():
        rule = runpy.run_path(str(FIXTURES / "make_weights.py"))
        manifest = json.loads((FIXTURES / "state_dict_manifest.json").read_text())
        partial = path.with_suffix(".partial")
        torch.save(rule["make_state_dict"](manifest, 1), partial)
        partial.replace(path)
    return path


def current_rss_mb() -> float:
    """Resident memory of this process now, in MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def describe_times(seconds: list[float]) -> str:
    return (
        f"median {statistics.median(seconds):.3f} s/frame "
        f"(min {min(seconds):.3f}, max {max(seconds):.3f}), "
        f"{1 / statistics.median(seconds):.2f} frames/s"
    )


def _fused_convolution_flops(x_shape, second, third, *_, out_shape, **__):
    # (x, weight, bias, ...), or for a fused sum (x, other, weight, ...), other shaped as out
    w_shape = third if tuple(second) == tuple(out_shape) else second
    return 2 * out_shape.numel() * w_shape[1] * w_shape[2] * w_shape[3]


def _int8_convolution_flops(x_shape, _x_scale, _x_zero_point, w_shape, *_, out_shape, **__):
    out_channels, in_channels, kernel_h, kernel_w = w_shape
    return 2 * out_shape.numel() * in_channels * kernel_h * kernel_w


def counting_flops() -> FlopCounterMode:
    """PyTorch's FLOP counter, taught the oneDNN convolutions it does not know: int8 (the "int8"
    precision) and float32 with a fused ReLU or sum (exact mode's backbones): 2 operations per
    multiply-add, as for the others."""
    int8_convolution = getattr(torch.ops.onednn, "qconv2d_pointwise", None)
    if int8_convolution is not None and int8_convolution not in flop_registry:
        register_flop_formula(int8_convolution)(_int8_convolution_flops)
    fused = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if fused is not None and fused not in flop_registry:
        register_flop_formula(fused)(_fused_convolution_flops)
    return FlopCounterMode(display=False)
