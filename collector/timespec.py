"""`--since` values: a duration back from now ("90s", "30m", "1h", "2d", "1w") or Unix seconds."""

from __future__ import annotations

import re
import time

__all__ = ["parse_duration", "parse_since"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> float:
    """ "30m" -> 1800.0 seconds; ValueError names the accepted forms."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 1h, 2d, 1w)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds: `now - duration` for "1h"-style text, or the number itself for Unix seconds."""
    now = time.time() if now is None else now
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return now - parse_duration(text)
    except ValueError:
        raise ValueError(
            f"since must be a duration (90s, 30m, 1h, 2d, 1w) or Unix seconds: {text!r}"
        ) from None
