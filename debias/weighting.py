"""Loss weightings, each defined once in one declared space and converted exactly to every
family and target.

A weighting ``w(t)`` states an objective in the space it is declared in; epsilon space:

    L = E[ w(t) * || eps - eps_hat(x_t, t) ||^2 ].

Every target of every family is affine in (x0, eps): y = p eps + q x0, with x_t = a x0 + s eps
(schedules.py). At fixed x_t the predictions determine each other, and

    || y - y_hat ||^2 = k^2 || eps - eps_hat ||^2,      k = p - q s / a,

so a weight declared in space S trains the same objective on target y as ``w k_S^2 / k_y^2``:

    target         (p, q)                               k^2 = m^2 / a^2,  m = a k
    epsilon        (1, 0)                               1                  m = a
    v_prediction   (a, -s) / sqrt(a^2 + s^2)            (snr + 1) / snr    m = sqrt(a^2 + s^2)
    sample (x0)    (0, 1)                               1 / snr            m = -s
    flow (eps-x0)  (1, -1)                              ((a + s) / a)^2    m = a + s
    raw (EDM F)    (-c_skip s, 1 - c_skip) / c_out      sigma^2 / c_out^2  m = -s / c_out

(a DDPM schedule's v is diffusers' ``get_velocity``, a = sqrt(abar), s = sqrt(1 - abar)).
The ratio is computed as ``k_S^2 / k_y^2 = m_S^2 / m_y^2``, which stays finite at zero SNR
(a = 0) except into the epsilon target. So "min_snr" with v-prediction gives
``min(snr, gamma) / (snr + 1)`` (what diffusers uses), "debias" with v-prediction
``sqrt(snr) / (snr + 1)`` and on the flow target ``sigma (1 - sigma)``. Some trainers use
``1/(snr + 1)`` or ``1/sqrt(snr + 1)`` for "debias + v-prediction": those are different
objectives.

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

Weights are computed in float64 from the schedule's tables (flow / EDM: diffusers' float32
sigmas), whatever the data's dtype; only a DDPM schedule's v-prediction target rows depend on
it (``loss_table``).

Options: ``normalize=True`` divides the weights by their mean over t in their declared space
(off by default, as in the official code); ``max_weight=c`` caps them there, before
conversion (off by default). An unbounded weight (debias at zero terminal SNR — every flow
schedule has snr = 0 at sigma = 1 —, sigma_sqrt at sigma = 0, a table holding inf) is a
ValueError naming ``max_weight``, never an inf or NaN. Where snr == 0 and the target's factor
vanishes, the epsilon-space weightings convert to their limit snr -> 0+ (the converted
weight's continuous extension); it is finite for every built-in weighting but p2 with k=0
and gamma > 1. A weighting declared on another target has no finite
value as an epsilon weight at snr == 0 (any epsilon error there is an infinite error of that
target): a ValueError as well, which a cap in the declared space cannot lift.

Continuous time (schedule "flow" or "edm", t each sample's sigma): the same functions run on
per-sample ``Levels`` (``continuous_weight``, ``continuous_loss_coefficients``) in float64 on
the sigmas' device, with the same rules; a flow sigma may be 0 (snr = inf: debias, min_snr
and p2 weigh it 0, sigma_sqrt is unbounded there) or 1 (snr = 0, as a table's last entry).
Without a table there is no ``normalize``, and a weighting is a name or a callable of snr.
On a GPU nothing is read on the host: a weight with no finite value fails a
``torch._assert_async`` instead of raising.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from debias.checks import check_float, check_float_dtype, check_range
from debias.schedules import (
    CONTINUOUS_PREDICTIONS,
    FAMILIES,
    Levels,
    NoiseSchedule,
    as_schedule,
    check_prediction,
    check_sigma,
    continuous_family,
    levels,
)
from debias.schedules import check_timesteps as check_timesteps  # its home before families

WEIGHTINGS = ("constant", "debias", "p2", "min_snr", "none", "sigma_sqrt", "cosmap",
              "logit_normal", "mode", "edm")  # fmt: skip
# The space each weighting is declared in (tables and callables: epsilon).
SPACES = {"constant": "epsilon", "debias": "epsilon", "p2": "epsilon", "min_snr": "epsilon",
          "none": "flow", "sigma_sqrt": "flow", "cosmap": "flow", "logit_normal": "flow",
          "mode": "flow", "edm": "sample"}  # fmt: skip
# The family a space-bound weighting needs (its formula reads that family's sigma).
_FAMILY = {"none": "flow", "sigma_sqrt": "flow", "cosmap": "flow", "logit_normal": "flow",
           "mode": "flow", "edm": "edm"}  # fmt: skip
# The named weightings each family accepts (epsilon-space ones convert to every family).
FAMILY_WEIGHTINGS = {
    family: tuple(name for name in WEIGHTINGS if _FAMILY.get(name, family) == family)
    for family in FAMILIES
}
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
        weighting: a name from ``WEIGHTINGS`` (default "debias"), a ``[T]`` tensor or a
            callable of snr (both epsilon space).
        prediction: "epsilon", "v_prediction", "sample" ("denoised"), "flow" or "raw"; None
            takes the schedule's.
        **options: ``gamma``, ``k`` (weighting parameters), ``max_weight``, ``normalize``.

    Raises:
        ValueError: a weighting or prediction the schedule's family does not have, bad
            options, or a weight with no finite value (the message names ``max_weight``).
    """
    schedule = as_schedule(schedule)
    prediction = resolve_prediction(schedule, prediction)
    return _weight_table(schedule, weighting, prediction, _parse(weighting, options))


