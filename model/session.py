"""A propagation session: keyframe masks in, a mask for every frame out, streamed.

In the spirit of SAM 2's video predictor:

    session = Session(load_engine("xmem"), "clip.mp4")
    session.add_mask(0, label_mask)            # objects 1..N on frame 0
    for result in session.propagate():         # FrameResult per frame, in order
        ...
    session.add_mask(40, corrected)            # a person fixes frame 40
    for result in session.propagate():         # re-runs only the segments around frame 40
        ...
    session.suggest(5)                         # the frames to check next, with reasons

A *statement* is what a person said about one object on one frame: its mask, or that it is
absent there. A keyframe is a frame with at least one statement. Objects have their own
keyframes; the platforms' keyframes state every object (`keyframes.py`).

Reconciled two-way propagation (direction="both", the default). From every keyframe a, a forward
pass and a backward pass run over the objects with a mask on a, each until the objects' next
statement (or the clip's end). For object o on a frame t between two of its statements a < t < b
the two passes are fused:

    p = (w_f p_f + w_b p_b) / (w_f + w_b),   w_f = c_f (b - t),   w_b = c_b (t - a)

where p_f is o's probability in the forward pass from a (0 when o is absent on a), p_b in the
backward pass from b, and c the pass's confidence on t (the soft IoU of p with p > 0.5, as
`ObjectResult.confidence`): each keyframe dominates near itself, and a pass that has lost its
certainty yields to the other. Before o's first statement only the backward pass from it counts,
after its last only the forward pass. The objects' probabilities become a frame's labels as one
distribution (background = the product of 1 - p), and a person's masks are returned verbatim.

The invariant that makes corrections cheap: a pass's output depends only on the engine, the clip,
its direction, its start frame and the masks given there (never on where it stops, `passes.py`),
and o's result on t only on the passes from its nearest statements around t. Passes are kept on
disk (compressed, in steps of 1/255) between propagations, so after `add_mask(k, ...)` the next
`propagate()` runs the network only for the passes from k (and any pass that must now reach
further than it was run); every other frame is recomputed from stored passes, bit for bit as a
from-scratch run of the same keyframes gives. direction="forward" is one forward pass from the
first keyframe through every later one (the official evaluation's protocol); it keeps nothing
between propagations.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .engine import Engine, Tracker
from .errors import InputError, XMemLabelError
from .frames import FrameSource, SpilledIterator, open_frames, prefetch
from .masks import MAX_OBJECT_ID, fit_mask_to_frame
from .passes import BACKWARD, FORWARD, PassPlan, PassStore, pass_key
from .results import FrameResult, ObjectResult
from .suggest import FrameReview, Suggestion, rank_frames, suggest_frames

T = TypeVar("T")
CONFIDENCE_FLOOR = 0.1  # probabilities below this are noise, not doubt, for the confidence
MIN_PASS_WEIGHT = 1e-3  # a pass with no confidence left still counts a little (no 0/0)
DIRECTIONS = ("both", "forward")

ProgressCallback = Callable[[int, int], None]
PromptFor = Callable[[Tracker, int], "dict[int, np.ndarray] | None"]


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

    def present(self) -> dict[int, np.ndarray]:
        """The objects given with a mask here (not those declared absent)."""
        return {obj: mask for obj, mask in self.masks().items() if mask.any()}


@dataclasses.dataclass
class _Plan:
    """The passes one reconciled propagation reads, and each object's statement frames."""

    statements: dict[int, list[int]]  # object id (ascending: the session's objects) -> frames
    forward: dict[int, PassPlan]  # start frame -> pass
    backward: dict[int, PassPlan]

    def all(self) -> list[PassPlan]:
        return [*self.backward.values(), *self.forward.values()]


