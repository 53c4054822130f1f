"""Value validation of the config dataclasses (odma_mlu/config.py)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from typing import Any

from odma_mlu.errors import ConfigError

# Every config dataclass calls ``validate_fields`` from ``__post_init__``: a wrong type, a zero size
# or a fraction outside [0, 1] is a one-line ConfigError naming the key, the value and the
# allowed range, whether it came from YAML, a flag or code. Types come from each field's
# annotation; ranges from ``_RANGES`` or, for fields not listed there, from the name
# (``*_fraction`` in [0, 1], ``num_*`` / ``max_*`` / ``*_tokens`` / ``*_every`` / ``*_window``
# integers >= 1, other numbers finite).
_INF = float("inf")
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    # name: (low, high, low excluded, high excluded)
    "num_buckets": (1, 4096, False, False),
    "safety_fraction": (0.0, 1.0, False, True),
    "uncertainty_ratio": (1.0, _INF, False, True),
    "target_coverage": (0.0, 1.0, True, False),
    "growth_factor": (1.0, _INF, True, True),
    "claim_admission_factor": (0.0, _INF, False, True),
    "kv_capacity_tokens": (256, 2**40, False, False),
    "page_size_tokens": (1, 65536, False, False),
    "granule_tokens": (1, 65536, False, False),
    "activation_reserve_fraction": (0.0, 1.0, False, True),
    "watermark_fraction": (0.0, 1.0, False, True),
    "swap_space_bytes": (0, 2**50, False, False),
    "memory_fraction": (0.0, 1.0, True, False),
    "cpu_kv_capacity_tokens": (256, 2**40, False, False),
    "drain_timeout_s": (0.0, 86400.0, False, False),
    "body_read_timeout_s": (0.0, 3600.0, True, False),
    "seed": (-(2**63), 2**64 - 1, False, False),
}
_CHOICES: dict[str, tuple[Any, ...]] = {
    "backend": ("auto", "mlu", "cuda", "cpu", "emulated"),
    "dtype": ("auto", "float32", "float16", "bfloat16"),
    "log_level": ("critical", "error", "warning", "info", "debug", "trace"),
    "reasoning_parser": (None, "deepseek_r1"),
}
_SECTIONS = {"OdmaConfig": "cache.odma.", "CacheConfig": "cache.", "SchedulerConfig": "scheduler.",
             "ServerConfig": "server.", "EngineConfig": ""}


def _range_for(name: str, is_int: bool) -> tuple[float, float, bool, bool] | None:
    if name in _RANGES:
        return _RANGES[name]
    if name.endswith("_fraction"):
        return (0.0, 1.0, False, False)
    if is_int and (name.startswith(("num_", "max_")) or name.endswith(("_tokens", "_every", "_window", "_bytes",
                                                                           "_requests", "_buckets"))):
        return (1, 2**62, False, False)
    return None


def validate_fields(obj: Any) -> None:
    """Check every field of a config dataclass (types from annotations, ranges as above)."""
    where = _SECTIONS.get(type(obj).__name__, "")
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{where}{f.name}"
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None:
            if "None" not in kinds:
                raise ConfigError(f"{key} = null is not allowed; expected {' or '.join(kinds)}")
            continue
        if f.name in _CHOICES:
            if value not in _CHOICES[f.name]:
                raise ConfigError(f"{key} = {value!r} is not one of {[c for c in _CHOICES[f.name] if c is not None]}")
            continue
        if "bool" in kinds:
            if not isinstance(value, bool):
                raise ConfigError(f"{key} = {value!r} must be true or false")
            continue
        if "int" in kinds or "float" in kinds:
            is_int = "int" in kinds and "float" not in kinds
            ok = isinstance(value, int) if is_int else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok:
                raise ConfigError(f"{key} = {value!r} ({type(value).__name__}) must be "
                                  f"{'an integer' if is_int else 'a number'}")
            if not math.isfinite(value):
                raise ConfigError(f"{key} = {value!r} must be a finite number")
            rng = _range_for(f.name, is_int)
            if rng is not None:
                lo, hi, lo_open, hi_open = rng
                if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
                    shown = lambda v: "inf" if v == _INF else (int(v) if float(v).is_integer() else v)  # noqa: E731
                    raise ConfigError(f"{key} = {value!r} is out of range: allowed "
                                      f"{'(' if lo_open else '['}{shown(lo)}, {shown(hi)}{')' if hi_open else ']'}")
            continue
        if "str" in kinds:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{key} = {value!r} must be a non-empty string")
            continue
        if dataclasses.is_dataclass(value) or kinds[0] in _SECTIONS:
            if not dataclasses.is_dataclass(value) or type(value).__name__ != kinds[0]:
                raise ConfigError(f"{key} must be a mapping of {kinds[0]} keys, got {type(value).__name__}")