def _weight_table(
    schedule: NoiseSchedule | Levels,
    weighting: Weighting,
    prediction: str,
    parsed: tuple,
    host_checks: bool = True,
) -> torch.Tensor:
    """``weight_table`` past its checks: ``prediction`` resolved, ``parsed`` from ``_parse``.
    On a schedule's table, or on per-sample ``Levels`` of a continuous family: there, without
    ``host_checks`` (on a GPU, or while compiling), nothing reads values on the host and a
    weight with no finite value comes out inf or NaN for the caller to assert on the device."""
    name, params, max_weight, normalize = parsed
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
    if prediction == space and not (host_checks or normalize):
        return w  # the caller asserts on its values
    unbounded = torch.isinf(w)  # NaN and negative weights were refused
    if host_checks and (prediction == space or normalize) and unbounded.any():
        _refuse_unbounded(name, space, schedule, unbounded)
    if normalize:
        w = w / w.mean()
    if prediction == space:
        return w

    factor = conversion_factor(schedule, space, prediction)
    out = w * factor
    # inf * 0: an epsilon-space weight at snr == 0 into a target whose factor vanishes there
    limit = unbounded & (factor == 0)
    if not host_checks:
        # The same rules with no value read: where no limit exists the weight stays NaN.
        exists = (schedule.snr == 0) if space == "epsilon" else torch.zeros_like(limit)
        value = _zero_snr_limit(name, params, strict=False)
        out = torch.where(limit & exists, value, torch.where(limit, math.nan, out))
        return torch.where(w == 0, 0.0, out)
    if limit.any():
        if space != "epsilon" or not bool((schedule.snr[limit] == 0).all()):
            _refuse_unbounded(name, space, schedule, limit)
        out = torch.where(limit, _zero_snr_limit(name, params), out)
    if (unbounded & (factor > 0)).any():
        _refuse_unbounded(name, space, schedule, unbounded & (factor > 0))
    # A zero weight ignores that t in every space (0 * inf would be NaN).
    out = torch.where(w == 0, 0.0, out)
    no_value = torch.isinf(factor) & (w > 0)
    if no_value.any():
        _refuse_conversion(name, space, prediction, schedule, no_value)
    return out


def conversion_factor(schedule: NoiseSchedule, space: str, target: str) -> torch.Tensor:
    """``[T]`` float64 ``k_space^2 / k_target^2``: a weight declared on target ``space``
    times this trains the same objective on ``target`` (module docstring). In [0, inf]; inf
    only into the epsilon target at snr == 0. Epsilon-space factors are the closed forms
    1, snr / (snr + 1), snr, (a / (a + s))^2, c_out^2 / s^2."""
    if space == target:
        return torch.ones_like(schedule.snr)
    if space == "epsilon":
        return _inverse_k2(schedule, target)
    return (_m(schedule, space) / _m(schedule, target)) ** 2


