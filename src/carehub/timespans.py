"""Spans of time as people write them in commands and route files: ``90s``, ``30m``, ``2h``,
``7d``. One reading for both, so ``--older-than 7d`` and ``give_up_after: 7d`` agree."""

from __future__ import annotations

import re
from datetime import timedelta

_SPAN = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> timedelta | None:
    """``30m``, ``2h``, ``7d`` (seconds, minutes, hours, days) as a timedelta; None when the
    text is not an age, so that a caller may try it as a date instead."""
    match = _SPAN.fullmatch(text.strip())
    if match is None:
        return None
    try:
        return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    except OverflowError:  # past what a timedelta holds: longer than any calendar
        return timedelta.max


def span_text(seconds: int) -> str:
    """A span in the largest unit it is a whole number of (``86400`` -> ``1d``, ``5400`` ->
    ``90m``): as a route file would write it, so a view quotes the setting back."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
