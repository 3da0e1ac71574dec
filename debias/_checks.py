"""Argument checks shared by the public functions: one message format everywhere."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_int(name: str, value: Any, low: int | None = None) -> int:
    """``value`` as an int (numpy integers accepted, bool refused), at least ``low`` if given.

    Raises:
        TypeError: not an integer. ValueError: below ``low``. Both messages name ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return int(value)
