"""Learned variance (guided-diffusion's ``learn_sigma`` with ``LEARNED_RANGE``): the maths the
training loss and the DDPM sampler share.

The network outputs 2C channels: the first C are the usual prediction (epsilon, v or x0), the
last C are ``v`` (about [-1, 1]) that interpolates the log variance of p(x_{t-1} | x_t) between
the two classical choices, per element:

    frac = (v + 1) / 2
    log var = frac log(beta_t) + (1 - frac) log(beta_tilde_t, clipped)

    beta_t = 1 - abar_t / abar_{t-1}                (abar_{-1} = 1)
    beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)    (the posterior variance)
    clipped: beta_tilde_0 = 0 is replaced by beta_tilde_1 (guided-diffusion's
             ``posterior_log_variance_clipped``)

The variance is trained with the variational bound term of Ho et al. / Nichol & Dhariwal, in
bits per dimension, with the mean frozen (``vb_loss``):

    t > 0:   KL( q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t) )
    t == 0:  -log p(x0 | x_1), a Gaussian discretized to 255 bins over [-1, 1]

guided-diffusion adds it to the MSE multiplied by ``T / 1000`` (``LossType.RESCALED_MSE``);
``vb_loss`` returns the term without that factor.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from debias.schedules import FAMILY_PREDICTIONS, NoiseSchedule, as_schedule, check_timesteps

__all__ = [
    "discretized_gaussian_log_likelihood",
    "model_log_variance",
    "normal_kl",
    "posterior_tables",
    "vb_loss",
]

# The DDPM targets the pipeline turns into x0_hat (guided-diffusion's and diffusers' DDPM
# schedulers' three): the ddpm family's predictions but rectified flow's velocity eps - x0, which
# the pipeline trains and samples on flow schedules only.
DDPM_PREDICTIONS = tuple(p for p in FAMILY_PREDICTIONS["ddpm"] if p != "flow")

# Row order of the float32 table vb_loss gathers from (one gather per step instead of nine).
_ROWS = (
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",
    "log_betas",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)


def posterior_tables(alphas_cumprod: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float64 ``[S]`` tables of the DDPM posterior for a (possibly respaced) schedule.

    Args:
        alphas_cumprod: ``[S]`` abar_t, decreasing, in [0, 1) (``NoiseSchedule.alphas_cumprod``
            or that of a respaced schedule, whose betas are recomputed from the kept abar).

    Returns:
        A dict of ``[S]`` float64 CPU tensors, guided-diffusion's names:
        ``betas`` (1 - abar_t / abar_{t-1}), ``log_betas``, ``alphas_cumprod``,
        ``alphas_cumprod_prev`` (1 before the first step), ``posterior_variance`` (beta_tilde),
        ``posterior_log_variance_clipped`` (log beta_tilde with entry 0 replaced by entry 1;
        with S == 1, where there is no entry 1, ``log(beta_0)``), ``posterior_mean_coef1``
        and ``posterior_mean_coef2`` (mean = coef1 x0 + coef2 x_t), ``sqrt_alphas_cumprod``,
        ``sqrt_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod`` (inf where abar = 0)
        and ``sqrt_recipm1_alphas_cumprod``.

    Raises:
        ValueError: a table that is not 1-D, empty, outside [0, 1), or not strictly
            decreasing (beta_t = 0 has no log variance).
    """
    if not isinstance(alphas_cumprod, torch.Tensor):
        raise TypeError(f"alphas_cumprod must be a tensor, got {type(alphas_cumprod).__name__}")
    abar = alphas_cumprod.detach().to("cpu", torch.float64)
    if abar.dim() != 1 or abar.numel() < 1:
        raise ValueError(f"alphas_cumprod must be a non-empty [S] table, got {list(abar.shape)}")
    if not torch.isfinite(abar).all() or (abar < 0).any() or (abar >= 1).any() or abar[0] <= 0:
        raise ValueError("alphas_cumprod must be finite, in [0, 1), with alphas_cumprod[0] > 0")
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1.0 - abar / abar_prev
    if (betas <= 0).any():
        bad = int(torch.nonzero(betas <= 0)[0])
        raise ValueError(
            f"alphas_cumprod must be strictly decreasing for a learned variance: beta_{bad} = "
            f"{betas[bad].item():.3g} has no log (abar[{bad}] = {abar[bad].item():.6g})"
        )
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    first = post_var[1:2] if abar.numel() > 1 else betas[:1]
    return {
        "betas": betas,
        "log_betas": betas.log(),
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.cat([first, post_var[1:]]).log(),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar),
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
        "sqrt_recip_alphas_cumprod": abar.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
    }


