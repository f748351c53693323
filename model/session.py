"""A propagation session: keyframe masks in, a mask for every frame out, streamed.

In the spirit of SAM 2's video predictor:

    session = Session(load_engine("xmem"), "clip.mp4")
    session.add_mask(0, label_mask)            # objects 1..N on frame 0
    for result in session.propagate():         # FrameResult per frame, in order
        ...

Keyframes are per object: on a keyframe, each object the person gave is set to that mask there
and the frame is memorised; other objects keep being propagated. Frames before an object's first
keyframe are filled by a backward pass from it (unless direction="forward").
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from .engine import Engine, Tracker
from .errors import InputError, XMemLabelError
from .frames import FrameSource, SpilledIterator, open_frames, prefetch
from .masks import MAX_OBJECT_ID, fit_mask_to_frame
from .results import FrameResult, ObjectResult

T = TypeVar("T")
CONFIDENCE_FLOOR = 0.1  # probabilities below this are noise, not doubt, for the confidence
DIRECTIONS = ("both", "forward")

ProgressCallback = Callable[[int, int], None]


class PropagationCancelled(XMemLabelError):
    """Raised inside a propagation that `Session.cancel()` stopped."""


class _FramePrompt:
    """What a person said on one frame: a label mask and the ids it speaks for.

    An id in `object_ids` but without pixels in `labels` is declared absent on this frame.
    """

    def __init__(self, shape: tuple[int, int]):
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.object_ids: set[int] = set()

    def set_object(self, object_id: int, mask: np.ndarray) -> None:
        self.labels[self.labels == object_id] = 0
        self.labels[mask] = object_id
        self.object_ids.add(object_id)

    def masks(self) -> dict[int, np.ndarray]:
        return {obj: self.labels == obj for obj in sorted(self.object_ids)}


class Session:
    """Keyframes for one clip, and the propagation that turns them into every frame's masks."""

    def __init__(
        self,
        engine: Engine,
        source: str | Path | FrameSource | Iterable[np.ndarray],
    ):
        self.engine = engine
        self.frames = open_frames(source)
        self.frame_hw = self.frames.size()
        self._prompts: dict[int, _FramePrompt] = {}
        self._cancelled = threading.Event()

    # ----- keyframes -------------------------------------------------------------------------

    def add_mask(self, frame_index: int, labels: np.ndarray) -> list[int]:
        """Set every object present in the label mask `labels` (0 background, ids 1..255) on
        frame `frame_index`. Returns the ids it set."""
        labels = self._fit(frame_index, np.asarray(labels), "keyframe mask")
        object_ids = [int(v) for v in np.unique(labels) if v != 0]
        if not object_ids:
            raise InputError(f"keyframe mask on frame {frame_index} has no object (all zero)")
        for object_id in object_ids:
            self._prompt(frame_index).set_object(object_id, labels == object_id)
        return object_ids

    def add_object_mask(self, frame_index: int, object_id: int, mask: np.ndarray) -> None:
        """Set object `object_id` to the boolean `mask` on frame `frame_index`."""
        self._check_object_id(object_id)
        mask = self._fit(frame_index, np.asarray(mask, dtype=bool), f"mask of object {object_id}")
        if not mask.any():
            raise InputError(
                f"mask of object {object_id} on frame {frame_index} is empty; "
                "use set_absent to say the object is not there"
            )
        self._prompt(frame_index).set_object(object_id, mask)

    def set_absent(self, frame_index: int, object_id: int) -> None:
        """Declare object `object_id` absent on frame `frame_index`."""
        self._check_object_id(object_id)
        self._check_frame(frame_index)
        self._prompt(frame_index).set_object(object_id, np.zeros(self.frame_hw, dtype=bool))

    @property
    def object_ids(self) -> list[int]:
        """Every object with a mask on some keyframe, ascending."""
        return sorted(self._first_keyframes())

    @property
    def keyframes(self) -> list[int]:
        """Frames on which a person gave at least one object."""
        return sorted(self._prompts)

    # ----- propagation ------------------------------------------------------------------------

    def propagate(
        self,
        *,
        direction: str = "both",
        with_probs: bool = False,
        progress: ProgressCallback | None = None,
        spill_dir: str | Path | None = None,
    ) -> Iterator[FrameResult]:
        """Yield a FrameResult for every frame of the clip, in order.

        direction "both" fills frames before an object's first keyframe by a backward pass
        from that keyframe; "forward" leaves them empty, like the official evaluation.
        progress(done, total) is called after every network step. spill_dir: where the
        backward pass's probabilities are spilled (default: the system's temporary folder); the
        CLI puts them inside its partial output, so even a killed run leaves them in one place.
        Frames of another size than the first, and probabilities that are NaN or infinite, are
        errors naming the frame.
        """
        if direction not in DIRECTIONS:
            raise InputError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        first = self._first_keyframes()
        if not first:
            raise InputError("no keyframe: add at least one object mask before propagating")
        num_frames = self._known_length()
        forward_start = min(first.values())
        backward_start = max(first.values()) if direction == "both" else 0
        total = (num_frames - forward_start if num_frames else 0) + backward_start
        steps = _StepCounter(progress, total)

        self._cancelled.clear()
        with tempfile.TemporaryDirectory(prefix="xmem-label-backward-", dir=spill_dir) as spill:
            backward = self._backward_pass(backward_start, num_frames, Path(spill), steps)
            forward = self._pass(self.frames.forward(forward_start), num_frames, steps)
            for index, frame_probs in self._merge(backward, forward, forward_start, first):
                yield self._result(index, frame_probs, with_probs)

    def run(self, **options) -> list[FrameResult]:
        """Propagate the whole clip and return every frame's result (all masks in memory)."""
        return list(self.propagate(**options))

    def cancel(self) -> None:
        """Stop a running propagation at its next network step (from any thread): it raises
        PropagationCancelled there, and its spilled probabilities are deleted."""
        self._cancelled.set()

    def close(self) -> None:
        self.frames.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- internals --------------------------------------------------------------------------

    def _pass(
        self,
        frames: Iterator[tuple[int, np.ndarray]],
        num_frames: int | None,
        steps: _StepCounter,
    ) -> Iterator[tuple[int, list[int], torch.Tensor]]:
        """Run one tracker over `frames`, yielding (index, object_ids, probs) per frame."""
        tracker = self.engine.new_tracker(num_frames)
        with contextlib.closing(prefetch(frames)) as decoded:
            for (index, frame), is_last in _with_last_flag(decoded):
                if self._cancelled.is_set():
                    raise PropagationCancelled("propagation cancelled")
                if frame.shape[:2] != self.frame_hw:
                    height, width = frame.shape[:2]
                    raise InputError(
                        f"{self.frames.where(index)} is {width}x{height}, but the clip's first "
                        f"frame is {self.frame_hw[1]}x{self.frame_hw[0]}; all frames must have "
                        "one size"
                    )
                probs = tracker.step(frame, self._prompt_for(tracker, index), last=is_last)
                steps.advance()
                yield index, list(tracker.object_ids), probs

    def _backward_pass(
        self, start: int, num_frames: int | None, spill: Path, steps: _StepCounter
    ) -> dict[int, tuple[list[int], Path]]:
        """Run the backward pass from `start` to frame 0 and spill each frame's probabilities
        (float16) to `spill`; returns index -> (object_ids, file). Empty when start is 0."""
        stored: dict[int, tuple[list[int], Path]] = {}
        if start == 0:
            return stored
        for index, object_ids, probs in self._pass(self.frames.backward(start), num_frames, steps):
            if index < start:
                path = spill / f"{index:08d}.npy"
                np.save(path, probs.to(torch.float16).cpu().numpy())
                stored[index] = (object_ids, path)
        return stored

    def _merge(self, backward, forward, forward_start, first):
        """Per frame, take each object from the pass that has seen its first keyframe: the
        forward pass from that keyframe on, the backward pass before it."""
        forward = iter(forward)
        for index in range(self._known_length() or 2**62):
            backward_probs = None
            if index in backward:
                ids, path = backward.pop(index)
                backward_probs = (ids, torch.from_numpy(np.load(path)).float())
            if index < forward_start:
                if backward_probs is None:
                    if index >= len(self.frames):
                        return
                    backward_probs = ([], torch.ones((1, *self.frame_hw)))
                yield index, _select(first, index, None, backward_probs)
                continue
            try:
                forward_index, ids, probs = next(forward)
            except StopIteration:
                return
            assert forward_index == index, (forward_index, index)
            yield index, _select(first, index, (ids, probs), backward_probs)

    def _result(
        self, index: int, probs_by_id: tuple[list[int], torch.Tensor], with_probs: bool
    ) -> FrameResult:
        """Labels, keyframe overrides and per-object statistics of one frame."""
        ids, probs = self._in_session_order(*probs_by_id)
        labels = _argmax_channels(probs)
        prompt = self._prompts.get(index)
        keyframe_ids = set()
        if prompt is not None:  # a person's masks are returned exactly as given
            prompt_labels = torch.from_numpy(prompt.labels).to(labels.device)
            for object_id in prompt.object_ids:
                channel = ids.index(object_id) + 1 if object_id in ids else None
                if channel is not None:
                    labels[labels == channel] = 0
            for object_id in prompt.object_ids:
                if object_id in ids:
                    labels[prompt_labels == object_id] = ids.index(object_id) + 1
                    keyframe_ids.add(object_id)
        labels_np, objects, finite = _summarise(labels, probs, ids, keyframe_ids)
        if not finite:
            raise InputError(
                f"{self.frames.where(index)}: the engine produced NaN or infinite probabilities "
                "(damaged weights or a setting out of range); nothing was written"
            )
        id_lookup = np.array([0, *ids], dtype=np.uint8)
        return FrameResult(
            index=index,
            name=self.frames.frame_name(index),
            labels=id_lookup[labels_np],
            objects=objects,
            probs=probs.cpu().numpy() if with_probs else None,
        )

    def _in_session_order(self, ids: list[int], probs: torch.Tensor):
        """Reorder channels to the session's object ids (absent objects get zero channels)."""
        session_ids = self.object_ids
        if ids == session_ids:
            return ids, probs
        out = probs.new_zeros((1 + len(session_ids), *probs.shape[1:]))
        out[0] = probs[0]
        for channel, object_id in enumerate(ids, start=1):
            out[session_ids.index(object_id) + 1] = probs[channel]
        return session_ids, out

    def _prompt_for(self, tracker: Tracker, index: int) -> dict[int, np.ndarray] | None:
        """The masks a person gave on frame `index`, minus absences of objects the tracker has
        not met yet (there is nothing to remove)."""
        prompt = self._prompts.get(index)
        if prompt is None:
            return None
        known = set(tracker.object_ids)
        masks = {obj: mask for obj, mask in prompt.masks().items() if obj in known or mask.any()}
        return masks or None

    def _first_keyframes(self) -> dict[int, int]:
        """object id -> first frame where a person gave a non-empty mask for it."""
        first: dict[int, int] = {}
        for index in sorted(self._prompts):
            prompt = self._prompts[index]
            for object_id in prompt.object_ids:
                if object_id not in first and (prompt.labels == object_id).any():
                    first[object_id] = index
        return first

    def _known_length(self) -> int | None:
        if isinstance(self.frames, SpilledIterator):
            return None
        return len(self.frames)

    def _prompt(self, frame_index: int) -> _FramePrompt:
        self._check_frame(frame_index)
        if frame_index not in self._prompts:
            self._prompts[frame_index] = _FramePrompt(self.frame_hw)
        return self._prompts[frame_index]

    def _fit(self, frame_index: int, mask: np.ndarray, what: str) -> np.ndarray:
        self._check_frame(frame_index)
        if mask.ndim != 2:
            raise InputError(f"{what} on frame {frame_index} must be 2-D, got shape {mask.shape}")
        return fit_mask_to_frame(mask, self.frame_hw, f"{what} on frame {frame_index}")

    def _check_frame(self, frame_index: int) -> None:
        length = self._known_length()
        if frame_index < 0 or (length is not None and frame_index >= length):
            extent = "" if length is None else f" ({length} frames: 0..{length - 1})"
            raise InputError(f"keyframe {frame_index} is outside the clip{extent}")

    @staticmethod
    def _check_object_id(object_id: int) -> None:
        if not 1 <= int(object_id) <= MAX_OBJECT_ID:
            raise InputError(f"object ids are 1..{MAX_OBJECT_ID}, not {object_id}")


