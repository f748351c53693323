"""Propagation passes, kept on disk between propagations so a correction re-runs only what it
changes.

A pass is one tracker run from a keyframe, forward or backward, over the objects a person gave
a mask for on that frame. Its output on a frame depends only on the engine, the clip (frames and
length), the direction, the start frame and those masks: its `key`. It does not depend on where
the pass stops (a tracker's step never looks ahead), so a pass kept from an earlier propagation
serves any range it covers, bit for bit, and a from-scratch run of the same keyframes computes
the same numbers.

Beside the passes, each frame's fused result is kept with the digest of what it was computed
from (`results/`): a frame whose inputs did not change comes back from disk, bit for bit, with
no fusion to redo.

Each frame of a pass is stored as the probabilities of the pass's objects (no background: fusion
needs only the objects' channels) in steps of 1/255, zlib-compressed: a few tens of kilobytes for
a 854x480 frame where float16 would take 800 KB. One file per frame, in a folder per pass whose
`pass.json` is written last: a pass cut short (an error, a cancel, a kill) is never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORWARD, BACKWARD = "forward", "backward"
LEVELS = 255  # probabilities are kept in steps of 1/255
FRAME_SUFFIX = ".u8z"
RESULTS = "results"  # the folder of fused frame results, beside the passes


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """One pass a propagation needs.

    stop is exclusive, as `FrameSource.forward/backward` take it: forward passes store frames
    start+1 .. stop-1 (stop None: to the clip's end), backward ones start-1 down to stop+1.
    """

    direction: str
    start: int
    stop: int | None
    object_ids: tuple[int, ...]
    key: str

    def frames_needed(self, clip_length: int | None) -> int:
        """Network steps to compute the pass (its start frame included)."""
        if self.direction == BACKWARD:
            return self.start - (self.stop if self.stop is not None else -1)
        end = self.stop if self.stop is not None else clip_length
        return 0 if end is None else end - self.start


def pass_key(
    engine: Mapping[str, Any],
    clip_length: int | None,
    direction: str,
    start: int,
    masks: Mapping[int, np.ndarray],
) -> str:
    """The digest of everything a pass's output depends on (see the module's docstring)."""
    digest = hashlib.sha256()
    head = {"engine": engine, "length": clip_length, "direction": direction, "start": start}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for object_id in sorted(masks):
        mask = np.asarray(masks[object_id], dtype=bool)
        digest.update(f"|{object_id}:{mask.shape}|".encode())
        digest.update(np.packbits(mask).tobytes())
    return digest.hexdigest()[:32]


class PassStore:
    """Passes of one clip in `folder` (created when missing)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._meta: dict[str, dict[str, Any]] = {}
        self._writing: dict[str, Path] = {}  # key -> folder of a pass being written

    def _meta_of(self, key: str) -> dict[str, Any] | None:
        if key not in self._meta:
            path = self.folder / key / "pass.json"
            if not path.is_file():
                return None
            self._meta[key] = json.loads(path.read_text())
        return self._meta[key]

    def covers(self, plan: PassPlan) -> bool:
        """Whether a stored pass with the plan's key holds every frame the plan needs."""
        meta = self._meta_of(plan.key)
        if meta is None:
            return False
        stored = meta["stop"]
        if plan.direction == FORWARD:
            return stored is None or (plan.stop is not None and stored >= plan.stop)
        return plan.stop is not None and stored <= plan.stop

    def object_ids(self, key: str) -> list[int]:
        meta = self._meta_of(key)
        assert meta is not None, key
        return list(meta["object_ids"])

    def load(self, key: str, index: int, shape: tuple[int, ...]) -> np.ndarray:
        """(K, H, W) = `shape` float32 probabilities of the pass's objects on frame `index` (of
        a stored pass, or of the one being written)."""
        folder = self._writing.get(key, self.folder / key)
        data = zlib.decompress((folder / f"{index:08d}{FRAME_SUFFIX}").read_bytes())
        return np.frombuffer(data, dtype=np.uint8).reshape(shape).astype(np.float32) / LEVELS

    def writer(self, plan: PassPlan) -> PassWriter:
        return PassWriter(self, plan)

    def save_result(self, index: int, digest: str, labels: np.ndarray, extra: Any) -> None:
        """Keep frame `index`'s labels and its JSON-able `extra`, computed from `digest`."""
        folder = self.folder / RESULTS
        folder.mkdir(exist_ok=True)
        head = json.dumps({"digest": digest, "shape": labels.shape, "extra": extra}).encode()
        body = zlib.compress(np.ascontiguousarray(labels, dtype=np.uint8).tobytes(), 1)
        try:
            (folder / f"{index:08d}.res").write_bytes(len(head).to_bytes(4, "big") + head + body)
        except OSError as error:
            raise OSError(f"cannot keep propagation results in {folder}: {error}") from error

    def load_result(self, index: int, digest: str) -> tuple[np.ndarray, Any] | None:
        """Frame `index`'s labels and extra, if they were computed from `digest`."""
        path = self.folder / RESULTS / f"{index:08d}.res"
        if not path.is_file():
            return None
        data = path.read_bytes()
        size = int.from_bytes(data[:4], "big")
        head = json.loads(data[4 : 4 + size])
        if head["digest"] != digest:
            return None
        labels = np.frombuffer(zlib.decompress(data[4 + size :]), dtype=np.uint8)
        return labels.reshape(head["shape"]).copy(), head["extra"]

    def keep_only(self, keys: Iterable[str]) -> None:
        """Delete every stored pass not in `keys` (those of keyframes since changed)."""
        wanted = {*keys, RESULTS}
        for path in self.folder.iterdir():
            if path.is_dir() and path.name not in wanted:
                shutil.rmtree(path, ignore_errors=True)
                self._meta.pop(path.name, None)

    def disk_bytes(self) -> int:
        """Bytes of the stored passes and results."""
        return sum(path.stat().st_size for path in self.folder.rglob("*") if path.is_file())

    def stored_frames(self) -> int:
        return sum(1 for _ in self.folder.rglob(f"*{FRAME_SUFFIX}"))


class PassWriter:
    """Writes one pass's frames into a fresh folder; `commit` makes it the stored pass."""

    def __init__(self, store: PassStore, plan: PassPlan):
        self.store, self.plan = store, plan
        self.partial = store.folder / f"{plan.key}.partial"
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir()
        store._writing[plan.key] = self.partial

    def add(self, index: int, probs: np.ndarray) -> None:
        """Store frame `index`: (K, H, W) probabilities of the plan's objects."""
        levels = np.rint(np.clip(probs, 0, 1) * LEVELS).astype(np.uint8)
        path = self.partial / f"{index:08d}{FRAME_SUFFIX}"
        try:
            path.write_bytes(zlib.compress(levels.tobytes(), 1))
        except OSError as error:
            raise OSError(f"cannot keep propagation passes in {self.partial}: {error}") from error

    def commit(self, stop: int | None) -> None:
        meta = {
            "direction": self.plan.direction,
            "start": self.plan.start,
            "stop": stop,
            "object_ids": list(self.plan.object_ids),
        }
        (self.partial / "pass.json").write_text(json.dumps(meta))
        final = self.store.folder / self.plan.key
        shutil.rmtree(final, ignore_errors=True)
        os.replace(self.partial, final)
        self.store._writing.pop(self.plan.key, None)
        self.store._meta[self.plan.key] = meta

    def discard(self) -> None:
        self.store._writing.pop(self.plan.key, None)
        shutil.rmtree(self.partial, ignore_errors=True)
