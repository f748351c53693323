"""A folder of sessions' pass caches (`Session(cache_dir=...)`), bounded in size.

The platforms keep one folder per clip under a cache root, so a correction costs a segment even
across requests and processes. `in_use` holds a folder for one run (marked as just used, and
shared-locked so no eviction, in this or another process, deletes it meanwhile); `evict` deletes
the least recently used folders until the rest fits the cap. Losing a folder costs only time: the
next run recomputes its passes, and the engine gives the same numbers bit for bit.

Each run records its folder's size in the folder (`SIZE`), so an eviction reads one small file
per folder instead of stat-ing every file of every folder (tens of thousands at a 10 GB cap);
a folder without a readable record is measured.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"
SIZE = ".size"  # the folder's bytes when its last run ended


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
            with contextlib.suppress(OSError):  # a missing record is measured again
                (folder / SIZE).write_text(str(folder_bytes(folder)))
            os.utime(folder)
            fcntl.flock(lock, fcntl.LOCK_UN)


def recorded_bytes(folder: Path) -> int:
    """The folder's size as its last run recorded it, or measured when there is no record."""
    try:
        return int((folder / SIZE).read_text())
    except (OSError, ValueError):
        return folder_bytes(folder)


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
    folders = []
    for folder in root.iterdir():
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile by another eviction
            if folder.is_dir():
                folders.append((folder.stat().st_mtime, folder))
    sizes = {folder: recorded_bytes(folder) for _, folder in folders}
    total = sum(sizes.values())
    deleted = []
    for _, folder in sorted(folders, key=lambda item: item[0]):
        if total <= cap_bytes:
            break
        try:
            with open(folder / LOCK, "a+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use by a run
                shutil.rmtree(folder, ignore_errors=True)
                deleted.append(folder)
        except FileNotFoundError:
            pass  # another eviction deleted it first
        total -= sizes[folder]
    return deleted
