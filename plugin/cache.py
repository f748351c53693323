"""Where "propagate corrections" keeps each video's propagation passes between runs.

One folder per (sample, video file, output field) under a cache root, handed to the engine as
`Session(cache_dir=...)`: the engine keys every pass by engine, clip, direction, start frame and
masks, so the folder serves any later run on that video, whatever changed. The root is
XMEM_LABEL_FIFTYONE_CACHE (default: `xmem-label-cache` beside FiftyOne's default dataset
folder) and its size is capped at XMEM_LABEL_FIFTYONE_CACHE_GB (default 10): after each run the
least recently used folders are deleted until the rest fits. A folder in use is locked (a
shared lock while a run reads or writes it) and never evicted. Losing a folder costs only time:
the next run recomputes the passes, and the engine gives the same numbers bit for bit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import fiftyone as fo

ROOT_ENV = "XMEM_LABEL_FIFTYONE_CACHE"
CAP_ENV = "XMEM_LABEL_FIFTYONE_CACHE_GB"
DEFAULT_CAP_GB = 10.0
LOCK = ".lock"


def cache_root() -> Path:
    """The configured cache root (created on first use)."""
    configured = os.environ.get(ROOT_ENV)
    if configured:
        return Path(configured)
    return Path(fo.config.default_dataset_dir).parent / "xmem-label-cache"


def cache_cap_bytes() -> int:
    """The configured size cap of the whole cache root, in bytes."""
    try:
        gigabytes = float(os.environ.get(CAP_ENV) or DEFAULT_CAP_GB)
    except ValueError:
        gigabytes = DEFAULT_CAP_GB
    return int(gigabytes * 1e9)


def sample_folder(root: Path, sample_id: str, filepath: str, label_field: str) -> Path:
    """The folder of one video sample's passes for one output field. The video file's size and
    modification time are part of the name: a replaced video never reuses old passes."""
    try:
        stat = os.stat(filepath)
        version = f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        version = "missing"
    digest = hashlib.sha256(f"{filepath}|{version}|{label_field}".encode()).hexdigest()[:16]
    return root / f"{sample_id}-{digest}"


@contextlib.contextmanager
def in_use(folder: Path) -> Iterator[Path]:
    """Hold `folder` (made if missing) for one run: marked as just used, and locked so that no
    eviction, in this or another process, deletes it meanwhile."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        os.utime(folder)
        try:
            yield folder
        finally:
            os.utime(folder)
            fcntl.flock(lock, fcntl.LOCK_UN)


def folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def evict(root: Path, cap_bytes: int) -> list[Path]:
    """Delete the least recently used folders of `root` until the rest is at most `cap_bytes`;
    a folder another run holds is skipped. Returns the folders deleted."""
    if not root.is_dir():
        return []
    folders = [(folder.stat().st_mtime, folder) for folder in root.iterdir() if folder.is_dir()]
    sizes = {folder: folder_bytes(folder) for _, folder in folders}
    total = sum(sizes.values())
    deleted = []
    for _, folder in sorted(folders, key=lambda item: item[0]):
        if total <= cap_bytes:
            break
        with open(folder / LOCK, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use by a run
            shutil.rmtree(folder, ignore_errors=True)
        total -= sizes[folder]
        deleted.append(folder)
    return deleted
