"""One XMem propagation pass: the per-frame loop of the official evaluation (eval.py and
InferenceCore.step), as a `Tracker`.

Per frame: encode the key; if some object is not given by a person on this frame, read the
memory and decode the masks (updating the sensory memory on ordinary frames); overlay the
person's masks; on memory frames (every `mem_every` frames, and every prompted frame) encode the
values, deep-update the sensory memory and write to working memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .memory import MemoryManager
from .network import XMemNetwork, soft_aggregate
from .settings import XMemSettings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrameGeometry:
    """How a source frame maps to the network's input: resize to the internal short side, then
    zero-pad to multiples of 16 (centred, the odd pixel right/bottom), and back."""

    def __init__(self, source_hw: tuple[int, int], short_side: int):
        height, width = source_hw
        self.source_hw = source_hw
        if short_side > 0 and min(height, width) != short_side:
            scale = short_side / min(height, width)
            self.resized_hw = (round(height * scale), round(width * scale))
        else:
            self.resized_hw = source_hw
        pad_h, pad_w = (-self.resized_hw[0]) % 16, (-self.resized_hw[1]) % 16
        self.padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)

    @property
    def resized(self) -> bool:
        return self.resized_hw != self.source_hw

    def image_to_network(self, image: Tensor) -> Tensor:
        """(1, 3, H, W) normalised float -> resized and padded."""
        if self.resized:
            downscale = self.resized_hw[0] < self.source_hw[0]
            image = F.interpolate(
                image,
                size=self.resized_hw,
                mode="bilinear",
                align_corners=False,
                antialias=downscale,
            )
        return F.pad(image, self.padding)

    def mask_to_network(self, masks: Tensor) -> Tensor:
        """(K, H, W) float masks -> nearest-resized and padded."""
        if self.resized:
            masks = F.interpolate(masks.unsqueeze(0), size=self.resized_hw, mode="nearest")[0]
        return F.pad(masks, self.padding)

    def probs_to_source(self, probs: Tensor) -> Tensor:
        """(1, C, Hp, Wp) padded probabilities -> (C, H, W) at the source resolution."""
        left, right, top, bottom = self.padding
        probs = probs[..., top : probs.shape[-2] - bottom, left : probs.shape[-1] - right]
        if self.resized:
            probs = F.interpolate(probs, size=self.source_hw, mode="bilinear", align_corners=False)
        return probs[0]


class LoadedNetwork(Protocol):
    """What a pass needs of the engine that starts it (engine.py's XMemEngine): the network
    with its settings and device, the image preparation and the context of network calls.
    Named here so that this module needs nothing of engine.py, which imports it."""

    network: XMemNetwork
    settings: XMemSettings
    device: torch.device

    def prepare_image(self, frame: np.ndarray, geometry: FrameGeometry) -> Tensor: ...

    def network_context(self) -> contextlib.ExitStack: ...


class XMemTracker:
    """A pass over one clip in one direction; holds that pass's sensory and memory state."""

    def __init__(self, engine: LoadedNetwork, num_frames: int | None):
        self.engine = engine
        self.settings = settings = engine.settings
        self.object_ids: list[int] = []
        self.memory = MemoryManager(
            top_k=settings.top_k,
            enable_long_term=settings.enable_long_term,
            count_long_term_usage=settings.count_usage(num_frames),
            min_mid_term_frames=settings.min_mid_term_frames,
            max_mid_term_frames=settings.max_mid_term_frames,
            num_prototypes=settings.num_prototypes,
            max_long_term_elements=settings.max_long_term_elements,
        )
        self.hidden: Tensor | None = None  # sensory memory (1, K, Ch, h, w)
        self.frame_count = 0
        self.last_memory_frame = 0
        self.last_deep_update = -settings.deep_update_every
        self._geometry: FrameGeometry | None = None

    @torch.inference_mode()
    def step(
        self,
        frame: np.ndarray,
        prompt: Mapping[int, np.ndarray] | None = None,
        *,
        last: bool = False,
    ) -> Tensor:
        """See `Tracker.step`."""
        t = self.frame_count
        self.frame_count += 1
        settings, network = self.settings, self.engine.network
        if self._geometry is None:
            self._geometry = FrameGeometry(frame.shape[:2], settings.size)
        geometry = self._geometry
        prompt = dict(prompt or {})
        new_ids = [obj for obj in prompt if obj not in self.object_ids]
        if not self.object_ids and not new_ids:  # nothing to track yet
            return torch.ones((1, *geometry.source_hw), device=self.engine.device)

        is_memory_frame = t - self.last_memory_frame >= settings.mem_every or bool(prompt)
        is_memory_frame = is_memory_frame and not last
        need_segment = bool(self.object_ids) and len(prompt) != len(self.object_ids) + len(new_ids)
        if settings.deep_update_every < 0:
            is_deep_update = is_memory_frame
            is_normal_update = not is_deep_update and not last
        else:
            is_deep_update = (t - self.last_deep_update >= settings.deep_update_every) and not last
            is_normal_update = not last

        image = self.engine.prepare_image(frame, geometry)
        with self.engine.network_context():
            features = network.encode_key(
                image,
                need_shrinkage=is_memory_frame,
                need_selection=settings.enable_long_term or need_segment,
            )
        probs = None
        if need_segment:
            # asked for above (need_selection); the hidden state exists once objects do
            assert features.selection is not None and self.hidden is not None
            readout = self.memory.read(features.key, features.selection)
            with self.engine.network_context():
                hidden, _, probs = network.segment(
                    features, readout, self.hidden, update_hidden=is_normal_update
                )
            if is_normal_update:
                self.hidden = hidden
        if prompt:
            probs = self._apply_prompt(probs, prompt, new_ids, geometry, image.device)
        assert probs is not None  # segmented, or every object given by the prompt
        if is_memory_frame:
            # asked for on memory frames (need_shrinkage); the hidden state exists with objects
            assert features.shrinkage is not None and self.hidden is not None
            with self.engine.network_context():
                value, hidden = network.encode_value(
                    image, features.f16, self.hidden, probs[:, 1:], deep_update=is_deep_update
                )
            self.memory.write(features.key, features.shrinkage, features.selection, value)
            self.last_memory_frame = t
            if is_deep_update:
                self.hidden = hidden
                self.last_deep_update = t
        return geometry.probs_to_source(probs)

    def _apply_prompt(
        self,
        predicted: Tensor | None,
        prompt: dict[int, np.ndarray],
        new_ids: list[int],
        geometry: FrameGeometry,
        device: torch.device,
    ) -> Tensor:
        """Overlay a person's masks: prompted objects take their masks, the others keep their
        prediction outside the prompted pixels. New objects get a zero sensory memory."""
        all_ids = self.object_ids + new_ids
        given = torch.from_numpy(np.stack([prompt[obj] for obj in prompt])).to(device)
        given = geometry.mask_to_network(given.float())
        masks = given.new_zeros((len(all_ids), *given.shape[1:]))
        prompted_channels = [all_ids.index(obj) for obj in prompt]
        masks[prompted_channels] = given
        if predicted is not None:
            uncovered = (given.sum(0) <= 0.5).to(masks.dtype)
            for channel in range(len(self.object_ids)):
                if channel not in prompted_channels:
                    masks[channel] = predicted[0, channel + 1] * uncovered
        if new_ids:
            hidden_shape = (
                1,
                len(new_ids),
                self.engine.network.hidden_dim,
                *(s // 16 for s in masks.shape[-2:]),
            )
            zeros = torch.zeros(hidden_shape, device=device)
            self.hidden = zeros if self.hidden is None else torch.cat([self.hidden, zeros], 1)
            self.object_ids = all_ids
        return soft_aggregate(masks.unsqueeze(0), dim=1)
