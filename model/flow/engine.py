"""A weight-free propagation engine: dense optical flow (OpenCV DIS) carries each object's soft
mask from one frame to the next, and the object's keyframe colours re-anchor it.

Per frame and object: (1) DIS flow both ways at a reduced "working" height (the costly part);
pixels whose round trip does not come back are unreliable (occlusions, disocclusions). (2) The
previous soft mask is pulled along the flow at the higher "mask" height. (3) Its log-odds,
weighted by the reliability (at most 95 % sure), are added to the log-odds of a colour model
learned on the keyframes (object vs the band around it); colour may only add pixels near the
warped mask. (4) A guided filter snaps uncertain edges to image edges. The result, resized to
the source, is the object's probability; the session's confidence is computed from it, so it
falls where flow and colours disagree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch

from ..allocator import keep_freed_memory
from ..engine import EngineDescription, check_threads
from ..errors import InputError

PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


MIN_FLOW_SIZE = 16  # DIS refuses images under 12 px on a side; smaller frames are upscaled
CONFIDENT = 0.9  # probability above which a pixel survives edge snapping unchanged
# The flow alone never makes a pixel more than 95 % sure, so colours that keep contradicting it
# (the background showing where an object has left) win within a few frames.
FLOW_CERTAINTY = 0.95


class FlowEngine:
    """Settings shared by every pass; holds no weights."""

    name = "flow"

    def __init__(self, settings: FlowSettings):
        self.settings = settings

    def describe(self) -> EngineDescription:
        return EngineDescription(engine="flow", settings=dataclasses.asdict(self.settings))

    def new_tracker(self, num_frames: int | None) -> FlowTracker:
        return FlowTracker(self.settings)


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """See `load_flow_engine` for what each setting means."""

    preset: str
    work_height: int
    mask_height: int
    consistency_px: float
    occlusion_logit: float
    colour_weight: float
    colour_bins: int
    search_px: int
    refine_radius: int
    refine_eps: float
    sharpen: float


class _ColourModel:
    """Foreground and nearby-background colour histograms of one object, from its keyframes:
    says how much a colour looks like the object rather than its surroundings."""

    def __init__(self, bins: int):
        self.bins = bins
        self.foreground = np.zeros(bins**3, dtype=np.float64)
        self.background = np.zeros(bins**3, dtype=np.float64)

    def codes(self, image: np.ndarray) -> np.ndarray:
        quantised = (image.astype(np.int32) * self.bins) >> 8
        return (quantised[..., 0] * self.bins + quantised[..., 1]) * self.bins + quantised[..., 2]

    def learn(self, codes: np.ndarray, mask: np.ndarray, band: np.ndarray) -> None:
        """Add a keyframe: object pixels `mask`, background pixels `band` around it."""
        size = self.bins**3
        self.foreground += np.bincount(codes[mask], minlength=size)
        self.background += np.bincount(codes[band], minlength=size)

    def object_odds(self, codes: np.ndarray) -> np.ndarray:
        """P(object | colour) per pixel, from normalised histograms with a small prior."""
        fg = self.foreground / max(self.foreground.sum(), 1) + 1e-4
        bg = self.background / max(self.background.sum(), 1) + 1e-4
        table = (fg / (fg + bg)).astype(np.float32)
        return table[codes]


class FlowTracker:
    """One pass: carries each object's soft mask from the previous frame along the optical flow,
    trusts the flow less where forward and backward flow disagree (occlusions), and lets the
    object's keyframe colours decide there; edges are then snapped to image edges."""

    def __init__(self, settings: FlowSettings):
        self.settings = settings
        self.object_ids: list[int] = []
        self._flow = cv2.DISOpticalFlow_create(PRESETS[settings.preset])  # type: ignore[attr-defined]
        self._previous_grey: np.ndarray | None = None
        self._soft: dict[int, np.ndarray] = {}  # object id -> (h, w) float32 at mask size
        self._colours: dict[int, _ColourModel] = {}
        self._work_size: tuple[int, int] | None = None  # (width, height) of the flow, for cv2
        self._mask_size: tuple[int, int] | None = None  # (width, height) of the masks
        self._scale: np.ndarray = np.ones(2, dtype=np.float32)  # mask size / flow size, (x, y)
        self._pixel_scale = 1.0  # mask pixels per pixel setting (settings assume work_height)

    def step(
        self,
        frame: np.ndarray,
        prompt: Mapping[int, np.ndarray] | None = None,
        *,
        last: bool = False,
    ) -> torch.Tensor:
        prompt = prompt or {}
        height, width = frame.shape[:2]
        if self._work_size is None:
            self._choose_sizes(width, height)
        small = cv2.resize(frame, self._work_size, interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        if self._mask_size == (width, height):
            image = frame
        else:
            image = cv2.resize(frame, self._mask_size, interpolation=cv2.INTER_AREA)
        codes = self._colour_codes(image)
        outputs: dict[int, np.ndarray] = {}
        if self._previous_grey is not None and self._soft:
            outputs = self._propagate(grey, image, codes)
        self._apply_prompt(prompt, codes)
        self._previous_grey = grey
        return self._probabilities((height, width), prompt, outputs)

    def _choose_sizes(self, width: int, height: int) -> None:
        """Flow and mask sizes for this clip, keeping the aspect ratio; frames smaller than DIS
        can handle are upscaled for it."""
        work_height = min(self.settings.work_height, height)
        work_width = round(width * work_height / height)
        self._work_size = (max(MIN_FLOW_SIZE, work_width), max(MIN_FLOW_SIZE, work_height))
        mask_height = min(max(self.settings.mask_height, work_height), height)
        mask_width = round(width * mask_height / height)
        self._mask_size = (
            max(self._work_size[0], mask_width),
            max(self._work_size[1], mask_height),
        )
        self._scale = np.array(
            [self._mask_size[0] / self._work_size[0], self._mask_size[1] / self._work_size[1]],
            dtype=np.float32,
        )
        self._pixel_scale = self._mask_size[1] / self.settings.work_height

    def _colour_codes(self, small: np.ndarray) -> np.ndarray | None:
        if self.settings.colour_weight <= 0:
            return None
        return _ColourModel(self.settings.colour_bins).codes(small)

    def _motion(self, grey: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where each mask-resolution pixel of this frame was on the previous frame (map_x,
        map_y) and how reliable that is (1 = forward and backward flow agree)."""
        backward = self._flow.calc(grey, self._previous_grey, None)  # current -> previous
        forward = self._flow.calc(self._previous_grey, grey, None)  # previous -> current
        map_x, map_y = _displaced_grid(backward)
        # a pixel's round trip current -> previous -> current should come back to itself
        returned = cv2.remap(
            forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        mismatch = np.linalg.norm(backward + returned, axis=2)
        reliability = 1 / (1 + (mismatch / self.settings.consistency_px) ** 2)
        if self._mask_size != self._work_size:
            reliability = cv2.resize(reliability, self._mask_size, interpolation=cv2.INTER_LINEAR)
            backward = cv2.resize(backward, self._mask_size, interpolation=cv2.INTER_LINEAR)
            map_x, map_y = _displaced_grid(backward * self._scale)
        return map_x, map_y, reliability

    def _propagate(
        self, grey: np.ndarray, image: np.ndarray, codes: np.ndarray | None
    ) -> dict[int, np.ndarray]:
        """Every object's probability on the new frame (returned) and its sharpened state."""
        settings = self.settings
        map_x, map_y, reliability = self._motion(grey)
        guide = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
        search_px = settings.search_px * self._pixel_scale
        refine_radius = round(settings.refine_radius * self._pixel_scale)
        outputs = {}
        for object_id, soft in self._soft.items():
            warped = cv2.remap(
                soft, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
            probability = warped
            if codes is not None and object_id in self._colours:
                probability = self._fuse(warped, reliability, codes, self._colours[object_id])
                near = _within(warped > 0.5, search_px)
                probability = np.where(near, probability, np.minimum(warped, probability))
            if refine_radius > 0:
                probability = _snap_to_edges(
                    guide, probability, refine_radius, settings.refine_eps, round(self._scale[1])
                )
            probability = np.clip(probability, 0, 1).astype(np.float32)
            outputs[object_id] = probability
            self._soft[object_id] = np.clip(
                (probability - 0.5) * settings.sharpen + 0.5, 0, 1
            ).astype(np.float32)
        return outputs

    def _fuse(
        self,
        warped: np.ndarray,
        reliability: np.ndarray,
        codes: np.ndarray,
        colours: _ColourModel,
    ) -> np.ndarray:
        """Log-odds of the warped mask, scaled by the flow's reliability, plus the colour's."""
        flow_logit = (
            _logit(warped, FLOW_CERTAINTY) * reliability
            + (1 - reliability) * self.settings.occlusion_logit
        )
        colour_logit = _logit(colours.object_odds(codes)) * self.settings.colour_weight
        return 1 / (1 + np.exp(-(flow_logit + colour_logit)))

    def _apply_prompt(self, prompt: Mapping[int, np.ndarray], codes: np.ndarray | None) -> None:
        """Set prompted objects to their masks (learning their colours); their pixels are
        removed from other objects."""
        for object_id, mask in prompt.items():
            if object_id not in self.object_ids:
                self.object_ids.append(object_id)
            small = cv2.resize(
                mask.astype(np.float32), self._mask_size, interpolation=cv2.INTER_AREA
            )
            self._soft[object_id] = small
            if codes is not None and small.max() > 0.5:
                self._learn_colours(object_id, small > 0.5, codes)
            for other_id in self._soft:
                if other_id not in prompt:
                    self._soft[other_id] = self._soft[other_id] * (1 - small)

    def _learn_colours(self, object_id: int, mask: np.ndarray, codes: np.ndarray) -> None:
        band = _within(mask, self.settings.search_px * self._pixel_scale) & ~mask
        if object_id not in self._colours:
            self._colours[object_id] = _ColourModel(self.settings.colour_bins)
        self._colours[object_id].learn(codes, mask, band)

    def _probabilities(
        self,
        shape: tuple[int, int],
        prompt: Mapping[int, np.ndarray],
        outputs: Mapping[int, np.ndarray],
    ) -> torch.Tensor:
        """(1 + K, H, W) at source size: background = no object; prompted channels exact."""
        height, width = shape
        foreground = np.zeros((len(self.object_ids), height, width), dtype=np.float32)
        for channel, object_id in enumerate(self.object_ids):
            if object_id in prompt:
                foreground[channel] = prompt[object_id]
            else:
                small = outputs.get(object_id, self._soft[object_id])
                foreground[channel] = cv2.resize(
                    small, (width, height), interpolation=cv2.INTER_LINEAR
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


def _within(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels at most `radius` from `mask` (a dilation by a disk, in time independent of the
    radius)."""
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
    return distance <= radius


def _displaced_grid(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps: every pixel's coordinates plus its flow."""
    grid_x, grid_y = _pixel_grid(*flow.shape[:2])
    return grid_x + flow[..., 0], grid_y + flow[..., 1]


@functools.cache
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    grid_x, grid_y = np.meshgrid(
        np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    )
    return grid_x, grid_y


def _logit(p: np.ndarray, certainty: float = 0.99) -> np.ndarray:
    p = np.clip(p, 1 - certainty, certainty)
    return np.log(p / (1 - p))


def _snap_to_edges(
    guide: np.ndarray, probability: np.ndarray, radius: int, eps: float, subsample: int
) -> np.ndarray:
    """Guided filter of the probability, except that confident pixels keep their value: the
    filter would otherwise wash out thin parts (chair legs, bicycle spokes) frame after frame."""
    refined = _guided_filter(guide, probability, radius, eps, subsample)
    return np.maximum(refined, np.where(probability > CONFIDENT, probability, 0))


def _guided_filter(
    guide: np.ndarray, source: np.ndarray, radius: int, eps: float, subsample: int = 1
) -> np.ndarray:
    """Edge-preserving smoothing of `source` steered by the grey image `guide` (He et al.):
    mask edges move to nearby image edges. The local linear coefficients are computed
    `subsample` times smaller and applied at full size (He and Sun's fast guided filter)."""
    height, width = guide.shape
    small_guide, small_source = guide, source
    if subsample > 1:
        small_size = (max(1, width // subsample), max(1, height // subsample))
        small_guide = cv2.resize(guide, small_size, interpolation=cv2.INTER_AREA)
        small_source = cv2.resize(source, small_size, interpolation=cv2.INTER_AREA)
        radius = max(1, round(radius / subsample))
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, size, borderType=cv2.BORDER_REFLECT)

    mean_guide, mean_source = box(small_guide), box(small_source)
    variance = box(small_guide * small_guide) - mean_guide * mean_guide
    covariance = box(small_guide * small_source) - mean_guide * mean_source
    slope = covariance / (variance + eps)
    offset = mean_source - slope * mean_guide
    mean_slope, mean_offset = box(slope), box(offset)
    if subsample > 1:
        mean_slope = cv2.resize(mean_slope, (width, height), interpolation=cv2.INTER_LINEAR)
        mean_offset = cv2.resize(mean_offset, (width, height), interpolation=cv2.INTER_LINEAR)
    return mean_slope * guide + mean_offset


# Allowed range per numeric setting: (lowest, highest, whether the lowest itself is allowed).
_SETTING_RANGES = {
    "work_height": (16, 4320, True),
    "mask_height": (16, 4320, True),
    "consistency_px": (0.0, None, False),
    "occlusion_logit": (None, None, True),
    "colour_weight": (0.0, None, True),
    "colour_bins": (2, 64, True),
    "search_px": (0, None, True),
    "refine_radius": (0, None, True),
    "refine_eps": (0.0, None, False),
    "sharpen": (0.0, None, False),
}


def check_flow_settings(settings: FlowSettings) -> FlowSettings:
    """`settings` with numbers as plain int and float. Refuses a setting of the wrong type
    (2.5 for a whole number), NaN or infinite, or out of range (a negative radius), with one
    line naming it: such values give meaningless masks."""
    if settings.preset not in PRESETS:
        raise InputError(
            f"unknown flow preset {settings.preset!r}; choose one of: {', '.join(PRESETS)}"
        )
    normalised: dict[str, Any] = {}
    for field in dataclasses.fields(FlowSettings):
        if field.name == "preset":
            continue
        value = getattr(settings, field.name)
        whole = field.type == "int"
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InputError(f"flow setting {field.name!r} takes a number, not {value!r}")
        if whole and not isinstance(value, (int, np.integer)):
            raise InputError(f"flow setting {field.name!r} takes a whole number, not {value!r}")
        if not np.isfinite(value):
            raise InputError(f"flow setting {field.name!r} must be a finite number, not {value}")
        low, high, low_allowed = _SETTING_RANGES[field.name]
        too_low = low is not None and (value < low or (value == low and not low_allowed))
        too_high = high is not None and value > high
        if too_low or too_high:
            bound = f"at least {low}" if low_allowed else f"above {low}"
            if high is not None:
                bound = f"{low}..{high}"
            raise InputError(f"flow setting {field.name!r} must be {bound}, not {value}")
        normalised[field.name] = int(value) if whole else float(value)
    return dataclasses.replace(settings, **normalised)


def load_flow_engine(
    *,
    preset: str = "medium",
    work_height: int = 240,
    mask_height: int = 480,
    consistency_px: float = 1.0,
    occlusion_logit: float = -1.0,
    colour_weight: float = 0.5,
    colour_bins: int = 24,
    search_px: int = 30,
    refine_radius: int = 3,
    refine_eps: float = 1e-3,
    sharpen: float = 2.0,
    threads: int | None = None,
) -> FlowEngine:
    """The weight-free flow engine.

    preset: DIS optical-flow preset, "ultrafast", "fast" or "medium" (slower, more accurate).
    work_height: frames are resized to this height (keeping the aspect ratio) for the optical
        flow, the costly part.
    mask_height: height at which masks are carried, warped and fused with colour (thin parts
        survive better than at work_height); the probabilities come back at the source size.
        Pixel settings below are pixels of a frame work_height high, scaled to mask_height
        (and to smaller frames), so they mean the same part of the picture at any size.
    consistency_px: forward-backward flow mismatch (working pixels) at which the flow's vote
        is halved; larger mismatches mean occlusion, where colour decides.
    occlusion_logit: log-odds of "object" where the flow is unreliable, before colour: pixels
        uncovered by motion are more often background.
    colour_weight: weight of the keyframe colour model's log-odds (0 turns it off).
    colour_bins: histogram bins per RGB channel of the colour model.
    search_px: how far (working pixels) beyond the propagated mask colour may add pixels, and
        the width of the background band the colour model learns from.
    refine_radius, refine_eps: guided-filter window radius (0 turns it off) and regularisation;
        snaps mask edges to image edges.
    sharpen: gain applied around 0.5 to the carried soft masks, undoing the blur of warping.
    threads: OpenCV's threads (cv2.setNumThreads: the optical flow, resizing and filters), set
        when the engine loads; None leaves the process's setting (OpenCV's default: all
        cores). OpenCV's setting is per process: the engine loaded last decides.

    Loading also keeps freed memory in the process (`keep_freed_memory`, as XMem's loader
    does): each frame's arrays (megabytes at 854x480) would otherwise fault in anew, and more
    so outside the main thread, where FiftyOne runs operators (a 14-frame correction in a
    fresh thread: 1.23-1.27 s instead of 1.10-1.12 s).
    """
    settings = FlowSettings(
        preset=preset,
        work_height=work_height,
        mask_height=mask_height,
        consistency_px=consistency_px,
        occlusion_logit=occlusion_logit,
        colour_weight=colour_weight,
        colour_bins=colour_bins,
        search_px=search_px,
        refine_radius=refine_radius,
        refine_eps=refine_eps,
        sharpen=sharpen,
    )
    engine = FlowEngine(check_flow_settings(settings))
    threads = check_threads(threads)
    if threads is not None:
        cv2.setNumThreads(threads)
    keep_freed_memory()
    return engine
