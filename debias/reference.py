"""Pure-torch ground truth for every op: the test oracle, the benchmark's eager baseline and
the backend of last resort.

Written for clarity in the shape of the code diffusion trainers run today, not for speed:
DDPM as diffusers' ``DDPMScheduler.add_noise`` / ``get_velocity`` and
``train_text_to_image.py``'s loss; flow matching as ``FlowMatchEulerDiscreteScheduler
.scale_noise`` and the SD3 / Flux DreamBooth scripts' loss lines; EDM as Karras et al. 2022
(``EDMPrecond``, ``EDMLoss``) and diffusers' ``EDMEulerScheduler``. ``coefficients`` and
``weight`` give every family's and every prediction's per-sample coefficients and weights from
the papers' closed forms in float64, independent of ``debias.schedules`` and
``debias.weighting``. Memory traffic is counted in elements of the ``[B, ...]`` tensors,
N = numel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# ---- the noise stream ---------------------------------------------------------------------
#
# Philox4x32-10 (Salmon et al. 2011, Random123 constants). Element i of a noise tensor (flat,
# row-major) comes from counter (g_lo, g_hi, offset_lo, offset_hi) with g = i // 4 and key
# (seed_lo, seed_hi); of the four output words, lane i % 4 is used. Words become normals by
# Box-Muller: u(x) = x * 2^-32 + 2^-33 (float32) lies in (0, 1]; (x0, x1) -> r = sqrt(-2 ln
# u(x0)), theta = 2 pi u(x1), n0 = r cos theta, n1 = r sin theta; (x2, x3) -> n2, n3 likewise.
# csrc/philox.h holds the same definition; every backend produces this stream.

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) words of the 64-bit product of uint32 values ``a`` (held in int64) and ``m``,
    computed in 16-bit halves of ``m`` so nothing overflows int64."""
    p_lo = a * (m & 0xFFFF)  # < 2^48
    p_hi = a * (m >> 16)  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32(counter: torch.Tensor, key: tuple[int, int], rounds: int = 10) -> torch.Tensor:
    """Philox4x32 on a ``[N, 4]`` int64 tensor of uint32 counter words; returns ``[N, 4]``."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=-1)


def philox_normal(
    seed: int, offset: int, numel: int, device=None, *, start: int = 0
) -> torch.Tensor:
    """Normals ``start .. start + numel - 1`` of the stream ``(seed, offset)``, float32
    ``[numel]``."""
    seed, offset = seed & (2**64 - 1), offset & (2**64 - 1)
    first = start // 4
    groups = torch.arange(first, (start + numel + 3) // 4, dtype=torch.int64, device=device)
    counter = torch.stack(
        (
            groups & _MASK32,
            groups >> 32,
            torch.full_like(groups, offset & _MASK32),
            torch.full_like(groups, offset >> 32),
        ),
        dim=-1,
    )
    x = philox4x32(counter, (seed & _MASK32, seed >> 32))
    u = x.to(torch.float32) * 2.0**-32 + 2.0**-33  # exact as specified, in float32
    # The transform in float64, rounded once: the stream's ideal value, which the kernels'
    # float32 log/sin/cos approach within a few ulp.
    u = u.double()
    r = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))
    theta = (2 * math.pi) * u[:, 1::2]
    normals = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=-1).float()
    skip = start - 4 * first
    return normals.reshape(-1)[skip : skip + numel]


# ---- noising ------------------------------------------------------------------------------


def add_noise(
    x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """diffusers' ``scheduler.add_noise``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` in
    x0's dtype. Traffic: read 2N, write N, plus two N-sized temporaries (write 2N, read 2N)."""
    abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    sqrt_alpha_prod = (abar[t] ** 0.5).view(shape)
    sqrt_one_minus_alpha_prod = ((1 - abar[t]) ** 0.5).view(shape)
    return sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * noise