def target_table(schedule: Any, prediction: str | None, dtype: torch.dtype) -> torch.Tensor:
    """``[2, T]`` float64 (p, q) of the target y = p eps + q x0 for data of ``dtype``:
    epsilon (1, 0), sample (0, 1), flow (1, -1); v_prediction on a DDPM schedule the (a, -s)
    of ``noise_table(dtype)`` (as diffusers' get_velocity rounds them), elsewhere the
    variance-preserving (alpha, -sigma) / sqrt(alpha^2 + sigma^2) in float64; raw (EDM's
    network output under its preconditioning D = c_skip x_t + c_out F):
    (-c_skip sigma, 1 - c_skip) / c_out = (-sd, sigma / sd) / sqrt(sigma^2 + sd^2), negated
    with c_out for diffusers' "v_prediction" EDM schedulers."""
    schedule = as_schedule(schedule)
    check_float_dtype("dtype", dtype)
    return _target_table(schedule, resolve_prediction(schedule, prediction), dtype)


def _target_table(schedule: NoiseSchedule, prediction: str, dtype: torch.dtype) -> torch.Tensor:
    """``target_table`` past its checks (``prediction`` resolved)."""
    return torch.stack(_target_rows(schedule, prediction, dtype))


def _target_rows(schedule: NoiseSchedule | Levels, prediction: str, dtype: torch.dtype):
    """The rows (p, q) of ``_target_table``."""
    one = torch.ones_like(schedule.sigma)
    if prediction == "epsilon":
        return one, 0 * one
    if prediction == "sample":
        return 0 * one, one
    if prediction == "flow":
        return one, -one
    if prediction == "v_prediction":
        if schedule.family == "ddpm":
            a, s = schedule.noise_table(dtype).double()
            return a, -s
        norm = torch.hypot(schedule.alpha, schedule.sigma)
        return schedule.alpha / norm, -schedule.sigma / norm
    # (-c_skip sigma, 1 - c_skip) / c_out simplified, without 1 - c_skip's cancellation
    sigma, sd, sign = schedule.sigma, schedule.sigma_data, schedule.c_out_sign
    norm = (sigma**2 + sd**2).sqrt()
    return -sign * sd / norm, sign * sigma / (sd * norm)


def loss_table(
    schedule: Any,
    weighting: Weighting,
    prediction: str | None,
    dtype: torch.dtype,
    options: dict[str, Any],
) -> torch.Tensor:
    """``[3, T]`` float64 rows (w, p, q) for data of ``dtype``: ``weight_table(schedule,
    weighting, prediction, **options)`` and ``target_table(schedule, prediction, dtype)``."""
    schedule = as_schedule(schedule)
    check_float_dtype("dtype", dtype)
    prediction = resolve_prediction(schedule, prediction)
    return _loss_table(schedule, weighting, prediction, dtype, _parse(weighting, options))


