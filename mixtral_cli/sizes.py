"""Byte sizes: parse `24GiB`-style strings and print sizes for people."""

from __future__ import annotations

import re

from .errors import UserError

_UNITS = {"b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB' -> 25769803776; '8G' and '8GB' are decimal; bytes need their unit too ('512B'):
    a bare number is refused, since '24' is far more likely a slip for 24 GiB than 24 bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m and not unit:
        raise UserError(f"the size '{text}' has no unit", hint=f"write it with one, like {m.group(1)}GiB or {m.group(1)}GB")
    if not m or unit not in _UNITS:
        raise UserError(f"cannot read the size '{text}'", hint="write it like 24GiB, 16GB or 8000MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_count(n: int) -> str:
    """Parameter counts: 46.70B, 12.88B, 262.1M."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_gb(n: float, digits: int = 1) -> str:
    """Decimal gigabytes, for RAM and bandwidth figures: '23.6 GB' (``digits`` decimals)."""
    return f"{n / 1e9:.{digits}f} GB"
