"""Quantities with units in device-profile YAML: ``"307.2 GB/s"``, ``"24 GiB"``, ``"5 us"``.

A bare number is taken in the base unit (bytes, bytes/s, FLOP/s, seconds).
"""

from __future__ import annotations

import re

from odma_mlu.errors import ProfileError

_SIZE = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
         "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
UNITS: dict[str, dict[str, float]] = {
    "bytes": _SIZE,
    "bandwidth": {f"{k}/s": v for k, v in _SIZE.items()},
    "flops": {"FLOP/s": 1, "FLOPS": 1, "GFLOPS": 1e9, "TFLOPS": 1e12, "PFLOPS": 1e15},
    "seconds": {"s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9},
}
_NUM_UNIT = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")


def parse_quantity(value: object, kind: str, where: str) -> float:
    """Parse ``value`` as a quantity of ``kind`` (bytes, bandwidth, flops, seconds)."""
    table = UNITS[kind]
    if isinstance(value, bool):
        raise ProfileError(f"{where}: expected a number or a string with a {kind} unit, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        raise ProfileError(f"{where}: expected a number or a string with a {kind} unit, got {type(value).__name__}")
    m = _NUM_UNIT.match(value)
    if not m:
        raise ProfileError(f"{where}: cannot read {value!r} as a {kind} quantity; write e.g. "
                           f"'{next(iter(table.values())) and '1.5'} {list(table)[2]}'")
    number, unit = float(m.group(1)), m.group(2)
    if unit == "":
        return number
    if unit not in table:
        raise ProfileError(f"{where}: unknown unit {unit!r} in {value!r}; expected one of {list(table)}")
    return number * table[unit]