def _loss_table(
    schedule: NoiseSchedule, weighting: Weighting, prediction: str, dtype: torch.dtype, parsed
) -> torch.Tensor:
    w = _weight_table(schedule, weighting, prediction, parsed)
    return torch.cat((w[None], _target_table(schedule, prediction, dtype)))


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
    schedule, the schedule's float timesteps for flow matching and EDM). ``schedule`` may
    also be "flow" or "edm", continuous time, with ``t`` each sample's sigma
    (``continuous_weight``; option ``sigma_data`` for edm).
    """
    family = continuous_family(schedule)
    if family is not None:
        prediction = resolve_continuous_prediction(family, prediction)
        sigma = check_sigma(t, family)
        return continuous_weight(family, sigma, weighting, prediction, options).float()
    schedule = as_schedule(schedule)
    prediction = resolve_prediction(schedule, prediction)
    index = schedule.index(t)
    table = cached_weight_table(schedule, weighting, prediction, torch.float32, t.device, options)
    return table[index]


# ---- continuous time: the same functions on each sample's sigma ------------------------------


def resolve_continuous_prediction(family: str, prediction: str | None) -> str:
    """``resolve_prediction`` for a continuous family (None: flow "flow", edm "raw")."""
    prediction = CONTINUOUS_PREDICTIONS[family] if prediction is None else prediction
    return check_prediction(prediction, "prediction", family)


def continuous_weight(
    family: str,
    sigma: torch.Tensor,
    weighting: Weighting,
    prediction: str,
    options: dict[str, Any],
) -> torch.Tensor:
    """The weight ``[B]`` float64 on ``sigma``'s device of a continuous family, in the
    prediction's own space: the table path's functions (``_weight_table``) on per-sample
    ``Levels`` of the float64 sigmas, with its rules for unbounded weights (``max_weight``);
    ``prediction`` resolved, ``sigma`` checked (``check_sigma``). ``options`` as for
    ``weight_table`` but ``normalize`` (a mean over a table of timesteps), plus ``sigma_data``
    (edm, default 0.5). Weightings: the names valid for the family and callables of snr.

    Value checks run on the host for CPU tensors in eager mode (the table path's ValueError);
    elsewhere one ``torch._assert_async`` that every weight is finite and >= 0 (no
    synchronisation)."""
    lv, parsed = _continuous_levels(family, sigma, weighting, options)
    return _continuous_weight(lv, weighting, prediction, parsed)


def continuous_loss_coefficients(
    family: str,
    sigma: torch.Tensor,
    weighting: Weighting,
    prediction: str,
    dtype: torch.dtype,
    options: dict[str, Any],
) -> torch.Tensor:
    """``[3, B]`` rows (w, p, q) of a continuous family, computed in float64 on ``sigma``'s
    device and cast to ``dtype`` (the compute type), as ``loss_table``'s rows are: the weight of
    ``continuous_weight`` and ``_target_table``'s (p, q) on the same per-sample levels."""
    lv, parsed = _continuous_levels(family, sigma, weighting, options)
    w = _continuous_weight(lv, weighting, prediction, parsed)
    return torch.stack((w, *_target_rows(lv, prediction, torch.float64))).to(dtype)


def _continuous_levels(
    family: str, sigma: torch.Tensor, weighting: Weighting, options: dict[str, Any]
) -> tuple[Levels, tuple]:
    """The float64 ``Levels`` of ``sigma`` and the parsed options (``sigma_data`` taken out)."""
    options = dict(options)
    sigma_data = options.pop("sigma_data", None)
    if sigma_data is not None and family != "edm":
        raise ValueError(f"option 'sigma_data' applies to the edm family, not {family}")
    sigma_data = check_float("sigma_data", 0.5 if sigma_data is None else sigma_data, low=0.0)
    if isinstance(weighting, torch.Tensor):
        raise TypeError(
            "weighting: a [T] tensor is a table indexed by timestep, and a continuous family "
            "has none: pass a name or a callable of snr"
        )
    parsed = _parse(weighting, options)
    if parsed[3]:
        raise ValueError(
            "normalize=True divides by the mean over a schedule's table of timesteps; the "
            f"continuous {family} family has none"
        )
    lv = levels(family, sigma.double(), sigma_data if family == "edm" else None)
    return lv, parsed


def _continuous_weight(lv: Levels, weighting: Weighting, prediction: str, parsed: tuple):
    """``_weight_table`` on per-sample levels, computed without reading a value; on the host
    one check of the result, and only when it fails the table path's checks, which raise its
    messages."""
    w = _weight_table(lv, weighting, prediction, parsed, host_checks=False)

    def explain(bad: torch.Tensor) -> str:
        _weight_table(lv, weighting, prediction, parsed)  # raises the table path's message
        return (
            f"weighting {parsed[0]!r} has no finite value at {_where(lv, bad)}; pass "
            "max_weight=<cap> or use another weighting"
        )

    check_range(w, explain, "weighting: a weight with no finite value at some sigma", low=0.0)
    return w


# Tables are constants of a compiled graph: torch.compile evaluates these once while tracing
# (their checks read data, which tracing cannot) and keeps the result. Both serve the public
# ops past their door: ``prediction`` is resolved (``resolve_prediction``) and ``dtype`` is
# a data dtype; they check the weighting and its options, which make their cache key.
@torch.compiler.assume_constant_result
def cached_weight_table(
    schedule: NoiseSchedule,
    weighting: Weighting,
    prediction: str,
    dtype: torch.dtype,
    device: torch.device,
    options: dict[str, Any],
) -> torch.Tensor:
    """``weight_table`` cast to ``dtype`` on ``device``, cached on the schedule for named
    weightings (tables and callables are rebuilt on each call)."""
    parsed = _parse(weighting, options)
    if not isinstance(weighting, str):
        return _weight_table(schedule, weighting, prediction, parsed).to(device, dtype)
    key = ("weight", _options_key(parsed), prediction, dtype)
    return schedule.table(
        key, lambda: _weight_table(schedule, weighting, prediction, parsed).to(dtype), device
    )


@torch.compiler.assume_constant_result
def cached_loss_table(
    schedule: NoiseSchedule,
    weighting: Weighting,
    prediction: str,
    data_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: torch.device,
    options: dict[str, Any],
) -> torch.Tensor:
    """``loss_table`` for data of ``data_dtype``, cast to ``compute_dtype`` on ``device``;
    cached on the schedule for named weightings (tables and callables are rebuilt on each
    call)."""
    parsed = _parse(weighting, options)
    if not isinstance(weighting, str):
        table = _loss_table(schedule, weighting, prediction, data_dtype, parsed)
        return table.to(device, compute_dtype)
    key = ("loss", _options_key(parsed), prediction, data_dtype, compute_dtype)
    return schedule.table(
        key,
        lambda: _loss_table(schedule, weighting, prediction, data_dtype, parsed).to(compute_dtype),
        device,
    )


def resolve_prediction(schedule: NoiseSchedule, prediction: str | None) -> str:
    """The prediction type to use (None: the schedule's; "denoised" is "sample"), checked
    against the schedule's family ("raw" is EDM's only)."""
    prediction = schedule.prediction_type if prediction is None else prediction
    return check_prediction(prediction, "prediction", schedule.family)


def _options_key(parsed: tuple) -> tuple:
    """A hashable cache key of the options as ``_parse`` checked them (so a bad option is
    refused by name, not by the cache's hash)."""
    name, params, max_weight, normalize = parsed
    return (name, tuple(sorted(params.items())), max_weight, normalize)


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
        params[key] = check_float(key, options[key], low=0.0, inclusive=key == "k")
    max_weight = options.get("max_weight")
    if max_weight is not None:
        max_weight = check_float("max_weight", max_weight, low=0.0)
    normalize = options.get("normalize", False)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    return name, params, max_weight, normalize


def _declared_weight(weighting: Weighting, name: str, params: dict, schedule: NoiseSchedule):
    """The weights in their declared space (SPACES), float64 [T]."""
    sigma = schedule.sigma  # snr is read only by the weightings that need it (Levels)
    if name in ("none", "logit_normal", "mode", "constant"):
        return torch.ones_like(sigma)
    if name == "sigma_sqrt":
        return sigma**-2.0
    if name == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    if name == "edm":
        sd = schedule.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2
    if name == "debias":
        return schedule.snr.rsqrt()
    if name == "p2":
        return (params["k"] + schedule.snr) ** -params["gamma"]
    if name == "min_snr":
        # min(snr, gamma)/snr written so that snr == 0 gives 1, not 0/0.
        return (params["gamma"] / schedule.snr).clamp(max=1.0)
    snr = schedule.snr
    w = weighting(snr.clone()) if name == "callable" else weighting
    w = torch.as_tensor(w).detach().to(snr.device, torch.float64).flatten()
    if w.numel() != snr.numel():
        what = "timestep" if isinstance(schedule, NoiseSchedule) else "sample"
        raise ValueError(
            f"weighting table must have one entry per {what} ({snr.numel()}), got {w.numel()}"
        )
    if snr.device.type == "cpu" and not torch.compiler.is_compiling():
        if torch.isnan(w).any() or (w < 0).any():
            raise ValueError("weighting values must be >= 0 and not NaN")
    else:
        w = torch.where(w < 0, math.nan, w)  # refused on the device by the caller's assert
    return w


def _inverse_k2(schedule: NoiseSchedule, target: str) -> torch.Tensor:
    """1 / k^2 per t (module docstring): ||eps - eps_hat||^2 / ||y - y_hat||^2 at fixed x_t,
    the factor that carries an epsilon-space weight to ``target``, in closed form."""
    snr, a, s = schedule.snr, schedule.alpha, schedule.sigma
    if target == "epsilon":
        return torch.ones_like(snr)
    if target == "v_prediction":
        # its limit 1 at snr = inf (a continuous flow sigma of 0), not inf / inf
        return torch.where(torch.isinf(snr), 1.0, snr / (snr + 1))
    if target == "sample":
        return snr
    if target == "flow":
        return (a / (a + s)) ** 2
    sd = schedule.sigma_data  # raw: c_out^2 / s^2
    return sd**2 / (s**2 + sd**2)


def _m(schedule: NoiseSchedule, target: str) -> torch.Tensor:
    """|a k| per t for ``target`` (module docstring): zero only for epsilon at snr == 0."""
    a, s = schedule.alpha, schedule.sigma
    if target == "epsilon":
        return a
    if target == "v_prediction":
        return torch.hypot(a, s)
    if target == "sample":
        return s
    if target == "flow":
        return a + s
    sd = schedule.sigma_data  # raw: s / |c_out|
    return (s**2 + sd**2).sqrt() / sd


def _where(schedule: NoiseSchedule | Levels, mask: torch.Tensor) -> str:
    """Where ``mask`` holds, in the schedule's own timesteps (per-sample levels: their
    sigmas), for a message."""
    index = mask.nonzero().flatten()
    i = int(index[0])
    at = f"snr={schedule.snr[i]:.3g}, sigma={schedule.sigma[i]:.3g}"
    if isinstance(schedule, Levels):
        return f"sigma={schedule.sigma[index[:4]].tolist()} (sample {i}: {at})"
    if schedule.family == "ddpm":
        return f"t={index[:4].tolist()} ({at})"
    return f"timesteps {schedule.timesteps[index[:4]].tolist()} (table index {i}: {at})"


def _refuse_unbounded(name: str, space: str, schedule: NoiseSchedule, where: torch.Tensor):
    raise ValueError(
        f"weighting {name!r} is unbounded at {_where(schedule, where)}. Pass "
        f"max_weight=<cap> (e.g. max_weight=1e3) to cap the weight in its own ({space}) "
        "space, or use another weighting"
    )


def _refuse_conversion(
    name: str, space: str, target: str, schedule: NoiseSchedule, where: torch.Tensor
):
    raise ValueError(
        f"weighting {name!r}, declared on the {space} target, has no finite value as a "
        f"weight on the {target} target at {_where(schedule, where)}: x_t is pure noise "
        f"there, so any {target} error is an infinite {space} error. max_weight caps "
        f"weights in their declared space and cannot bound this: train prediction={space!r}, "
        "or use an epsilon-space weighting (constant, debias, p2, min_snr)"
    )


def _zero_snr_limit(name: str, params: dict, strict: bool = True) -> float:
    """lim_{snr->0+} w(snr) * factor(snr) for weightings unbounded at snr == 0; every
    target's conversion factor behaves like snr there. Where there is none: a ValueError, or
    NaN when not ``strict``."""
    if name == "debias":  # snr^-1/2 * snr
        return 0.0
    if name == "p2":  # k == 0: snr^-gamma * snr
        gamma = params["gamma"]
        if gamma < 1:
            return 0.0
        if gamma == 1:
            return 1.0
    if not strict:
        return math.nan
    raise ValueError(
        f"weighting {name!r} grows too fast at zero SNR to convert to this target; "
        "pass max_weight=<cap> to bound it"
    )