def get_velocity(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """diffusers' ``scheduler.get_velocity``: ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0``."""
    abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    sqrt_alpha_prod = (abar[t] ** 0.5).view(shape)
    sqrt_one_minus_alpha_prod = ((1 - abar[t]) ** 0.5).view(shape)
    return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * x0


# ---- the weighted loss --------------------------------------------------------------------
#
# Every family is one affine op (csrc/noise_loss.h): x_t = a x0 + s eps, target
# y = p eps + q x0, loss_b = w_b mean_i (pred - y)^2, with [B] coefficients per sample. The
# functions below are those lines; `noise_loss` is diffusers' DDPM step in their terms.


def noised(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``a_b x0 + s_b noise`` in x0's dtype for per-sample ``a, s [B]``, as the trainers write
    it (``(1 - sigmas) * x0 + sigmas * noise``, ``add_noise``). Traffic: read 2N, write N, plus
    two N-sized temporaries."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return a.to(x0.dtype).view(shape) * x0 + s.to(x0.dtype).view(shape) * noise


def perturbed(noise: torch.Tensor, xi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``noise + g_b xi`` in noise's dtype: input perturbation as the trainers write it
    (diffusers' ``noise + args.input_perturbation * torch.randn_like(noise)``, sd-scripts'
    ``noise + ip_noise_gamma * xi``): the product rounds to noise's dtype, then the sum."""
    shape = (-1,) + (1,) * (noise.dim() - 1)
    return noise + (g.view(shape) * xi.to(g.dtype)).to(noise.dtype)


def affine_target(
    noise: torch.Tensor | None, x0: torch.Tensor | None, p: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """``y = p_b noise + q_b x0`` in p's dtype; a term whose tensor is None is left out
    (epsilon: noise only, x0: x0 only). Traffic: read N per term, write N per term."""
    ref = noise if noise is not None else x0
    shape = (-1,) + (1,) * (ref.dim() - 1)
    eps_term = p.view(shape) * noise.to(p.dtype) if noise is not None else None
    x0_term = q.view(shape) * x0.to(q.dtype) if x0 is not None else None
    if eps_term is None or x0_term is None:
        return eps_term if x0_term is None else x0_term
    return eps_term + x0_term


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """The trainers' loss lines: ``mse_loss(pred.float(), target.float(), "none")`` averaged
    over the non-batch dims, times the per-sample weight ``w [B]``, then reduced.
    Traffic: read 2N, write N twice (float copies in low precision, the squared error)."""
    acc = torch.promote_types(pred.dtype, torch.float32)  # `.float()`, but fp64 stays fp64
    loss = F.mse_loss(pred.to(acc), target.to(acc), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.dim()))) * w.to(loss.dtype)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


# The elementwise losses of the kernels (csrc/noise_loss.h): l and its derivative factor h, and
# the constant k of the gradient 2 w / D h (l2) or w / D h. "pseudo_huber" is
# sqrt(d^2 + c^2) - c written without its cancellation; the trainers' "huber" (sd-scripts:
# 2 c (sqrt(d^2 + c^2) - c)) and "smooth_l1" (2 (sqrt(d^2 + c^2) - c)) are it times 2c or 2.
LOSS_KINDS = ("l2", "l1", "pseudo_huber")


def loss_and_factor(
    d: torch.Tensor, kind: str, c: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(l(d), h(d), k) elementwise in d's dtype; c ``[B]`` for "pseudo_huber"."""
    if kind == "l2":
        return d * d, d, 2.0
    if kind == "l1":
        return d.abs(), torch.sign(d), 1.0
    if kind != "pseudo_huber":
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
    c = c.to(d.dtype).view((-1,) + (1,) * (d.dim() - 1))
    dd = d * d
    r = ieee_sqrt(dd + c * c)
    return dd / (r + c), d / r, 1.0


def ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt rounded to nearest, as every kernel takes it. torch's CPU sqrt goes through a
    vector math library accurate to an ulp, not rounded to nearest (~17% of float32 values
    differ); numpy's, like CUDA's, is the IEEE operation."""
    if x.device.type != "cpu":
        return torch.sqrt(x)
    return torch.from_numpy(np.sqrt(x.detach().numpy()))


def weighted_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    w: torch.Tensor,
    reduction: str = "mean",
    kind: str = "l2",
    c: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w_b mean_i m_i l(pred_i - y_i)`` reduced over the batch: the kernels' loss, in the
    compute type (``.float()``; float64 stays float64). ``mask`` broadcasts to pred."""
    acc = torch.promote_types(pred.dtype, torch.float32)
    d = pred.to(acc) - target.to(acc)
    loss = loss_and_factor(d, kind, c)[0]
    if mask is not None:
        loss = mask.to(acc) * loss
    loss = loss.mean(dim=list(range(1, loss.dim()))) * w.to(acc)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def weighted_loss_grad(
    pred: torch.Tensor,
    target: torch.Tensor,
    w: torch.Tensor,
    div: int = 1,
    kind: str = "l2",
    c: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """d weighted_loss / d pred in closed form, ``(k w_b / D / div) * (m h)``, in w's dtype,
    rounded once to pred's: the kernels' gradient, bit for bit."""
    shape = (-1,) + (1,) * (pred.dim() - 1)
    d = pred.to(w.dtype) - target.to(w.dtype)
    _, h, k = loss_and_factor(d, kind, c)
    if mask is not None:
        h = mask.to(w.dtype) * h
    return ((k * w / d[0].numel() / div).view(shape) * h).to(pred.dtype)


def noise_loss(
    pred: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    weights: torch.Tensor,
    x0: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    prediction: str = "epsilon",
    reduction: str = "mean",
) -> torch.Tensor:
    """The per-sample-weighted MSE of diffusers' train_text_to_image.py (``snr_gamma`` path).

    ``weights`` is the ``[T]`` table of the target's weights (``debias.weight_table``).
    """
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = get_velocity(x0, noise, t, alphas_cumprod)
    elif prediction == "sample":
        target = x0
    else:
        raise ValueError(f"unknown prediction {prediction!r}")
    return weighted_mse(pred, target, weights.to(pred.device)[t], reduction)


# ---- flow matching (rectified flow: SD3, Flux) -----------------------------------------------
#
# diffusers' FlowMatchEulerDiscreteScheduler and train_dreambooth_lora_{sd3,flux}.py:
# x_t = (1 - sigma) x0 + sigma eps, the network predicts u = eps - x0, and the loss is
# compute_loss_weighting_for_sd3's weight times the squared error, averaged per sample.


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x [B]`` viewed ``[B, 1, ...]`` against ``like [B, ...]``, as the scripts' get_sigmas
    shapes sigmas."""
    return x.reshape((-1,) + (1,) * (like.dim() - 1))


def flow_noised(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The scripts' ``(1.0 - sigmas) * model_input + sigmas * noise`` (and ``scale_noise``'s
    ``sigma * noise + (1.0 - sigma) * sample``, the same bits) for per-sample ``sigmas [B]``,
    taken in x0's dtype as get_sigmas does. Traffic: read 2N, write N, plus two N-sized
    temporaries (write 2N, read 2N)."""
    sigmas = _per_sample(sigmas.to(x0.dtype), x0)
    return (1.0 - sigmas) * x0 + sigmas * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``noise - model_input``. Traffic: read 2N, write N."""
    return noise - x0


def sd3_loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``compute_loss_weighting_for_sd3``: ``sigma_sqrt`` sigma^-2, ``cosmap``
    2 / (pi (1 - 2 sigma + 2 sigma^2)), any other scheme 1; on sigmas of any shape. Its
    ``.float()`` is float32 for every input; here float64 sigmas stay float64, the precision
    the package computes float64 data in (for float32 and lower the two are the same)."""
    if weighting_scheme == "sigma_sqrt":
        return (sigmas**-2.0).to(torch.promote_types(sigmas.dtype, torch.float32))
    if weighting_scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        return 2 / (math.pi * bot)
    return torch.ones_like(sigmas)


def flow_loss(
    pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """The SD3 / Flux scripts' loss lines, with per-sample ``weighting [B]``::

        loss = torch.mean(
            (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(B, -1), 1
        )
        loss = loss.mean()

    ``.float()`` is float32 for every input; here float64 data stays float64, as the
    package's float64 path computes (for float32 and lower the two are the same).
    Traffic: read 2N, write N three times (the difference, its square, the weighted square)
    plus the float copies in low precision."""
    acc = torch.promote_types(pred.dtype, torch.float32)
    w = _per_sample(weighting.to(acc), pred)
    loss = torch.mean((w * (pred.to(acc) - target.to(acc)) ** 2).reshape(target.shape[0], -1), 1)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


# ---- EDM (Karras et al. 2022) -------------------------------------------------------------
#
# x_t = x0 + sigma eps. The network F is wrapped as D(x_t) = c_skip x_t + c_out F(c_in x_t,
# c_noise) (EDMPrecond; diffusers' EDMEulerScheduler.precondition_inputs/_noise/_outputs) and
# trained with EDMLoss: lambda(sigma) ||D - x0||^2, lambda = (sigma^2 + sd^2) / (sigma sd)^2.
# EDMLoss sums the elements; the trainers (and fused_loss) average them, a factor of D.


def edm_precondition(
    sigma: torch.Tensor, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDMPrecond's ``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma``:
    sd^2 / (sigma^2 + sd^2), sigma sd / sqrt(sigma^2 + sd^2), 1 / sqrt(sigma^2 + sd^2) and
    ln(sigma) / 4. (diffusers negates c_out for a "v_prediction" EDM scheduler.)"""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_noised(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """EDMEulerScheduler.add_noise's ``original_samples + noise * sigma`` for per-sample
    ``sigmas [B]`` in x0's dtype. Traffic: read 2N, write N, plus one N-sized temporary."""
    return x0 + noise * _per_sample(sigmas.to(x0.dtype), x0)


def edm_denoised(
    x_t: torch.Tensor, raw: torch.Tensor, sigmas: torch.Tensor, sigma_data: float = 0.5
) -> torch.Tensor:
    """EDMPrecond's output ``D = c_skip x_t + c_out F`` from the network's raw output F."""
    c_skip, c_out, _, _ = edm_precondition(_per_sample(sigmas, x_t), sigma_data)
    return c_skip * x_t + c_out * raw


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDMLoss's ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``, the weight of ||D - x0||^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_raw_target(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, sigma_data: float = 0.5
) -> torch.Tensor:
    """The F for which D = x0: ``(x0 - c_skip x_t) / c_out``, so that c_out^2 ||F - target||^2
    = ||D - x0||^2 (the "raw" prediction's target, affine in x0 and noise)."""
    sigmas = _per_sample(sigmas, x0)
    c_skip, c_out, _, _ = edm_precondition(sigmas, sigma_data)
    return (x0 - c_skip * (x0 + sigmas * noise)) / c_out


def edm_loss(
    raw: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    sigma_data: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """EDMLoss on the network's raw output F at x_t = x0 + sigma noise: lambda(sigma) times the
    squared error of D = c_skip x_t + c_out F against x0, averaged per sample, then reduced.
    Traffic: read 3N, write N four times (x_t, D, the error, its square)."""
    x_t = edm_noised(x0, noise, sigmas)
    denoised = edm_denoised(x_t, raw, sigmas, sigma_data)
    return weighted_mse(denoised, x0, edm_weight(sigmas, sigma_data), reduction)


# ---- every family and prediction: coefficients and weights --------------------------------
#
# The closed forms behind the fused op: x_t = a x0 + s eps, target y = p eps + q x0, and the
# weight on ||pred - y||^2 of a weighting declared in its own space (DESIGN: at fixed x_t,
# ||y - y_hat||^2 = k^2 ||eps - eps_hat||^2 with k = p - q s / a, so a weight declared on
# target S becomes w k_S^2 / k_y^2 on target y).


def coefficients(
    family: str, level: torch.Tensor, prediction: str, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, s, p, q)`` in float64 for each sample's noise ``level`` (abar_t for "ddpm",
    sigma_t for "flow" and "edm"):

        ddpm  a = sqrt(abar), s = sqrt(1 - abar)     flow  a = 1 - sigma, s = sigma
        edm   a = 1, s = sigma

        epsilon (1, 0)   sample (0, 1)   flow (1, -1)
        v_prediction (a, -s) / sqrt(a^2 + s^2)   (diffusers' get_velocity on DDPM, where
                         a^2 + s^2 = 1)
        raw   (-c_skip s, 1 - c_skip) / c_out    (EDM: the F of edm_raw_target)
    """
    level = level.double()
    if family == "ddpm":
        a, s = level.sqrt(), (1 - level).sqrt()
    elif family == "flow":
        a, s = 1 - level, level
    else:
        a, s = torch.ones_like(level), level
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if prediction == "epsilon":
        return a, s, one, zero
    if prediction == "sample":
        return a, s, zero, one
    if prediction == "flow":
        return a, s, one, -one
    if prediction == "v_prediction":
        norm = (a**2 + s**2).sqrt()
        return a, s, a / norm, -s / norm
    c_skip, c_out, _, _ = edm_precondition(s, sigma_data)
    return a, s, -c_skip * s / c_out, (1 - c_skip) / c_out


def weight(
    weighting: str,
    family: str,
    level: torch.Tensor,
    prediction: str,
    sigma_data: float = 0.5,
    k: float = 1.0,
    gamma: float | None = None,
) -> torch.Tensor:
    """The per-sample weight ``[B]`` float64 on ``||pred - y||^2`` for ``prediction``, of a
    named weighting declared in its own space:

        epsilon  constant 1; debias 1 / sqrt(snr) (Yu et al. 2023); p2 1 / (k + snr)^gamma
                 (Choi et al. 2022, gamma 1); min_snr min(snr, gamma) / snr (Hang et al. 2023,
                 gamma 5)
        flow     compute_loss_weighting_for_sd3 (none, logit_normal, mode: 1; sigma_sqrt;
                 cosmap)
        sample   edm: lambda(sigma) (EDMLoss)

    converted to ``prediction`` by k_space^2 / k^2, written m_space^2 / m^2 with m = a k =
    a p - q s, which stays finite at zero SNR. Debias, unbounded there, converts to its limit:
    s a / m^2 (sigma (1 - sigma) on the flow target).
    """
    a, s, p, q = coefficients(family, level, prediction, sigma_data)
    m = a * p - q * s
    snr = (a / s) ** 2
    if weighting == "debias":  # 1 / sqrt(snr) = s / a, times a^2 / m^2
        return s * a / m**2
    if weighting == "edm":
        space, m_space, w = "sample", -s, edm_weight(s, sigma_data)
    elif weighting in ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap"):
        space, m_space, w = "flow", a + s, sd3_loss_weighting(weighting, s)
    else:
        space, m_space = "epsilon", a
        if weighting == "constant":
            w = torch.ones_like(snr)
        elif weighting == "p2":
            w = (k + snr) ** -(1.0 if gamma is None else gamma)
        else:  # min_snr, written so that snr == 0 gives 1, not 0/0
            w = ((5.0 if gamma is None else gamma) / snr).clamp(max=1.0)
    return w if space == prediction else w * (m_space / m) ** 2


# ---- nearest neighbours -------------------------------------------------------------------


def knn_features(x: torch.Tensor, metric: str) -> torch.Tensor:
    """The float64 vectors ``[n, d]`` a metric compares, from ``x [n, ...]``: the flattened data
    ("l2"), unit vectors ("cosine"), or ("standardized", the biased-generalization measure)
    each channel of each sample (dim 1 of ``[n, C, ...]``; 2-D data is one channel) shifted to
    mean 0 and scaled to standard deviation 1, a constant channel to 0, then the whole
    sample to a unit vector."""
    v = x.reshape(x.shape[0], -1).double()
    if metric == "standardized":
        per_channel = x.reshape(x.shape[0], x.shape[1] if x.dim() > 2 else 1, -1).double()
        mean = per_channel.mean(-1, keepdim=True)
        std = per_channel.std(-1, unbiased=False, keepdim=True)
        v = ((per_channel - mean) / torch.where(std > 0, std, 1.0)).reshape(x.shape[0], -1)
    if metric in ("cosine", "standardized"):
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    return v


def knn_distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact float64 distances between feature rows ``a [..., d]`` and ``b [..., d]``
    (broadcast): ``||a - b||`` for "l2", ``1 - a . b`` for the unit vectors of "cosine" and
    "standardized"."""
    if metric == "l2":
        return (a - b).square().sum(-1).sqrt()
    return 1.0 - (a * b).sum(-1)


def knn(
    queries: torch.Tensor, database: torch.Tensor, k: int, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force in float64: ``(distances [n, k] float64, indices [n, k] int64)``, ascending,
    ties broken by the lower index. Builds the whole n x m x d difference: small inputs only."""
    q, db = knn_features(queries, metric), knn_features(database, metric)
    dist = knn_distance(q[:, None, :], db[None, :, :], metric)
    dist, order = torch.sort(dist, dim=1, stable=True)  # stable: equal distances by index
    return dist[:, :k], order[:, :k]
