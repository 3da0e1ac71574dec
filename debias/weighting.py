"""Loss weightings, each defined once in one declared space and converted exactly to every
family and target.

A weighting ``w(t)`` states an objective in the space it is declared in; epsilon space:

    L = E[ w(t) * || eps - eps_hat(x_t, t) ||^2 ].

Every target of every family is affine in (x0, eps): y = p eps + q x0, with x_t = a x0 + s eps
(schedules.py). At fixed x_t the predictions determine each other, and

    || y - y_hat ||^2 = k^2 || eps - eps_hat ||^2,      k = p - q s / a,

so a weight declared in space S trains the same objective on target y as ``w k_S^2 / k_y^2``:

    target         k^2                 1 / k^2 (the factor from epsilon space)
    epsilon        1                   1
    v_prediction   (snr + 1) / snr     snr / (snr + 1)
    sample (x0)    1 / snr             snr
    flow (eps-x0)  (1 + s/a)^2         (a / (a + s))^2 = (1 - sigma)^2 on a flow schedule
    raw (EDM F)    sigma^2 / c_out^2   c_out^2 / sigma^2

So "min_snr" with v-prediction gives ``min(snr, gamma) / (snr + 1)`` (what diffusers uses),
"debias" with v-prediction ``sqrt(snr) / (snr + 1)`` and on the flow target
``sigma (1 - sigma)``. Some trainers use ``1/(snr + 1)`` or ``1/sqrt(snr + 1)`` for "debias +
v-prediction": those are different objectives.

The weightings and their spaces:

    epsilon  constant     1
             debias       1 / sqrt(snr)               Yu et al. 2023, the official code's weight
             p2           1 / (k + snr) ** gamma      Choi et al. 2022 (k=1, gamma=1 or 0.5)
             min_snr      min(snr, gamma) / snr       Hang et al. 2023 (gamma=5)
             a tensor     ``[T]`` table, or a callable ``f(snr[T] float64) -> [T]``
    flow     none, logit_normal, mode   1             diffusers' compute_loss_weighting_for_sd3
             sigma_sqrt   sigma^-2                    (flow schedules only; logit_normal and
             cosmap       2 / (pi (1 - 2 sigma + 2 sigma^2))   mode only change sampling)
    sample   edm          (sigma^2 + sd^2) / (sigma sd)^2      Karras et al. 2022 (EDM only)

Options: ``normalize=True`` divides the weights by their mean over t in their declared space
(off by default, as in the official code); ``max_weight=c`` caps them there, before
conversion (off by default). An unbounded weight (debias at zero terminal SNR, sigma_sqrt at
sigma = 0, any weight converted into a space where it has no finite value) is a ValueError
naming ``max_weight``, never an inf or NaN. Where snr == 0 and the target's factor vanishes,
the epsilon-space weightings convert to their limit snr -> 0+ (there x_t = eps, so the epsilon
error is zero whatever the network says); it is finite for every built-in weighting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from debias.schedules import NoiseSchedule, _check_prediction, as_schedule

WEIGHTINGS = ("constant", "debias", "p2", "min_snr", "none", "sigma_sqrt", "cosmap",
              "logit_normal", "mode", "edm")  # fmt: skip
# The space each weighting is declared in (tables and callables: epsilon).
SPACES = {"constant": "epsilon", "debias": "epsilon", "p2": "epsilon", "min_snr": "epsilon",
          "none": "flow", "sigma_sqrt": "flow", "cosmap": "flow", "logit_normal": "flow",
          "mode": "flow", "edm": "sample"}  # fmt: skip
# The family a space-bound weighting needs (its formula reads that family's sigma).
_FAMILY = {"none": "flow", "sigma_sqrt": "flow", "cosmap": "flow", "logit_normal": "flow",
           "mode": "flow", "edm": "edm"}  # fmt: skip
Weighting = str | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

# Default parameters per weighting; a parameter not listed here is refused for that weighting.
_PARAMS: dict[str, dict[str, float]] = {
    "constant": {},
    "debias": {},
    "p2": {"k": 1.0, "gamma": 1.0},
    "min_snr": {"gamma": 5.0},
    **{name: {} for name in _FAMILY},
}
_OPTIONS = ("k", "gamma", "max_weight", "normalize")


def weight_table(
    schedule: Any,
    weighting: Weighting = "debias",
    prediction: str | None = None,
    **options: Any,
) -> torch.Tensor:
    """The per-timestep loss weight in the prediction's own space, ``[T]`` float64 on the CPU.

    Args:
        schedule: a ``NoiseSchedule`` or a diffusers scheduler.
        weighting: a name from ``WEIGHTINGS``, a ``[T]`` tensor or a callable of snr.
        prediction: "epsilon", "v_prediction", "sample" ("denoised"), "flow" or "raw"; None
            takes the schedule's.
        **options: ``gamma``, ``k`` (weighting parameters), ``max_weight``, ``normalize``.
    """
    schedule = as_schedule(schedule)
    prediction = resolve_prediction(schedule, prediction)
    name, params, max_weight, normalize = _parse(weighting, options)
    space = SPACES.get(name, "epsilon")
    family = _FAMILY.get(name)
    if family is not None and schedule.family != family:
        raise ValueError(
            f"weighting {name!r} is defined on {family} schedules (it reads their sigma); this "
            f"schedule is {schedule.family}: use an epsilon-space weighting "
            "(constant, debias, p2, min_snr), which converts to every family"
        )

    w = _declared_weight(weighting, name, params, schedule)
    if max_weight is not None:
        w = w.clamp(max=max_weight)
    unbounded = ~torch.isfinite(w)
    if (prediction == space or normalize) and unbounded.any():
        _refuse_unbounded(name, schedule, unbounded)
    if normalize:
        w = w / w.mean()
    if prediction == space:
        return w

    to_target, from_space = _inverse_k2(schedule, prediction), _inverse_k2(schedule, space)
    out = w * to_target / from_space
    bad = ~torch.isfinite(out)
    if bad.any():
        # snr == 0 with an epsilon-space weighting: the limit snr -> 0+ where it is finite
        limit = bad & unbounded & (schedule.snr == 0) & (to_target == 0) & (space == "epsilon")
        if limit.any():
            out = torch.where(limit, _zero_snr_limit(name, params), out)
        if (bad & ~limit).any():
            _refuse_unbounded(name, schedule, bad & ~limit, converted_to=prediction)
    return out


def target_table(schedule: Any, prediction: str | None, dtype: torch.dtype) -> torch.Tensor:
    """``[2, T]`` float64 (p, q) of the target y = p eps + q x0 for data of ``dtype``:
    epsilon (1, 0), sample (0, 1), flow (1, -1); v_prediction on a DDPM schedule the (a, -s)
    of ``noise_table(dtype)`` (as diffusers' get_velocity rounds them), elsewhere the
    variance-preserving (alpha, -sigma) / sqrt(alpha^2 + sigma^2); raw (EDM's network output
    under its preconditioning D = c_skip x_t + c_out F): (-c_skip sigma, 1 - c_skip) / c_out."""
    schedule = as_schedule(schedule)
    prediction = resolve_prediction(schedule, prediction)
    one = torch.ones_like(schedule.sigma)
    if prediction == "epsilon":
        return torch.stack((one, 0 * one))
    if prediction == "sample":
        return torch.stack((0 * one, one))
    if prediction == "flow":
        return torch.stack((one, -one))
    if prediction == "v_prediction":
        if schedule.family == "ddpm":
            a, s = schedule.noise_table(dtype, torch.device("cpu")).double()
            return torch.stack((a, -s))
        norm = (schedule.alpha**2 + schedule.sigma**2).sqrt()
        return torch.stack((schedule.alpha / norm, -schedule.sigma / norm))
    c_skip, c_out = _edm_preconditioning(schedule)
    return torch.stack((-c_skip * schedule.sigma / c_out, (1 - c_skip) / c_out))


def loss_table(
    schedule: Any, weighting: Weighting, prediction: str | None, dtype: torch.dtype,
    options: dict[str, Any],
) -> torch.Tensor:  # fmt: skip
    """``[3, T]`` float64: the rows (w, p, q) the loss kernels take for data of ``dtype``."""
    w = weight_table(schedule, weighting, prediction, **options)
    return torch.cat((w[None], target_table(schedule, prediction, dtype)))


def loss_weight(
    t: torch.Tensor,
    schedule: Any,
    weighting: Weighting = "debias",
    prediction: str | None = None,
    **options: Any,
) -> torch.Tensor:
    """Per-sample loss weights ``[B]`` float32 on ``t``'s device, in the prediction's own
    space, for trainers that keep their own loss code:
    ``(mse_per_sample * debias.loss_weight(t, scheduler)).mean()``.

    Arguments as in ``weight_table``; ``t`` holds timesteps ``[B]`` (integers for a DDPM
    schedule, the schedule's float timesteps for flow matching and EDM).
    """
    schedule = as_schedule(schedule)
    index = schedule.index(t)
    table = cached_weight_table(schedule, weighting, prediction, torch.float32, t.device, options)
    return table[index]


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


@torch.compiler.assume_constant_result
def cached_loss_table(
    schedule: NoiseSchedule,
    weighting: Weighting,
    prediction: str,
    dtype: torch.dtype,
    compute: torch.dtype,
    device: torch.device,
    options: dict[str, Any],
) -> torch.Tensor:
    """``loss_table`` for data of ``dtype``, cast to ``compute`` on ``device``; cached on the
    schedule for named weightings (tables and callables are rebuilt on each call)."""
    if not isinstance(weighting, str):
        return loss_table(schedule, weighting, prediction, dtype, options).to(device, compute)
    key = ("loss", weighting, prediction, dtype, compute, tuple(sorted(options.items())))
    return schedule.table(
        key, lambda: loss_table(schedule, weighting, prediction, dtype, options).to(compute),
        device,
    )  # fmt: skip


def resolve_prediction(schedule: NoiseSchedule, prediction: str | None) -> str:
    """The prediction type to use (None: the schedule's), checked against the family."""
    prediction = _check_prediction(schedule.prediction_type if prediction is None else prediction)
    if prediction == "raw" and schedule.family != "edm":
        raise ValueError(
            f"prediction 'raw' is EDM's preconditioned network output; this schedule is "
            f"{schedule.family}"
        )
    return prediction


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


def _declared_weight(weighting: Weighting, name: str, params: dict, schedule: NoiseSchedule):
    """The weights in their declared space (SPACES), float64 [T]."""
    snr, sigma = schedule.snr, schedule.sigma
    if name in ("none", "logit_normal", "mode"):
        return torch.ones_like(snr)
    if name == "sigma_sqrt":
        return sigma**-2.0
    if name == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    if name == "edm":
        sd = schedule.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2
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


def _inverse_k2(schedule: NoiseSchedule, space: str) -> torch.Tensor:
    """1 / k^2 per t (module docstring): ||eps - eps_hat||^2 / ||y - y_hat||^2 at fixed x_t,
    the factor that carries an epsilon-space weight to target ``space``."""
    snr, a, s = schedule.snr, schedule.alpha, schedule.sigma
    if space == "epsilon":
        return torch.ones_like(snr)
    if space == "v_prediction":
        return snr / (snr + 1)
    if space == "sample":
        return snr
    if space == "flow":
        return (a / (a + s)) ** 2
    _, c_out = _edm_preconditioning(schedule)
    return c_out**2 / s**2


def _edm_preconditioning(schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's c_skip and c_out per t (Karras et al. 2022, Table 1)."""
    sigma, sd = schedule.sigma, schedule.sigma_data
    return sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()


def _refuse_unbounded(
    name: str, schedule: NoiseSchedule, where: torch.Tensor, converted_to: str | None = None
):
    t_bad = where.nonzero().flatten().tolist()
    i = t_bad[0]
    what = f"has no finite value as a {converted_to} weight" if converted_to else "is unbounded"
    raise ValueError(
        f"weighting {name!r} {what} at t={t_bad[:4]} (snr={schedule.snr[i]:.3g}, "
        f"sigma={schedule.sigma[i]:.3g}). Pass max_weight=<cap> (e.g. max_weight=1e3) to cap "
        "the weight in its own space, or use another weighting"
    )


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
