"""manifest.yml, the one place defaults are written: read once per process.

The file has one section per concern: the engine chosen by default, the Label Studio backend's
limits, and XMem's checkpoints, weight cache and settings (read by `xmem/weights.py` and
`xmem/settings.py`). CLI flags and keyword arguments override the defaults per run.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

MANIFEST_PATH = Path(__file__).with_name("manifest.yml")


@functools.cache
def manifest() -> dict[str, Any]:
    """The parsed manifest.yml (checkpoints, weight resolution, default settings)."""
    with open(MANIFEST_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)
