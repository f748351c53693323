"""A weight-free propagation engine: dense optical flow (OpenCV DIS) carries each object's soft
mask from one frame to the next.

Every tracker works at a reduced "working" resolution (flow is the costly part) and returns
probabilities resized back to the source resolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch

from ..errors import InputError

PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


class FlowEngine:
    """Settings shared by every pass; holds no weights."""

    name = "flow"

    def __init__(self, *, preset: str, work_height: int):
        self.preset = preset
        self.work_height = work_height

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "flow",
            "weights": None,
            "sha256": None,
            "settings": {"preset": self.preset, "work_height": self.work_height},
        }

    def new_tracker(self, num_frames: int | None) -> FlowTracker:
        return FlowTracker(self)


class FlowTracker:
    """One pass: warps the previous frame's soft masks into the current frame."""

    def __init__(self, engine: FlowEngine):
        self.engine = engine
        self.object_ids: list[int] = []
        self._flow = cv2.DISOpticalFlow_create(PRESETS[engine.preset])
        self._previous_grey: np.ndarray | None = None
        self._soft: dict[int, np.ndarray] = {}  # object id -> (h, w) float32 at working size
        self._work_size: tuple[int, int] | None = None  # (width, height) for cv2

    def step(
        self,
        frame: np.ndarray,
        prompt: Mapping[int, np.ndarray] | None = None,
        *,
        last: bool = False,
    ) -> torch.Tensor:
        height, width = frame.shape[:2]
        if self._work_size is None:
            work_height = min(self.engine.work_height, height)
            self._work_size = (max(1, round(width * work_height / height)), work_height)
        grey = cv2.cvtColor(
            cv2.resize(frame, self._work_size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY
        )
        if self._previous_grey is not None and self._soft:
            self._warp_masks(grey)
        self._apply_prompt(prompt or {})
        self._previous_grey = grey
        return self._probabilities((height, width), prompt or {})

    def _warp_masks(self, grey: np.ndarray) -> None:
        """Pull every soft mask from the previous frame along the flow current -> previous."""
        flow = self._flow.calc(grey, self._previous_grey, None)
        h, w = grey.shape
        grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
        for object_id, soft in self._soft.items():
            warped = cv2.remap(
                soft, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
            # bilinear warping blurs edges a little every frame; steepen them back
            self._soft[object_id] = np.clip((warped - 0.5) * 2 + 0.5, 0, 1)

    def _apply_prompt(self, prompt: Mapping[int, np.ndarray]) -> None:
        """Set prompted objects to their masks; their pixels are removed from other objects."""
        for object_id, mask in prompt.items():
            if object_id not in self.object_ids:
                self.object_ids.append(object_id)
            small = cv2.resize(
                mask.astype(np.float32), self._work_size, interpolation=cv2.INTER_AREA
            )
            self._soft[object_id] = small
            for other_id in self._soft:
                if other_id not in prompt:
                    self._soft[other_id] = self._soft[other_id] * (1 - small)

    def _probabilities(
        self, shape: tuple[int, int], prompt: Mapping[int, np.ndarray]
    ) -> torch.Tensor:
        """(1 + K, H, W) at source size: background = no object; prompted channels exact."""
        height, width = shape
        foreground = np.zeros((len(self.object_ids), height, width), dtype=np.float32)
        for channel, object_id in enumerate(self.object_ids):
            if object_id in prompt:
                foreground[channel] = prompt[object_id]
            else:
                foreground[channel] = cv2.resize(
                    self._soft[object_id], (width, height), interpolation=cv2.INTER_LINEAR
                )
        np.clip(foreground, 0, 1, out=foreground)
        if prompt:  # a person's mask wins over propagated objects on its pixels
            prompted = np.any([mask for mask in prompt.values()], axis=0)
            for channel, object_id in enumerate(self.object_ids):
                if object_id not in prompt:
                    foreground[channel][prompted] = 0
        background = np.prod(1 - foreground, axis=0, keepdims=True)
        probs = np.concatenate([background, foreground])
        probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-7)
        return torch.from_numpy(probs)


def load_flow_engine(*, preset: str = "medium", work_height: int = 240) -> FlowEngine:
    """The weight-free flow engine.

    preset: DIS optical-flow preset, "ultrafast", "fast" or "medium" (slower, more accurate).
    work_height: frames are resized to this height (keeping the aspect ratio) for the flow and
    the mask warping; the probabilities come back at the source resolution.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown flow preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if int(work_height) < 16:
        raise InputError(f"flow work_height must be at least 16, not {work_height}")
    return FlowEngine(preset=preset, work_height=int(work_height))
