"""Two baselines the flow engine is measured against (`python -m benchmarks.quality`, the
accuracy test): copying the keyframe's mask to every frame (the lower bound) and chaining
backward DIS optical flow from the previous frame's hard mask. They keep the engine contract
(model/engine.py) with no weights and a few lines each.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch

from .engine import EngineDescription


class DisWarpTracker:
    """Baseline pass: each object's mask is pulled from the previous frame along the backward
    DIS flow and thresholded at 0.5."""

    def __init__(self, warp: bool = True):
        self.object_ids: list[int] = []
        self._warp = warp
        self._flow = cv2.DISOpticalFlow_create(  # type: ignore[attr-defined]
            cv2.DISOPTICAL_FLOW_PRESET_MEDIUM
        )
        self._previous_grey: np.ndarray | None = None
        self._masks: dict[int, np.ndarray] = {}

    def step(
        self,
        frame: np.ndarray,
        prompt: Mapping[int, np.ndarray] | None = None,
        *,
        last: bool = False,
    ) -> torch.Tensor:
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if self._warp and self._previous_grey is not None and self._masks:
            flow = self._flow.calc(grey, self._previous_grey, None)
            h, w = grey.shape
            grid_x, grid_y = np.meshgrid(
                np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
            )
            map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
            for object_id, mask in self._masks.items():
                warped = cv2.remap(
                    mask,
                    map_x,
                    map_y,
                    cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT,
                    borderValue=0,
                )
                self._masks[object_id] = (warped >= 0.5).astype(np.float32)
        for object_id, mask in (prompt or {}).items():
            if object_id not in self.object_ids:
                self.object_ids.append(object_id)
            self._masks[object_id] = mask.astype(np.float32)
        self._previous_grey = grey
        foreground = np.stack([self._masks[obj] for obj in self.object_ids])
        background = np.prod(1 - foreground, axis=0, keepdims=True)
        probs = np.concatenate([background, foreground])
        return torch.from_numpy(probs / np.maximum(probs.sum(0, keepdims=True), 1e-7))


class DisWarpEngine:
    name = "dis-warp baseline"

    def describe(self) -> EngineDescription:
        return EngineDescription(engine=self.name, settings={})

    def new_tracker(self, num_frames: int | None) -> DisWarpTracker:
        return DisWarpTracker()


class CopyFirstMaskEngine(DisWarpEngine):
    """Lower bound: every frame gets the keyframe's mask unchanged."""

    name = "copy first mask"

    def new_tracker(self, num_frames: int | None) -> DisWarpTracker:
        return DisWarpTracker(warp=False)