def model_log_variance(
    var_values: torch.Tensor,
    log_beta: torch.Tensor | float,
    log_variance_clipped: torch.Tensor | float,
) -> torch.Tensor:
    """LEARNED_RANGE: ``frac log_beta + (1 - frac) log_variance_clipped``, ``frac = (v+1)/2``.

    Args:
        var_values: ``[B, C, ...]`` the network's variance channels v.
        log_beta, log_variance_clipped: the step's log(beta_t) and clipped log(beta_tilde_t),
            floats or tensors broadcastable to ``var_values`` (``[B, 1, ...]``).

    Returns:
        The per-element log variance, shaped like ``var_values``.
    """
    frac = (var_values + 1.0) * 0.5
    return frac * log_beta + (1.0 - frac) * log_variance_clipped


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats.

    ``0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2) - 1 + (mean1 - mean2)^2 exp(-logvar2))``
    (guided-diffusion's ``normal_kl``), with ``exp(d) - 1`` written as ``expm1(d)`` so that a
    variance close to the true one keeps its digits. Arguments broadcast.
    """
    d = logvar1 - logvar2
    return 0.5 * (torch.expm1(d) - d + (mean1 - mean2).square() * torch.exp(-logvar2))


def _tanh_cdf_logit(x: torch.Tensor) -> torch.Tensor:
    """The logit of guided-diffusion's tanh approximation of the standard normal CDF:
    0.5 (1 + tanh(g)) = sigmoid(2 g), g = sqrt(2/pi) (x + 0.044715 x^3). Its bits per dim are
    defined with this approximation; the sigmoid form keeps the tails' digits in float32."""
    return (2.0 * math.sqrt(2.0 / math.pi)) * (x + 0.044715 * x.pow(3))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-likelihood in nats of data ``x`` in [-1, 1] (8-bit images rescaled) under
    a Gaussian discretized to 255 bins of width 2/255: the mass of ``[x - 1/255, x + 1/255]``,
    with the edge bins extended to -inf (x < -0.999) and +inf (x > 0.999); probabilities
    clamped at 1e-12 (guided-diffusion's ``discretized_gaussian_log_likelihood``, with its tanh
    approximation of the normal CDF).

    The bin mass is taken on the side of the mean where both CDF values are small (for x above
    the mean, ``(1 - cdf(min)) - (1 - cdf(plus))``), and the edge terms with ``logsigmoid``:
    the same numbers as upstream's ``cdf(plus) - cdf(min)``, without its float32 cancellation
    when the mean is several standard deviations from the bin.

    Args:
        x, means, log_scales: broadcastable tensors; ``log_scales`` is log(std).
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus = _tanh_cdf_logit(inv_stdv * (centered + 1.0 / 255.0))
    minus = _tanh_cdf_logit(inv_stdv * (centered - 1.0 / 255.0))
    log_floor = math.log(1e-12)
    log_cdf_plus = torch.nn.functional.logsigmoid(plus).clamp(min=log_floor)
    log_one_minus_cdf_min = torch.nn.functional.logsigmoid(-minus).clamp(min=log_floor)
    above = centered > 0
    delta = torch.where(
        above,
        torch.sigmoid(-minus) - torch.sigmoid(-plus),
        torch.sigmoid(plus) - torch.sigmoid(minus),
    )
    log_cdf_delta = delta.clamp(min=1e-12).log()
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def vb_loss(
    var_values: torch.Tensor,
    mean_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule | Any,
    prediction: str | None = None,
) -> torch.Tensor:
    """guided-diffusion's variational bound term (``_vb_terms_bpd``) in bits per dimension,
    the gradient reaching ``var_values`` only.

    With x0_hat from the frozen ``mean_output`` (no clipping) and, at the sample's t,

        mean_q = coef1 x0 + coef2 x_t,  log var_q = log beta_tilde_t (clipped)
        mean_p = coef1 x0_hat + coef2 x_t,  log var_p = model_log_variance(var_values)
        t > 0:   KL(N(mean_q, var_q) || N(mean_p, var_p))
        t == 0:  -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 log var_p)

    averaged over the non-batch dims and divided by log 2. The mean difference is computed as
    ``coef1 (x0 - x0_hat)``, the same number without the cancellation of the coef2 x_t terms.
    The RESCALED_MSE factor ``T / 1000`` is the caller's.

    Args:
        var_values: ``[B, C, ...]`` the variance channels (the last C of a 2C output); float.
        mean_output: ``[B, C, ...]`` the prediction channels (the first C); detached here.
        x0: ``[B, C, ...]`` the clean data in [-1, 1] (the decoder term assumes 8-bit data
            rescaled to [-1, 1]).
        x_t: ``[B, C, ...]`` the noisy input the network saw, sqrt(abar_t) x0 + sqrt(1 - abar_t)
            eps.
        t: ``[B]`` integer timesteps in [0, T), on the device of the tensors.
        schedule: the DDPM training schedule (``NoiseSchedule`` or diffusers scheduler), T steps.
        prediction: what ``mean_output`` is: "epsilon", "v_prediction" or "sample"; default
            ``schedule.prediction_type``.

    Returns:
        ``[B]`` float32, bits per dimension per sample.

    Raises:
        TypeError / ValueError (naming the argument): non-tensors, non-float tensors, shapes or
            devices that differ, t not integer ``[B]`` in [0, T), a schedule that is not DDPM or
            not strictly decreasing, an unknown prediction, "epsilon" on a schedule with
            abar == 0 (x0_hat undefined there); a non-finite result when the tensors are on the
            CPU (on an accelerator the value is returned as is: checking would synchronise).
    """
    named = {"var_values": var_values, "mean_output": mean_output, "x0": x0, "x_t": x_t}
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got dtype {value.dtype}")
        if value.shape != var_values.shape:
            raise ValueError(
                f"{name} has shape {list(value.shape)} but var_values has shape "
                f"{list(var_values.shape)}; all four must match [B, C, ...]"
            )
        if value.device != var_values.device:
            raise ValueError(
                f"{name} is on {value.device} but var_values is on {var_values.device}"
            )
    if var_values.dim() < 2 or var_values.numel() == 0:
        raise ValueError(
            f"var_values must be a non-empty [B, C, ...] tensor, got shape {list(var_values.shape)}"
        )
    schedule = as_schedule(schedule)
    if schedule.family != "ddpm":
        raise ValueError(
            f"schedule must be a ddpm schedule (a learned variance is DDPM's), got a "
            f"{schedule.family} schedule"
        )
    if prediction is None:
        prediction = schedule.prediction_type
    if prediction not in DDPM_PREDICTIONS:
        raise ValueError(f"prediction must be one of {DDPM_PREDICTIONS}, got {prediction!r}")
    if prediction == "epsilon" and (schedule.alphas_cumprod == 0).any():
        raise ValueError(
            "prediction='epsilon' on a schedule with abar == 0 (zero terminal SNR): x0_hat = "
            "(x_t - eps)/0 is undefined at the last step; use v_prediction or sample"
        )
    B = var_values.shape[0]
    check_timesteps(t, schedule.num_timesteps, batch=B)
    if t.device != var_values.device:
        raise ValueError(f"t is on {t.device} but var_values is on {var_values.device}")

    device = var_values.device
    table = schedule.table(("vb_loss",), lambda: _vb_table(schedule), device)
    view = (B,) + (1,) * (var_values.dim() - 1)
    c = table[:, t.long()]  # [8, B] float32, one gather
    coef1, coef2, lvc, log_beta, sqrt_a, sqrt_1ma, srecip, srecipm1 = (r.view(view) for r in c)

    f32 = torch.float32
    out = mean_output.detach().to(f32)
    x0 = x0.detach().to(f32)
    x_t = x_t.detach().to(f32)
    if prediction == "epsilon":
        x0_hat = srecip * x_t - srecipm1 * out
    elif prediction == "v_prediction":
        x0_hat = sqrt_a * x_t - sqrt_1ma * out
    else:
        x0_hat = out
    mean_p = coef1 * x0_hat + coef2 * x_t
    log_var_p = model_log_variance(var_values.to(f32), log_beta, lvc)

    kl = normal_kl(coef1 * (x0 - x0_hat), lvc, 0.0, log_var_p)
    nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * log_var_p)
    dims = tuple(range(1, var_values.dim()))
    bits = torch.where(t == 0, nll.mean(dims), kl.mean(dims)) / math.log(2.0)
    if device.type == "cpu" and not torch.compiler.is_compiling():
        bad = ~torch.isfinite(bits)
        if bool(bad.any()):
            where = torch.nonzero(bad).flatten()[:5].tolist()
            inputs_finite = all(bool(torch.isfinite(v).all()) for v in named.values())
            why = (
                "the inputs are finite: var_values overflows exp() in float32"
                if inputs_finite
                else "the inputs hold non-finite values"
            )
            raise ValueError(
                f"vb_loss is not finite for samples {where} (t={t[where].tolist()}); {why}"
            )
    return bits


def _vb_table(schedule: NoiseSchedule) -> torch.Tensor:
    """``[8, T]`` float32 rows ``_ROWS`` of ``posterior_tables``, computed in float64."""
    tables = posterior_tables(schedule.alphas_cumprod)
    return torch.stack([tables[name] for name in _ROWS]).float()