class Session:
    """Keyframes for one clip, and the propagation that turns them into every frame's masks.

    cache_dir: where reconciled passes are kept between propagations. Given, it is kept after
    `close()`, so a later session of the same clip reuses it (one folder per clip: the frames
    are not part of a pass's key); by default a temporary folder, deleted by `close()`.
    """

    def __init__(
        self,
        engine: Engine,
        source: str | Path | FrameSource | Iterable[np.ndarray],
        *,
        cache_dir: str | Path | None = None,
    ):
        self.engine = engine
        self.frames = open_frames(source)
        self.frame_hw = self.frames.size()
        self._prompts: dict[int, _FramePrompt] = {}
        self._cancelled = threading.Event()
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        self._store: PassStore | None = None
        self._engine_key: dict[str, Any] | None = None
        self._reviews: dict[int, FrameReview] = {}
        self.network_steps = 0  # network steps of the last propagation (frames computed)

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
        """Yield a FrameResult for every frame of the clip, in order, each as soon as the passes
        it reads have computed it (a platform can store the first frames while the rest runs).

        direction "both": reconciled two-way propagation (see the module's docstring);
        "forward": one forward pass from the first keyframe, frames before it empty, like the
        official evaluation. progress(done, total) is called after every network step.
        spill_dir: where the session's temporary pass folder goes when it has none yet (default:
        the system's temporary folder); the CLI puts it inside its partial output, so even a
        killed run leaves it in one place. Frames of another size than the first, and
        probabilities that are NaN or infinite, are errors naming the frame.
        """
        if direction not in DIRECTIONS:
            raise InputError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        if not self._first_keyframes():
            raise InputError("no keyframe: add at least one object mask before propagating")
        self._cancelled.clear()
        self._reviews = {}
        self.network_steps = 0
        if direction == "forward":
            return self._propagate_forward(with_probs, progress)
        return self._propagate_reconciled(with_probs, progress, self._pass_store(spill_dir))

    def run(self, **options: Any) -> list[FrameResult]:
        """Propagate the whole clip and return every frame's result (all masks in memory)."""
        return list(self.propagate(**options))

    def suggest(self, count: int) -> list[Suggestion]:
        """The `count` frames a person should check next, with the reasons, spread over the
        clip; from the last propagation (which must have run to its end)."""
        if not self._reviews:
            raise InputError("nothing to suggest yet: propagate the clip first")
        return suggest_frames(list(self._reviews.values()), count)

    def rank_frames(self) -> list[Suggestion]:
        """Every propagated frame by review score, highest first, without spreading: the
        order `suggest` picks from."""
        if not self._reviews:
            raise InputError("nothing to rank yet: propagate the clip first")
        return rank_frames(list(self._reviews.values()))

    def stored_pass_bytes(self) -> tuple[int, int]:
        """(bytes, frames) of the passes kept on disk for the next propagation."""
        if self._store is None:
            return 0, 0
        return self._store.disk_bytes(), self._store.stored_frames()

    def cancel(self) -> None:
        """Stop a running propagation at its next network step (from any thread): it raises
        PropagationCancelled there, and the pass it was computing is deleted."""
        self._cancelled.set()

    def close(self) -> None:
        """Release the frames, and delete the passes unless they live in a given cache_dir.
        Calling it again does nothing more."""
        self.frames.close()
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary, self._store = None, None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- forward only -----------------------------------------------------------------------

    def _propagate_forward(
        self, with_probs: bool, progress: ProgressCallback | None
    ) -> Iterator[FrameResult]:
        statements = self._statements()
        forward_start = min(self._first_keyframes().values())
        num_frames = self._known_length()
        total = num_frames - forward_start if num_frames else 0
        steps = _StepCounter(progress, total, self)
        empty: tuple[list[int], torch.Tensor] = ([], torch.ones((1, *self.frame_hw)))
        for index in range(forward_start):
            result = self._result(index, empty, with_probs, _forward_provenance(statements, index))
            self._reviews[index] = FrameReview.of(result, {})
            yield result
        passed = self._pass(self.frames.forward(forward_start), num_frames, steps, self._prompt_for)
        for index, ids, probs in passed:
            provenance = _forward_provenance(statements, index)
            result = self._result(index, (ids, probs), with_probs, provenance)
            self._reviews[index] = FrameReview.of(result, {})
            yield result

    # ----- reconciled -------------------------------------------------------------------------

    def _propagate_reconciled(
        self, with_probs: bool, progress: ProgressCallback | None, store: PassStore
    ) -> Iterator[FrameResult]:
        num_frames = self._known_length()
        plan = self._plan(num_frames)
        # Each pass in the order of the first frame that reads it, so frames are yielded while
        # later passes still run (the first masks long before the last).
        todo = sorted((p for p in plan.all() if not store.covers(p)), key=_first_frame_read)
        steps = _StepCounter(progress, sum(p.frames_needed(num_frames) for p in todo), self)
        running: dict[str, int | None] = {p.key: None for p in todo}  # -> last frame computed
        seen = -1  # the furthest frame computed: a clip of unknown length has at least as many
        next_frame = 0

        def ready_results() -> Iterator[FrameResult]:
            nonlocal next_frame
            length = num_frames if num_frames is not None else seen + 1
            while next_frame < length and self._ready(next_frame, plan, running):
                yield self._fused_result(next_frame, plan, store, with_probs)
                next_frame += 1

        for pass_plan in todo:
            yield from ready_results()
            for index in self._compute(pass_plan, store, num_frames, steps):
                running[pass_plan.key] = index
                seen = max(seen, index)
                yield from ready_results()
            del running[pass_plan.key]
        while next_frame < len(self.frames):
            yield self._fused_result(next_frame, plan, store, with_probs)
            next_frame += 1
        store.keep_only(p.key for p in plan.all())

    def _ready(self, index: int, plan: _Plan, running: Mapping[str, int | None]) -> bool:
        """Whether every pass frame `index` reads has computed it (`running`: the passes not
        finished yet, with the last frame each computed)."""
        prompt = self._prompts.get(index)
        for object_id, frames in plan.statements.items():
            if prompt is not None and object_id in prompt.object_ids:
                continue  # the person's mask
            before, after = _before(frames, index), _after(frames, index)
            read = (
                None if before is None else plan.forward.get(before),
                None if after is None else plan.backward.get(after),
            )
            for pass_plan in read:
                if pass_plan is None or object_id not in pass_plan.object_ids:
                    continue
                if pass_plan.key not in running:
                    continue  # stored, or finished in this propagation
                reached = running[pass_plan.key]
                if reached is None or (reached - index) * _sign(pass_plan.direction) < 0:
                    return False
        return True

    def _plan(self, num_frames: int | None) -> _Plan:
        """From each keyframe, a forward pass to the furthest next statement of its objects
        (or the clip's end) and a backward pass to the furthest previous one (or frame 0)."""
        statements = self._statements()
        forward: dict[int, PassPlan] = {}
        backward: dict[int, PassPlan] = {}
        for frame in sorted(self._prompts):
            present = self._prompts[frame].present()
            if not present:
                continue
            object_ids = tuple(sorted(present))
            nexts = [_after(statements[obj], frame) for obj in object_ids]
            stop = None if None in nexts else max(n for n in nexts if n is not None)
            if stop is None and num_frames is not None:
                stop = num_frames
            if stop is None or stop > frame + 1:
                key = pass_key(self._engine_description(), num_frames, FORWARD, frame, present)
                forward[frame] = PassPlan(FORWARD, frame, stop, object_ids, key)
            previous = [_before(statements[obj], frame) for obj in object_ids]
            back_stop = min(-1 if p is None else p for p in previous)
            if back_stop < frame - 1:
                key = pass_key(self._engine_description(), num_frames, BACKWARD, frame, present)
                backward[frame] = PassPlan(BACKWARD, frame, back_stop, object_ids, key)
        return _Plan(statements, forward, backward)

    def _compute(
        self, plan: PassPlan, store: PassStore, num_frames: int | None, steps: _StepCounter
    ) -> Iterator[int]:
        """Run one planned pass, storing each frame after its start; yields the frame index."""
        masks = self._prompts[plan.start].present()

        def prompt_for(tracker: Tracker, index: int) -> dict[int, np.ndarray] | None:
            return masks if index == plan.start else None

        frames: Iterator[tuple[int, np.ndarray]]
        if plan.direction == FORWARD:
            frames = self.frames.forward(plan.start, plan.stop)
        else:
            frames = self.frames.backward(plan.start, -1 if plan.stop is None else plan.stop)
        writer = store.writer(plan)
        try:
            for index, ids, probs in self._pass(frames, num_frames, steps, prompt_for):
                if index != plan.start:
                    channels = [ids.index(obj) + 1 for obj in plan.object_ids]
                    kept = probs[channels].cpu().numpy()
                    if not np.isfinite(kept).all():
                        raise InputError(self._not_finite(index))
                    writer.add(index, kept)
                    yield index
            writer.commit(plan.stop)
        except BaseException:
            writer.discard()
            raise

    def _fused_result(
        self, index: int, plan: _Plan, store: PassStore, with_probs: bool
    ) -> FrameResult:
        """Frame `index` from the stored passes, by the fusion rule of the module's docstring;
        from disk when nothing it depends on changed since it was last computed."""
        digest = self._result_digest(index, plan)
        kept = None if with_probs else store.load_result(index, digest)
        if kept is not None:
            labels, extra = kept
            result = FrameResult(
                index=index,
                name=self.frames.frame_name(index),
                labels=labels,
                objects={
                    int(object_id): _object_result(fields)
                    for object_id, fields in extra["objects"].items()
                },
            )
            disagreement = {int(k): v for k, v in extra["disagreement"].items()}
            self._reviews[index] = FrameReview.of(result, disagreement)
            return result
        result, disagreement = self._fuse(index, plan, store, with_probs)
        extra = {
            "objects": {
                str(object_id): dataclasses.asdict(obj) for object_id, obj in result.objects.items()
            },
            "disagreement": {str(k): v for k, v in disagreement.items()},
        }
        store.save_result(index, digest, result.labels, extra)
        self._reviews[index] = FrameReview.of(result, disagreement)
        return result

    def _result_digest(self, index: int, plan: _Plan) -> str:
        """What frame `index`'s result depends on: the person's say on it, and per object the
        statements around it and the passes from them."""
        ids = list(plan.statements)  # the session's objects, read once per propagation
        digest = hashlib.sha256(f"{index}|{ids}".encode())
        prompt = self._prompts.get(index)
        if prompt is not None:
            digest.update(f"{sorted(prompt.object_ids)}".encode())
            digest.update(prompt.labels.tobytes())
        for object_id in ids:
            if prompt is not None and object_id in prompt.object_ids:
                continue  # the person's say, in the digest already
            before = _before(plan.statements[object_id], index)
            after = _after(plan.statements[object_id], index)
            forward = plan.forward.get(before) if before is not None else None
            backward = plan.backward.get(after) if after is not None else None
            digest.update(
                f"|{object_id}:{before}:{after}:{forward and forward.key}:"
                f"{backward and backward.key}".encode()
            )
        return digest.hexdigest()

    def _fuse(
        self, index: int, plan: _Plan, store: PassStore, with_probs: bool
    ) -> tuple[FrameResult, dict[int, float]]:
        loaded: dict[str, np.ndarray] = {}

        def pass_probs(pass_plan: PassPlan | None, object_id: int) -> np.ndarray:
            if pass_plan is None or object_id not in pass_plan.object_ids:
                return np.zeros(self.frame_hw, np.float32)  # absent on that keyframe
            if pass_plan.key not in loaded:
                shape = (len(pass_plan.object_ids), *self.frame_hw)
                loaded[pass_plan.key] = store.load(pass_plan.key, index, shape)
            return loaded[pass_plan.key][pass_plan.object_ids.index(object_id)]

        prompt = self._prompts.get(index)
        ids = list(plan.statements)
        foreground = []
        provenance: dict[int, tuple[str, tuple[int, ...]]] = {}
        disagreement: dict[int, float] = {}
        for object_id in ids:
            frames = plan.statements[object_id]
            if prompt is not None and object_id in prompt.object_ids:
                foreground.append((prompt.labels == object_id).astype(np.float32))
                provenance[object_id] = ("keyframe", (index,))
                continue
            before, after = _before(frames, index), _after(frames, index)
            forward = None if before is None else pass_probs(plan.forward.get(before), object_id)
            backward = None if after is None else pass_probs(plan.backward.get(after), object_id)
            if forward is not None and backward is not None:
                assert before is not None and after is not None
                w_forward = max(_pass_confidence(forward), MIN_PASS_WEIGHT) * (after - index)
                w_backward = max(_pass_confidence(backward), MIN_PASS_WEIGHT) * (index - before)
                fused = (w_forward * forward + w_backward * backward) / (w_forward + w_backward)
                foreground.append(fused)
                provenance[object_id] = ("fused", (before, after))
                # how much the passes disagree, counted where neither dominates the fusion
                balance = 2 * min(w_forward, w_backward) / (w_forward + w_backward)
                iou = _mask_iou(forward > 0.5, backward > 0.5)
                disagreement[object_id] = (1.0 - iou) * balance
            elif forward is not None:
                assert before is not None
                foreground.append(forward)
                provenance[object_id] = ("forward", (before,))
            else:
                assert backward is not None and after is not None
                foreground.append(backward)
                provenance[object_id] = ("backward", (after,))
        objects = torch.from_numpy(np.stack(foreground))
        background = torch.prod(1 - objects, dim=0, keepdim=True)
        combined = torch.cat([background, objects])
        probs = combined / combined.sum(dim=0, keepdim=True).clamp_min(1e-7)
        return self._result(index, (ids, probs), with_probs, provenance), disagreement

    # ----- internals --------------------------------------------------------------------------

    def _pass(
        self,
        frames: Iterator[tuple[int, np.ndarray]],
        num_frames: int | None,
        steps: _StepCounter,
        prompt_for: PromptFor,
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
                probs = tracker.step(frame, prompt_for(tracker, index), last=is_last)
                steps.advance()
                yield index, list(tracker.object_ids), probs

    def _result(
        self,
        index: int,
        probs_by_id: tuple[list[int], torch.Tensor],
        with_probs: bool,
        provenance: Mapping[int, tuple[str, tuple[int, ...]]],
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
        labels_np, objects, finite = _summarise(labels, probs, ids, keyframe_ids, provenance)
        if not finite:
            raise InputError(self._not_finite(index))
        id_lookup = np.array([0, *ids], dtype=np.uint8)
        return FrameResult(
            index=index,
            name=self.frames.frame_name(index),
            labels=id_lookup[labels_np],
            objects=objects,
            probs=probs.cpu().numpy() if with_probs else None,
        )

    def _not_finite(self, index: int) -> str:
        return (
            f"{self.frames.where(index)}: the engine produced NaN or infinite probabilities "
            "(damaged weights or a setting out of range); nothing was written"
        )

    def _in_session_order(
        self, ids: list[int], probs: torch.Tensor
    ) -> tuple[list[int], torch.Tensor]:
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

    def _statements(self) -> dict[int, list[int]]:
        """object id -> the frames where a person said something of it, ascending."""
        statements: dict[int, list[int]] = {obj: [] for obj in self.object_ids}
        for index in sorted(self._prompts):
            for object_id in self._prompts[index].object_ids:
                if object_id in statements:
                    statements[object_id].append(index)
        return statements

    def _first_keyframes(self) -> dict[int, int]:
        """object id -> first frame where a person gave a non-empty mask for it."""
        first: dict[int, int] = {}
        for index in sorted(self._prompts):
            prompt = self._prompts[index]
            for object_id in prompt.object_ids:
                if object_id not in first and (prompt.labels == object_id).any():
                    first[object_id] = index
        return first

    def _pass_store(self, spill_dir: str | Path | None) -> PassStore:
        if self._store is None:
            if self._cache_dir is not None:
                self._store = PassStore(self._cache_dir)
            else:
                self._temporary = tempfile.TemporaryDirectory(
                    prefix="xmem-label-passes-", dir=spill_dir
                )
                self._store = PassStore(self._temporary.name)
        return self._store

    def _engine_description(self) -> dict[str, Any]:
        if self._engine_key is None:
            self._engine_key = self.engine.describe().as_dict()
        return self._engine_key

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
    def __init__(self, callback: ProgressCallback | None, total: int, session: Session):
        self.callback, self.total, self.done = callback, total, 0
        self.session = session

    def advance(self) -> None:
        self.done += 1
        self.session.network_steps += 1
        if self.callback is not None:
            self.callback(self.done, max(self.total, self.done))


def _first_frame_read(pass_plan: PassPlan) -> tuple[int, int]:
    """The first frame that reads a pass's output; a backward pass sorts before a forward pass
    read from the same frame (its frames are ready only at its end, a forward pass's as they
    come)."""
    if pass_plan.direction == BACKWARD:
        assert pass_plan.stop is not None  # a backward pass always stops (at -1 at the latest)
        return pass_plan.stop + 1, 0
    return pass_plan.start + 1, 1


def _sign(direction: str) -> int:
    """+1 for a forward pass (its frame index grows), -1 for a backward one."""
    return 1 if direction == FORWARD else -1


def _before(frames: list[int], index: int) -> int | None:
    """The last of the sorted `frames` before `index`."""
    position = bisect.bisect_left(frames, index)
    return frames[position - 1] if position > 0 else None


def _after(frames: list[int], index: int) -> int | None:
    """The first of the sorted `frames` after `index`."""
    position = bisect.bisect_right(frames, index)
    return frames[position] if position < len(frames) else None


def _forward_provenance(
    statements: dict[int, list[int]], index: int
) -> dict[int, tuple[str, tuple[int, ...]]]:
    """Provenance in the forward-only mode: the person's, or forward from the last statement."""
    provenance: dict[int, tuple[str, tuple[int, ...]]] = {}
    for object_id, frames in statements.items():
        if index in frames:
            provenance[object_id] = ("keyframe", (index,))
        else:
            before = _before(frames, index)
            provenance[object_id] = ("none", ()) if before is None else ("forward", (before,))
    return provenance


def _object_result(fields: dict[str, Any]) -> ObjectResult:
    """An ObjectResult from its JSON form (lists back to tuples)."""
    box = fields["box"]
    return ObjectResult(
        **{**fields, "box": tuple(box) if box is not None else None,
           "keyframes": tuple(fields["keyframes"])}
    )  # fmt: skip


def _pass_confidence(probs: np.ndarray) -> float:
    """One pass's confidence in one object on one frame: the soft IoU of its probabilities
    (below CONFIDENCE_FLOOR ignored) with their own p > 0.5 mask; 1 when it sees nothing."""
    counted = np.where(probs >= CONFIDENCE_FLOOR, probs, 0)
    mask = probs > 0.5
    union = np.maximum(counted, mask).sum()
    return 1.0 if union == 0 else float((counted * mask).sum() / union)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


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


def _summarise(
    labels: torch.Tensor,
    probs: torch.Tensor,
    ids: list[int],
    keyframe_ids: set[int],
    provenance: Mapping[int, tuple[str, tuple[int, ...]]],
) -> tuple[np.ndarray, dict[int, ObjectResult], bool]:
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
    objects: dict[int, ObjectResult] = {}
    for object_id, (area, inter, uni, y0, y1, x0, x1, _) in zip(ids, stats_np, strict=True):
        keyframe = object_id in keyframe_ids
        confidence = 1.0 if keyframe or uni == 0 else float(inter / uni)
        box = (int(x0), int(y0), int(x1) + 1, int(y1) + 1) if area > 0 else None
        source, keyframes = provenance.get(object_id, ("none", ()))
        objects[object_id] = ObjectResult(
            object_id, confidence, int(area), box, keyframe, source, keyframes
        )
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