class _StepCounter:
    def __init__(self, callback: ProgressCallback | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def advance(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, max(self.total, self.done))


def _with_last_flag(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Pair every item with whether it is the last one (one item of look-ahead)."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def _select(first, index, forward, backward) -> tuple[list[int], torch.Tensor]:
    """Combine one frame's passes: object o from the forward pass when `index` >= its first
    keyframe, from the backward pass before it. A single contributing pass is used as is."""
    sources = {}
    for object_id, first_index in first.items():
        source = forward if index >= first_index else backward
        if source is not None and object_id in source[0]:
            sources[object_id] = source
    used = {id(source) for source in sources.values()}
    for candidate in (forward, backward):
        if candidate is not None and used <= {id(candidate)} and set(candidate[0]) == set(sources):
            return candidate
    ids = sorted(sources)
    device = next(iter(sources.values()))[1].device
    foreground = torch.stack(
        [sources[obj][1][sources[obj][0].index(obj) + 1].to(device) for obj in ids]
    )
    background = torch.prod(1 - foreground, dim=0, keepdim=True)
    combined = torch.cat([background, foreground])
    return ids, combined / combined.sum(dim=0, keepdim=True).clamp_min(1e-7)


def _summarise(labels: torch.Tensor, probs: torch.Tensor, ids: list[int], keyframe_ids: set):
    """Copy the labels to the host once, with area, box and confidence of every object, and
    whether every probability is finite (read in the same copy: no extra device sync)."""
    channels = torch.arange(1, len(ids) + 1, device=labels.device).view(-1, 1, 1)
    masks = labels.unsqueeze(0) == channels  # (K, H, W)
    foreground = probs[1:]
    counted = torch.where(foreground >= CONFIDENCE_FLOOR, foreground, 0)
    overlap = (counted * masks).flatten(1).sum(1)
    union = torch.maximum(counted, masks.float()).flatten(1).sum(1)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    stats = torch.stack(
        [
            masks.flatten(1).sum(1).float(),
            overlap,
            union,
            _first_true(rows).float(),
            _last_true(rows).float(),
            _first_true(cols).float(),
            _last_true(cols).float(),
            (~torch.isfinite(probs)).sum().float().expand(len(ids)),
        ],
        dim=1,
    )
    labels_np, stats_np = labels.cpu().numpy(), stats.cpu().numpy()
    finite = not stats_np[:, 7].any()
    objects = {}
    for object_id, (area, inter, uni, y0, y1, x0, x1, _) in zip(ids, stats_np, strict=True):
        keyframe = object_id in keyframe_ids
        confidence = 1.0 if keyframe or uni == 0 else float(inter / uni)
        box = (int(x0), int(y0), int(x1) + 1, int(y1) + 1) if area > 0 else None
        objects[object_id] = ObjectResult(object_id, confidence, int(area), box, keyframe)
    return labels_np, objects, finite


def _argmax_channels(probs: torch.Tensor) -> torch.Tensor:
    """probs.argmax(dim=0) as uint8 (ties to the lower channel, as argmax): a running maximum
    over the channels, about 20x faster on CPU than torch's reduction over the first axis."""
    labels = torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    best = probs[0]
    for channel in range(1, probs.shape[0]):
        labels = torch.where(probs[channel] > best, channel, labels)  # no host sync on GPUs
        best = torch.maximum(best, probs[channel])
    return labels


def _first_true(flags: torch.Tensor) -> torch.Tensor:
    return flags.float().argmax(dim=1)


def _last_true(flags: torch.Tensor) -> torch.Tensor:
    return flags.shape[1] - 1 - flags.flip(1).float().argmax(dim=1)
