"""Argument checks shared by the public functions: one message format everywhere."""

from __future__ import annotations

import math
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


def check_float(name: str, value: Any, low: float | None = None, inclusive: bool = False) -> float:
    """``value`` as a finite float (ints accepted, bool refused), above ``low`` if given (at
    least ``low`` when ``inclusive``).

    Raises:
        TypeError: not a number. ValueError: not finite, or out of range. Both name ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if low is not None and (value < low or (value == low and not inclusive)):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low:g}, got {value}")
    return value
