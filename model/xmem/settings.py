"""XMem's settings: the defaults of manifest.yml's `xmem` section with per-run overrides."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import InputError
from ..settings import manifest


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


MAX_SIZE = 4096  # internal short side above this is a typo, not a request (memory grows as size^2)


def _coerce(name: str, value: Any, field_type: str) -> Any:
    """Turn a CLI string (or any value) into the field's type, with a clear error.

    Whole numbers must be whole: 2.5 and True are refused rather than silently truncated.
    """
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
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isascii():
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InputError(f"setting {name!r} takes a whole number, not {value!r}")


def _check_ranges(settings: XMemSettings) -> None:
    """Refuse values XMem cannot run with, and relations between settings that break it."""
    at_least_one = ("top_k", "mem_every", "min_mid_term_frames", "num_prototypes")
    for name in at_least_one:
        if getattr(settings, name) < 1:
            raise InputError(f"setting {name!r} must be at least 1, not {getattr(settings, name)}")
    if settings.deep_update_every != -1 and settings.deep_update_every < 1:
        raise InputError(
            f"setting 'deep_update_every' must be -1 (on memory frames) or at least 1, "
            f"not {settings.deep_update_every}"
        )
    if settings.max_mid_term_frames <= settings.min_mid_term_frames:
        raise InputError(
            f"setting 'max_mid_term_frames' ({settings.max_mid_term_frames}) must be above "
            f"'min_mid_term_frames' ({settings.min_mid_term_frames})"
        )
    if settings.max_long_term_elements <= settings.num_prototypes:
        raise InputError(
            f"setting 'max_long_term_elements' ({settings.max_long_term_elements}) must be above "
            f"'num_prototypes' ({settings.num_prototypes})"
        )
    if settings.size != -1 and not 16 <= settings.size <= MAX_SIZE:
        raise InputError(f"size must be -1 (native) or 16..{MAX_SIZE} pixels, not {settings.size}")


def xmem_settings(**overrides: Any) -> XMemSettings:
    """Manifest defaults with `overrides` applied; unknown names, wrong types and values out of
    range are refused."""
    fields = {f.name: f for f in dataclasses.fields(XMemSettings)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise InputError(
            f"unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(fields))}"
        )
    values = dict(manifest()["xmem"])
    values.update(overrides)
    settings = XMemSettings(**{n: _coerce(n, values[n], str(f.type)) for n, f in fields.items()})
    _check_ranges(settings)
    return settings
