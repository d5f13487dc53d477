"""Sizes in human units: `5GB`, `500MB`, `2GiB`, mergekit's `5B` (5 billion), or a plain byte count.

    KB MB GB TB      powers of 1000 (as transformers' max_shard_size reads them)
    KiB MiB GiB TiB  powers of 1024
    K M B            thousand, million, billion (mergekit's --out-shard-size: its default is 5B)

Units are case-insensitive; a decimal number is allowed ("1.5GB"); the result is whole bytes.
"""

from __future__ import annotations

import math
import re

from ..errors import SoupError

DEFAULT_SHARD_SIZE = 5_000_000_000  # mergekit's default out_shard_size, "5B"

_UNITS = {
    "": 1, "b": 1_000_000_000, "k": 1000, "m": 1000**2, "g": 1000**3,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: float | str, what: str = "size") -> int:
    """Bytes for `value`; a SoupError naming `what` when it is not a positive size."""
    if isinstance(value, bool):
        raise SoupError(f"{what}: {value!r} is not a size")
    if isinstance(value, (int, float)):
        n = value
    else:
        m = _SIZE.match(str(value))
        unit = m and m[2].lower()
        if m is None or unit not in _UNITS:
            raise SoupError(f"{what}: {value!r} is not a size (e.g. 5GB, 500MB, 2GiB, 5B or a byte count)")
        n = float(m[1]) * _UNITS[unit]
    if not math.isfinite(n) or n < 1:
        raise SoupError(f"{what}: {value!r} must be at least one byte")
    return int(n)
