"""Loss weightings, each defined once in epsilon space and converted exactly per target.

A weighting ``w(t)`` states the objective

    L = E[ w(t) * || eps - eps_hat(x_t, t) ||^2 ].

A network that predicts v or x0 is trained on the *same* objective when its squared error is
weighted by the exact conversion (x_t fixed, so the predictions determine each other):

    || v  - v_hat  ||^2 = || eps - eps_hat ||^2 * (snr + 1) / snr
    || x0 - x0_hat ||^2 = || eps - eps_hat ||^2 / snr

    w_v(t)  = w(t) * snr / (snr + 1)          w_x0(t) = w(t) * snr

So "min_snr" with v-prediction gives ``min(snr, gamma) / (snr + 1)`` (what diffusers uses) and
"debias" with v-prediction gives ``sqrt(snr) / (snr + 1)``. Some trainers use ``1/(snr + 1)``
or ``1/sqrt(snr + 1)`` for "debias + v-prediction": those are different objectives.

The weightings (epsilon space):

    constant   1
    debias     1 / sqrt(snr)                  Yu et al. 2023, the official code's weight
    p2         1 / (k + snr) ** gamma         Choi et al. 2022 (k=1, gamma=1 or 0.5)
    min_snr    min(snr, gamma) / snr          Hang et al. 2023 (gamma=5)
    a tensor   ``[T]`` table of epsilon-space weights
    a callable ``f(snr[T] float64) -> [T]``   epsilon-space weights

Options: ``normalize=True`` divides the epsilon-space weights by their mean over t (off by
default, as in the official code); ``max_weight=c`` caps the epsilon-space weight at c before
conversion (off by default). On a zero-terminal-SNR schedule, "debias" is unbounded at the
last step: that is a ValueError unless ``max_weight`` is given. At snr == 0 the v and x0
conversions are the limit snr -> 0+ (there x_t = eps, so the epsilon error is zero whatever the
network says); it is finite for every built-in weighting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from debias.schedules import PREDICTION_TYPES, NoiseSchedule, as_schedule

WEIGHTINGS = ("constant", "debias", "p2", "min_snr")
Weighting = str | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

# Default parameters per weighting; a parameter not listed here is refused for that weighting.
_PARAMS: dict[str, dict[str, float]] = {
    "constant": {},
    "debias": {},
    "p2": {"k": 1.0, "gamma": 1.0},
    "min_snr": {"gamma": 5.0},
}
_OPTIONS = ("k", "gamma", "max_weight", "normalize")


def weight_table(
    schedule: Any,
    weighting: Weighting = "debias",
    prediction: str | None = None,
    **options: Any,
) -> torch.Tensor:
    """The per-timestep loss weight for the network's target, ``[T]`` float64 on the CPU.

    Args:
        schedule: a ``NoiseSchedule`` or a diffusers scheduler.
        weighting: a name from ``WEIGHTINGS``, a ``[T]`` tensor or a callable of snr.
        prediction: "epsilon", "v_prediction" or "sample"; None takes the schedule's.
        **options: ``gamma``, ``k`` (weighting parameters), ``max_weight``, ``normalize``.
    """
    schedule = as_schedule(schedule)
    prediction = resolve_prediction(schedule, prediction)
    name, params, max_weight, normalize = _parse(weighting, options)
    snr = schedule.snr

    w = _epsilon_weight(weighting, name, params, snr)
    if max_weight is not None:
        w = w.clamp(max=max_weight)
    unbounded = ~torch.isfinite(w)
    zero_snr = snr == 0
    if prediction == "epsilon" or normalize:
        if unbounded.any():
            t_bad = unbounded.nonzero().flatten().tolist()
            raise ValueError(
                f"weighting {name!r} is unbounded at t={t_bad[:4]} (snr={snr[t_bad[0]]:.3g}): "
                "this schedule has zero terminal SNR. Pass max_weight=<cap> (e.g. "
                "max_weight=1e3) to cap the epsilon-space weight, or use another weighting"
            )
    if normalize:
        w = w / w.mean()

    if prediction == "epsilon":
        return w
    factor = snr / (snr + 1) if prediction == "v_prediction" else snr
    out = w * factor
    if (zero_snr & unbounded).any():
        out = torch.where(zero_snr & unbounded, _zero_snr_limit(name, params), out)
    return out


def loss_weight(
    t: torch.Tensor,
    schedule: Any,
    weighting: Weighting = "debias",
    prediction: str | None = None,
    **options: Any,
) -> torch.Tensor:
    """Per-sample loss weights ``[B]`` float32 on ``t``'s device, for trainers that keep their
    own loss code: ``(mse_per_sample * debias.loss_weight(t, scheduler)).mean()``.

    Arguments as in ``weight_table``; ``t`` is an integer tensor ``[B]`` of timesteps.
    """
    schedule = as_schedule(schedule)
    check_timesteps(t, schedule.num_timesteps)
    table = cached_weight_table(schedule, weighting, prediction, torch.float32, t.device, options)
    return table[t.long()]


# Tables are constants of a compiled graph: torch.compile evaluates this once while tracing
# (its checks read data, which tracing cannot) and keeps the result.
@torch.compiler.assume_constant_result
def cached_weight_table(
    schedule: NoiseSchedule,
    weighting: Weighting,
    prediction: str | None,
    dtype: torch.dtype,
    device: torch.device,
    options: dict[str, Any],
) -> torch.Tensor:
    """``weight_table`` cast to ``dtype`` on ``device``, cached on the schedule for named
    weightings (tables and callables are rebuilt on each call)."""
    prediction = resolve_prediction(schedule, prediction)
    if not isinstance(weighting, str):
        return weight_table(schedule, weighting, prediction, **options).to(device, dtype)
    key = ("weight", weighting, prediction, dtype, tuple(sorted(options.items())))
    return schedule.table(
        key, lambda: weight_table(schedule, weighting, prediction, **options).to(dtype), device
    )


def resolve_prediction(schedule: NoiseSchedule, prediction: str | None) -> str:
    if prediction is None:
        return schedule.prediction_type
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")
    return prediction


def check_timesteps(t: Any, num_timesteps: int, batch: int | None = None) -> None:
    """ValueError/TypeError naming ``t`` unless it is an integer ``[B]`` tensor in [0, T)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be an integer torch.Tensor of shape [B], got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor (int64 or int32), got dtype {t.dtype}")
    if t.dim() != 1 or (batch is not None and t.shape[0] != batch):
        want = "[B]" if batch is None else f"[{batch}] (one timestep per sample)"
        raise ValueError(f"t must have shape {want}, got {list(t.shape)}")
    if t.numel() == 0:
        return
    if t.device.type == "cpu":
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_timesteps:
            raise ValueError(
                f"t must lie in [0, {num_timesteps}) for this schedule, got values in [{lo}, {hi}]"
            )
    else:
        # Checking on the host would synchronise the device; the assert fires asynchronously.
        torch._assert_async(((t >= 0) & (t < num_timesteps)).all(), "t out of range")


