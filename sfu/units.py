"""Human-friendly durations ("500ms", "10s", "1h30m") shared by the config file and the CLI."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
DURATION_PATTERN = r"^\s*(\d+(\.\d+)?(ms|s|m|h|d))+\s*$"
DURATION_HINT = "seconds as a number, or a string such as 500ms, 10s, 5m, 1h or 1h30m"


def parse_duration(value: object) -> float:
    """Return seconds; raise ValueError with a message fit for a user on anything else."""
    if isinstance(value, bool):  # bool is an int subclass; `true` is never a duration
        raise ValueError(f"{value!r} is not a duration (expected {DURATION_HINT})")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        seconds = _parse_text(text, value)
    else:
        raise ValueError(f"{value!r} is not a duration (expected {DURATION_HINT})")
    if seconds < 0 or seconds != seconds:  # NaN compares unequal to itself
        raise ValueError(f"{value!r} is not a duration (it must not be negative)")
    return seconds


def _parse_text(text: str, original: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"{original!r} is not a duration (expected {DURATION_HINT})")
    return total


def format_duration(seconds: float) -> str:
    """The shortest exact spelling, so generated docs read like the YAML a user would write."""
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds}s"
