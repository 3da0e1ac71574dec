"""Argument checks shared by the public functions, one message format everywhere: each raises
TypeError or ValueError naming the argument, what was given and what is allowed. Public so that
the pipeline (and a trainer) check their own arguments the same way."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


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


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    inclusive: bool = False,
    high: float | None = None,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a finite float (ints accepted, bool refused), above ``low`` if given (at
    least ``low`` when ``inclusive``), at most ``high`` if given (below it when not
    ``high_inclusive``).

    Raises:
        TypeError: not a number. ValueError: not finite, or out of range. Both name ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    too_low = low is not None and (value < low or (value == low and not inclusive))
    too_high = high is not None and (value > high or (value == high and not high_inclusive))
    if too_low and high is None:
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low:g}, got {value}")
    if too_high and low is None:
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high:g}, got {value}")
    if too_low or too_high:
        interval = f"{'[' if inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


# The dtypes every op and score takes for data (samples, features, model outputs), and their
# names for messages.
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
*_first, _last = (str(dtype).removeprefix("torch.") for dtype in FLOAT_DTYPES)
FLOAT_DTYPE_NAMES = f"{', '.join(_first)} or {_last}"  # "float32, float64, bfloat16 or float16"


def check_tensor(name: str, x: Any, layout: str = "") -> torch.Tensor:
    """``x`` if it is a torch.Tensor with data: TypeError for anything else, ValueError for a
    meta tensor (it has a shape but no values to check or compute on). ``layout`` (such as
    ``"[n, ...]"``) goes into the message."""
    if not isinstance(x, torch.Tensor):
        shown = f" {layout}" if layout else ""
        raise TypeError(f"{name} must be a torch.Tensor{shown}, got {type(x).__name__}")
    if x.is_meta:
        raise ValueError(f"{name} is a meta tensor (a shape without data): pass real data")
    return x


def check_float_dtype(name: str, x: torch.Tensor | torch.dtype) -> None:
    """TypeError unless ``x`` (a tensor, or a dtype itself) is one of FLOAT_DTYPES."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be {FLOAT_DTYPE_NAMES}, got {dtype}")


def check_generator(generator: Any, why: str, seed: bool = False) -> torch.Generator | None:
    """``generator`` if it is None or a CPU ``torch.Generator``; with ``seed``, an int (not a
    bool) as well, returned as a fresh CPU generator seeded with it. ``why`` (such as
    "timesteps are drawn on the host") says in the message why it has to be a CPU one.

    Raises:
        TypeError: anything else. ValueError: a generator on another device.
    """
    if generator is None:
        return None
    if seed and isinstance(generator, int | np.integer) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    if not isinstance(generator, torch.Generator):
        allowed = "a torch.Generator, an int seed or None" if seed else "a torch.Generator or None"
        raise TypeError(f"generator must be {allowed}, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator ({why}), got one on {generator.device}"
        )
    return generator


def within(x: torch.Tensor, low: float = -math.inf, high: float = math.inf) -> torch.Tensor:
    """``isfinite(x) & (low <= x) & (x <= high)`` elementwise in two ops instead of
    torch.isfinite's four plus the bounds': x clamped to [low, high], each bound within the
    dtype's finite range, equals x exactly where it holds (NaN equals nothing, an infinity
    clamps to a finite value)."""
    largest = torch.finfo(x.dtype).max
    return x.clamp(max(low, -largest), min(high, largest)) == x


def check_range(
    x: torch.Tensor,
    message: Callable[[torch.Tensor], str],
    device_message: str,
    low: float = -math.inf,
    high: float = math.inf,
    open_low: bool = False,
) -> None:
    """ValueError(``message(bad)``), ``bad`` the bool tensor of the failing elements, unless
    every element of the float tensor ``x`` is finite and in [low, high] (low excluded when
    ``open_low``): the per-step value checks of the ops' coefficients and masks. On the host
    for CPU tensors: one ``aminmax`` pass (NaN propagates into both ends) and two reads, a
    fifth of ``check_all(within(x))``'s time on a 16k-element mask. Elsewhere
    ``torch._assert_async``, which never synchronises; nothing while torch.compile traces."""
    if torch.compiler.is_compiling() or x.numel() == 0:
        return

    def ok() -> torch.Tensor:
        inside = within(x, low, high)
        return inside & (x != low) if open_low else inside

    if x.device.type == "cpu":
        lo, hi = (v.item() for v in torch.aminmax(x))
        above = lo > low if open_low else lo >= low
        if not (above and hi <= high and math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(message(~ok()))
    else:
        torch._assert_async(ok().all(), device_message)


def check_all(ok: torch.Tensor, message: Callable[[], str], device_message: str) -> None:
    """ValueError(``message()``) unless every element of the bool tensor ``ok`` is true: the
    value checks of the ops' tensors. Read on the host for CPU tensors; on other devices
    ``torch._assert_async(ok.all(), device_message)`` instead, which fails later and never
    synchronises; nothing while torch.compile traces (a host read would break the graph)."""
    if torch.compiler.is_compiling():
        return
    if ok.device.type == "cpu":
        if not bool(ok.all()):
            raise ValueError(message())
    else:
        torch._assert_async(ok.all(), device_message)


def check_finite_rows(name: str, x: torch.Tensor, start: int = 0) -> None:
    """ValueError naming the first row of ``x [rows, ...]`` (counted from ``start``) that
    holds a NaN or an infinity."""
    flat = x.detach().reshape(x.shape[0], -1)
    # NaN and infinity survive a sum, so a finite sum clears the whole tensor in one read (the
    # elementwise test below costs 20 times more at d = 3072); a sum that overflows from
    # finite values is sorted out by the elementwise test.
    total = flat.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if bool(torch.isfinite(total)):
        return
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        row = start + int((~finite).nonzero()[0, 0])
        raise ValueError(f"{name} row {row} contains NaN or infinity")


def check_samples(
    name: str, x: Any, dim: int | None = None, layout: str = "[n, ...]", numpy: bool = False
) -> torch.Tensor:
    """The one check of a set of samples (images, vectors, features), one per row along dim 0:
    a float tensor (a numpy array too, when ``numpy``, returned as a tensor) with ``dim``
    dimensions (at least 2 when None), at least one row of at least one value, every value
    finite. ``layout`` (such as ``"[N, C, H, W]"``) names the expected shape in messages.

    Raises:
        TypeError: not a tensor (or array), or not a float dtype. ValueError: a meta tensor,
        the wrong number of dimensions, empty, or a row with NaN or infinity (named). Every
        message names ``name``.
    """
    if numpy and isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must hold floats, got numpy dtype {x.dtype}")
        x = torch.from_numpy(x)
    x = check_tensor(name, x, layout)
    check_float_dtype(name, x)
    if (x.dim() < 2 if dim is None else x.dim() != dim) or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {layout} tensor, got {list(x.shape)}")
    check_finite_rows(name, x)
    return x
