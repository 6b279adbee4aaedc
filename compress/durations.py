"""Durations as people write them — 500ms, 90s, 20m (or 20min), 1h, 1d; a bare number is seconds — for every option
that takes one (optimize's time budget, loadtest's duration, drift's window). Callers word their own error."""
from __future__ import annotations

import re

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def seconds(text) -> float:
    """``text`` in seconds; ValueError when it is not a duration."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|min|s|m|h|d)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"'{text}' is not a duration (e.g. 500ms, 90s, 20m, 1h, 1d)")
    return float(m[1]) * UNITS[m[2] or "s"]
