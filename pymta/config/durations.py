"""Durations in the config: seconds as a number, or a string with units.

``30``, ``1.5``, ``"30"``, ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``, ``"1w"`` and
combinations such as ``"1h30m"`` are accepted.  The result is a float number
of seconds.
"""

from __future__ import annotations

import re

UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}

_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.ASCII)
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?\s*[smhdw]\s*)+", re.ASCII)
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?", re.ASCII)

EXPECTED = 'a duration such as 30 (seconds), "30s", "5m", "4h" or "5d"'


def parse_duration(value: object) -> float:
    """Return ``value`` as seconds; ``ValueError`` (with a readable message) if it is not a duration.

    Negative durations are not durations; whether 0 is allowed is the
    caller's business.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected {EXPECTED}, got boolean {str(value).lower()}")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected {EXPECTED}, got {value}")
        if value < 0:
            raise ValueError(f"expected {EXPECTED}, got negative number {value}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if _PLAIN_NUMBER.fullmatch(text):
            return float(text)
        if text and _WHOLE.fullmatch(text):
            return sum(float(number) * UNIT_SECONDS[unit] for number, unit in _PART.findall(text))
        raise ValueError(f"expected {EXPECTED}, got string {value!r}")
    raise ValueError(f"expected {EXPECTED}, got {type(value).__name__}")


def format_duration(seconds: float) -> str:
    """Render seconds the way an admin writes them: 300 -> "5m", 90 -> "90s"."""
    for unit in ("w", "d", "h", "m"):
        size = UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds}s"