def _parse(weighting: Weighting, options: dict[str, Any]):
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; allowed: {list(_OPTIONS)}")
    if isinstance(weighting, str):
        if weighting not in _PARAMS:
            raise ValueError(
                f"weighting must be one of {WEIGHTINGS}, a [T] tensor or a callable of snr; "
                f"got {weighting!r}"
            )
        name, defaults = weighting, _PARAMS[weighting]
    elif isinstance(weighting, torch.Tensor) or callable(weighting):
        name, defaults = ("table" if isinstance(weighting, torch.Tensor) else "callable"), {}
    else:
        raise TypeError(
            f"weighting must be a name, a [T] tensor or a callable, got {type(weighting).__name__}"
        )
    params = dict(defaults)
    for key in ("k", "gamma"):
        if options.get(key) is None:
            continue
        if key not in defaults:
            raise ValueError(f"option {key!r} does not apply to weighting {name!r}")
        params[key] = _positive(key, options[key], allow_zero=key == "k")
    max_weight = options.get("max_weight")
    if max_weight is not None:
        max_weight = _positive("max_weight", max_weight)
    normalize = options.get("normalize", False)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    return name, params, max_weight, normalize


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0")
    return value


def _epsilon_weight(weighting: Weighting, name: str, params: dict, snr: torch.Tensor):
    if name == "constant":
        return torch.ones_like(snr)
    if name == "debias":
        return snr.rsqrt()
    if name == "p2":
        return (params["k"] + snr) ** -params["gamma"]
    if name == "min_snr":
        # min(snr, gamma)/snr written so that snr == 0 gives 1, not 0/0.
        return (params["gamma"] / snr).clamp(max=1.0)
    w = weighting(snr.clone()) if name == "callable" else weighting
    w = torch.as_tensor(w).detach().to("cpu", torch.float64).flatten()
    if w.numel() != snr.numel():
        raise ValueError(
            f"weighting table must have one entry per timestep ({snr.numel()}), got {w.numel()}"
        )
    if torch.isnan(w).any() or (w < 0).any():
        raise ValueError("weighting values must be >= 0 and not NaN")
    return w


def _zero_snr_limit(name: str, params: dict) -> float:
    """lim_{snr->0+} w(snr) * factor(snr) for weightings unbounded at snr == 0; both
    conversion factors behave like snr there."""
    if name == "debias":  # snr^-1/2 * snr
        return 0.0
    if name == "p2":  # k == 0: snr^-gamma * snr
        gamma = params["gamma"]
        if gamma < 1:
            return 0.0
        if gamma == 1:
            return 1.0
    raise ValueError(
        f"weighting {name!r} grows too fast at zero SNR to convert to this target; "
        "pass max_weight=<cap> to bound it"
    )
