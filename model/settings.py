"""Defaults from manifest.yml, the one place they are written, and per-run overrides."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

MANIFEST_PATH = Path(__file__).with_name("manifest.yml")


@functools.cache
def manifest() -> dict[str, Any]:
    """The parsed manifest.yml (checkpoints, weight resolution, default settings)."""
    with open(MANIFEST_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


@dataclasses.dataclass(frozen=True)
class XMemSettings:
    """XMem inference settings under the official names (see manifest.yml for the defaults)."""

    top_k: int
    mem_every: int
    deep_update_every: int
    enable_long_term: bool
    enable_long_term_count_usage: bool | None
    min_mid_term_frames: int
    max_mid_term_frames: int
    num_prototypes: int
    max_long_term_elements: int
    size: int

    def count_usage(self, num_frames: int | None) -> bool:
        """Whether long-term usage is counted: explicit setting, else eval.py's rule, else on.

        eval.py counts usage only when the clip is long enough to ever reach the long-term cap;
        when the length is unknown (streaming) pruning may happen, and pruning needs usage.
        """
        if self.enable_long_term_count_usage is not None:
            return self.enable_long_term_count_usage
        if num_frames is None:
            return True
        span = self.max_mid_term_frames - self.min_mid_term_frames
        return num_frames / span * self.num_prototypes >= self.max_long_term_elements


def _coerce(name: str, value: Any, field_type: str) -> Any:
    """Turn a CLI string (or any value) into the field's type, with a clear error."""
    if value is None:
        return None
    if "bool" in field_type:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        if text in ("none", "null", "auto") and "None" in field_type:
            return None
        raise InputError(f"setting {name!r} takes true or false, not {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"setting {name!r} takes a whole number, not {value!r}") from None


def xmem_settings(**overrides: Any) -> XMemSettings:
    """Manifest defaults with `overrides` applied; unknown names are refused."""
    fields = {f.name: f for f in dataclasses.fields(XMemSettings)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise InputError(
            f"unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(fields))}"
        )
    values = dict(manifest()["xmem"])
    values.update(overrides)
    return XMemSettings(**{n: _coerce(n, values[n], str(f.type)) for n, f in fields.items()})
