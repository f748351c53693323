"""Where "propagate corrections" keeps each video's propagation passes between runs.

One folder per (sample, video file, output field) under a cache root, handed to the engine as
`Session(cache_dir=...)`: the engine keys every pass by engine, clip, direction, start frame and
masks, so the folder serves any later run on that video, whatever changed. The root is
XMEM_LABEL_FIFTYONE_CACHE (default: `xmem-label-cache` beside FiftyOne's default dataset
folder) and its size is capped at XMEM_LABEL_FIFTYONE_CACHE_GB (default 10): after each run the
least recently used folders are deleted until the rest fits. A folder in use is locked (a
shared lock while a run reads or writes it) and never evicted. Losing a folder costs only time:
the next run recomputes the passes, and the engine gives the same numbers bit for bit. Holding
and eviction are the engine's (`xmem_label.model.pass_cache`, shared with the Label Studio
backend); this module says where the plugin's folders are and how large the root may grow.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import fiftyone as fo

from xmem_label.model.pass_cache import evict, in_use

__all__ = ["cache_cap_bytes", "cache_root", "evict", "in_use", "sample_folder"]

ROOT_ENV = "XMEM_LABEL_FIFTYONE_CACHE"
CAP_ENV = "XMEM_LABEL_FIFTYONE_CACHE_GB"
DEFAULT_CAP_GB = 10.0


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
