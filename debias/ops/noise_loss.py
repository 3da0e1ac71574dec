"""The loss side of a diffusion training step, for every family (DDPM, flow matching, EDM):
noising, and the weighted loss with its gradient, each in one pass over the data.

Every family is one affine op on per-sample coefficients (csrc/noise_loss.h):

    x_t  = a_b x0 + s_b eps                                              (add_noise)
    L_b  = w_b / D * sum_i (pred_bi - y_bi)^2,    y = p_b eps + q_b x0    (fused_loss)
    dL/dpred = 2 w_b / D * (pred - y) / div                              (same pass)

The schedule turns timesteps into coefficients: one gather of its float64-derived tables
(``NoiseSchedule.noise_table``, ``weighting.loss_table``) gives the ``[2, B]`` (a, s) and
``[3, B]`` (w, p, q) tensors that every backend takes; no kernel sees a timestep. A continuous
family ("flow", "edm") evaluates the same functions on each sample's sigma instead. The op
itself is public too (``affine_noise``, ``affine_loss``: per-sample coefficient tensors), and
every public function reaches the kernels through it (``_affine_noise``, ``_affine_loss``).

With ``noise=None`` the noise is a Philox stream (``PhiloxNoise``): drawn inside the kernel from
a key taken from torch's generator and drawn again by the loss, so it need never be written to
memory (the compute-bound CPU backend keeps it instead; see ``PhiloxNoise.values``).
The gradient is either computed in the forward pass and kept until backward, which scales it
by ``grad_output``, or recomputed in backward (``GRAD_IN_FORWARD``); ``grad_output`` stays
on the device either way (no synchronisation).

Each public function checks its input once; the custom ops below it trust their input.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import torch

from debias import reference
from debias.checks import check_float_dtype, check_generator, check_range
from debias.ops import _backend
from debias.schedules import (
    PREDICTIONS,
    TERM_EPS,
    TERM_X0,
    NoiseSchedule,
    as_schedule,
    check_sigma,
    continuous_family,
    noise_coefficients,
)
from debias.weighting import (
    Weighting,
    cached_loss_table,
    continuous_loss_coefficients,
    resolve_continuous_prediction,
    resolve_prediction,
)

# Backends that keep the noise they generate (PhiloxNoise.values): compute-bound ones.
_KEEPS_NOISE = ("torch", "cpu")
# The gradient design per backend: True computes the gradient in the loss's forward pass and
# keeps it for backward (on the CPU, whose backward then usually costs nothing: see
# _NoiseLoss.backward); False computes the loss alone and recomputes the gradient in
# backward, regenerating the noise: the GPU kernels are bound by memory, and this moves 5
# tensor passes for the loss side instead of 6 (benchmarks/bench_noise_loss.py times both).
GRAD_IN_FORWARD = {"torch": True, "cpu": True, "triton": False, "cuda": False}
_REDUCTIONS = ("mean", "sum", "none")


class LossArgs(NamedTuple):
    """The loss op's arguments past the door: what the custom ops, their fakes, autograd and
    every backend share (csrc/noise_loss.h lists the C++ side's in the same order)."""

    coef: torch.Tensor  # [3, B] in the compute type: rows w, p, q
    noise: torch.Tensor | None  # like pred, or None: the stream of `key` (or no eps term)
    x0: torch.Tensor | None  # like pred when terms has TERM_X0, else None
    key: torch.Tensor | None  # int64 [2] (seed, offset) on the CPU when eps is the stream
    terms: int  # TERM_EPS | TERM_X0
    eps_dtype: torch.dtype  # the noise's dtype: the stream is rounded to it
    kind: int  # index into reference.LOSS_KINDS; "pseudo_huber" adds coef's row c
    mask: torch.Tensor | None  # [Mb * mask_size] in the compute type, or None
    mask_inner: int  # element j of a sample reads mask[(j // mask_inner) % mask_size]
    mask_size: int
    mask_batch_stride: int  # mask_size (one row per sample) or 0 (one row for all)
    reduction: int  # index into _REDUCTIONS

    def divisor(self, batch: int) -> int:
        """grad_div and loss_div of the kernels: B for a batch mean, else 1."""
        return batch if _REDUCTIONS[self.reduction] == "mean" else 1

    def kernel_args(self, pred: torch.Tensor) -> tuple:
        """The leading arguments of every loss kernel, C++, CUDA and Triton alike
        (DEBIAS_NOISE_LOSS_ARGS of csrc/noise_loss.h, up to the divisors)."""
        seed, offset = self.key.tolist() if self.key is not None else (0, 0)
        mask = (self.mask, self.mask_inner, self.mask_size, self.mask_batch_stride)
        return (pred, self.coef, self.noise, self.x0, self.terms, self.eps_dtype, seed, offset,
                self.kind, *mask)  # fmt: skip

    def torch_mask(self, pred: torch.Tensor) -> torch.Tensor | None:
        """The mask expanded to pred's shape (the torch backend's; the kernels never do)."""
        if self.mask is None:
            return None
        rows = self.mask.view(-1, 1, self.mask_size, 1)
        outer = pred[0].numel() // (self.mask_size * self.mask_inner)
        full = rows.expand(pred.shape[0], outer, self.mask_size, self.mask_inner)
        return full.reshape(pred.shape)


# LossArgs' fields with their annotations as written (strings under postponed evaluation).
_FIELD_TYPES = {
    name: getattr(tp, "__forward_arg__", tp) for name, tp in LossArgs.__annotations__.items()
}
_TENSOR_FIELDS = tuple(name for name, tp in _FIELD_TYPES.items() if "Tensor" in tp)


def _schema(head: str, tail: str) -> str:
    """A custom op schema with LossArgs' fields between ``head`` and ``tail`` arguments."""
    types = {
        "torch.Tensor": "Tensor",
        "torch.Tensor | None": "Tensor?",
        "int": "int",
        "torch.dtype": "ScalarType",
    }
    fields = ", ".join(f"{types[tp]} {name}" for name, tp in _FIELD_TYPES.items())
    return f"({head}, {fields}, {tail})"


class PhiloxNoise(NamedTuple):
    """Standard normal noise held as a Philox key instead of a tensor.

    ``key`` is an int64 ``[2]`` CPU tensor ``(seed, offset)``; element i of the noise (flat,
    row-major) is a fixed function of ``(seed, offset, i)`` that every backend computes the
    same way up to float rounding (a few ulp). ``materialize()`` writes it out as a tensor,
    with the backend that drew it, so the bits are the ones ``add_noise`` used.

    ``values``: on the CPU, generating the stream costs more than storing it, so add_noise
    keeps what it generated here and fused_loss reads it (the same bits); on a GPU it is None
    and the loss regenerates the stream instead of reading N values from memory.
    """

    key: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    backend: str
    values: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        """The noise as a tensor of ``shape``, ``dtype`` on ``device`` (like randn_like)."""
        if self.values is not None:
            return self.values
        args = (self.key, list(self.shape), self.dtype, self.device, self.backend)
        return _philox_normal(*args)


# ---- public ops ---------------------------------------------------------------------------


def add_noise(
    x0: torch.Tensor,
    t: torch.Tensor,
    schedule: Any,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    input_perturbation: float | torch.Tensor | None = None,
    perturbation_noise: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | PhiloxNoise]:
    """Noise ``x0`` to timesteps ``t``: ``x_t = a_t x0 + s_t noise`` with the schedule's
    coefficients (DDPM: ``sqrt(abar_t)``, ``sqrt(1 - abar_t)``; flow matching: ``1 - sigma``,
    ``sigma``; EDM: ``1``, ``sigma``).

    Args:
        x0: clean data ``[B, ...]`` (images, latents, video), float32/float64/bfloat16/float16.
        t: timesteps ``[B]``: integers in [0, T) for a DDPM schedule; for flow matching and
            EDM the float timesteps of the schedule (``scheduler.timesteps[indices]``); for
            the continuous families each sample's sigma (float, flow: in [0, 1], edm: > 0).
        schedule: a ``NoiseSchedule`` or a diffusers scheduler (DDPM-style, flow matching,
            EDM); or "flow" / "edm", continuous time: a = 1 - sigma, s = sigma (flow, as
            ``(1.0 - sigmas) * x0 + sigmas * noise`` rounds it) or a = 1, s = sigma (edm),
            computed per sample on x0's device (``schedules.noise_coefficients``).
        noise: a tensor like ``x0``; with it the result equals the trainer's noising line
            (diffusers' ``scheduler.add_noise``, or ``(1 - sigmas) * x0 + sigmas * noise`` of
            the flow-matching scripts) bit for bit. None (default) draws the noise from a
            Philox stream inside the kernel.
        generator: a CPU ``torch.Generator`` for the Philox keys; None uses torch's default,
            so ``torch.manual_seed`` makes runs repeatable.
        input_perturbation: gamma of input perturbation (diffusers' ``--input_perturbation``,
            sd-scripts' ``--ip_noise_gamma``): x_t is made from ``noise + gamma * xi`` while
            the returned noise, the loss's target, stays ``noise``. A float or a ``[B]``
            tensor (sd-scripts' ``--ip_noise_gamma_random_strength``: ``torch.rand(1) *
            gamma`` expanded to ``[B]``), finite and >= 0. None or 0: no perturbation.
        perturbation_noise: xi, a tensor like ``x0``: pass the trainer's ``randn_like`` to
            reproduce its x_t bit for bit. None (default) draws xi from a second Philox key
            of ``generator``, never written to memory.
        backend: force "torch", "cpu", "triton" or "cuda" (default: fastest available).

    Returns:
        ``(x_t, noise)``: x_t like ``x0``; ``noise`` is the given tensor or a
        ``PhiloxNoise`` to hand to ``fused_loss`` (``.materialize()`` gives the tensor).
    """
    family = continuous_family(schedule)
    schedule = as_schedule(schedule) if family is None else schedule
    _check_data("x0", x0)
    if family is None:
        coef = _noise_table(schedule, x0.dtype, x0.device)[:, _index(schedule, t, x0)]
    else:
        coef = noise_coefficients(family, _sigma(family, t, x0), x0.dtype)
    return _affine_noise(
        x0, coef, noise, generator, backend, input_perturbation, perturbation_noise
    )


def affine_noise(
    x0: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    input_perturbation: float | torch.Tensor | None = None,
    perturbation_noise: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | PhiloxNoise]:
    """The noising op itself: ``x_t = a_b x0 + s_b noise`` with per-sample coefficients, for
    trainers whose line fits no family name (``add_noise`` is this with a schedule's
    coefficients). E.g. the reversed flow convention ``x_t = (1 - sigma) noise + sigma x0``:
    ``affine_noise(x0, a=sigma, s=1 - sigma)``.

    Args:
        x0: ``[B, ...]`` float32/float64/bfloat16/float16.
        a, s: ``[B]`` float tensors on x0's device, finite; used in the compute type (float64
            for float64 data, else float32): each product rounds to x0's dtype, then the sum.
        noise, generator, input_perturbation, perturbation_noise, backend: as for
            ``add_noise`` (x_t = a x0 + s (noise + gamma xi) when perturbed).

    Returns:
        ``(x_t, noise)`` as ``add_noise``.

    Raises:
        TypeError / ValueError naming the argument: a coefficient that is not a float ``[B]``
        tensor on x0's device, requires grad, or holds a non-finite value (checked on the host
        for CPU tensors in eager mode, asynchronously on other devices).
    """
    _check_data("x0", x0)
    compute = torch.float64 if x0.dtype == torch.float64 else torch.float32
    a = _coefficient("a", a, x0)
    s = _coefficient("s", s, x0)
    coef = torch.stack((a, s)).to(compute)
    return _affine_noise(
        x0, coef, noise, generator, backend, input_perturbation, perturbation_noise
    )


def _affine_noise(x0, coef, noise, generator, backend, perturbation=None, xi=None):
    """The one way to the noising op: ``coef [2, B]`` (a, s) in the compute type; x0 checked.
    A perturbation adds the row g (``coef [3, B]``) and xi: the tensor, or a Philox key."""
    generator = check_generator(generator, _GENERATOR_WHY)
    for name, tensor in (("noise", noise), ("perturbation_noise", xi)):
        if tensor is not None:
            _check_like(name, tensor, "x0", x0)
            if tensor.dtype != x0.dtype:
                raise TypeError(f"{name} must have x0's dtype {x0.dtype}, got {tensor.dtype}")
    if xi is not None:
        _refuse_grad("perturbation_noise", xi)
    perturbed = not (perturbation is None or _is_zero(perturbation))
    if xi is not None and not perturbed:
        raise ValueError("perturbation_noise was given without input_perturbation")
    if generator is not None and noise is not None and (xi is not None or not perturbed):
        raise ValueError("generator is only used when noise (or xi) is drawn; nothing is drawn")
    if perturbed:
        g = _float_or_coefficient("input_perturbation", perturbation, x0, positive=False)
        coef = torch.cat((coef, g.to(coef.dtype)[None]))
    backend = _backend.resolve(backend, x0.device)
    key = _draw_key(generator) if noise is None else None
    xi_key = _draw_key(generator) if perturbed and xi is None else None
    noise_arg = None if noise is None else noise.contiguous()
    xi_arg = None if xi is None else xi.contiguous()
    keep = noise is None and backend in _KEEPS_NOISE
    args = (x0.contiguous(), coef, noise_arg, key, keep, xi_arg, xi_key, backend)
    if torch.is_grad_enabled() and (x0.requires_grad or (key is None and noise.requires_grad)):
        x_t, kept = _AddNoise.apply(*args)
    else:
        x_t, kept = _add_noise(*args)
    if noise is None:
        noise = PhiloxNoise(key, x0.shape, x0.dtype, x0.device, backend, kept if keep else None)
    return x_t, noise


def fused_loss(
    pred: torch.Tensor,
    noise: torch.Tensor | PhiloxNoise,
    t: torch.Tensor,
    schedule: Any,
    weighting: Weighting = "debias",
    prediction: str | None = None,
    x0: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    loss: str = "l2",
    huber_c: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    mask_normalize: bool = False,
    sample_weight: torch.Tensor | None = None,
    backend: str | None = None,
    **options: Any,
) -> torch.Tensor:
    """The weighted diffusion loss and its gradient in one pass.

    Equal to the trainers' ``mse_loss(pred.float(), target.float(), "none")`` (or the
    ``loss`` named) times the mask, averaged over the non-batch dims, times the per-sample
    weight, then reduced over the batch.

    Args:
        pred: the network's output ``[B, ...]``, float32/float64/bfloat16/float16.
        noise: the noise used to make x_t: a tensor like ``pred`` or the ``PhiloxNoise``
            that ``add_noise`` returned.
        t: timesteps ``[B]``, as for ``add_noise`` (continuous families: the sigmas).
        schedule: a ``NoiseSchedule`` or a diffusers scheduler; or "flow" / "edm",
            continuous time: the coefficients are the table path's functions evaluated on
            each sample's sigma in float64 on pred's device, then cast to the compute type
            (``weighting.continuous_loss_coefficients``); no table, no host sync on a GPU.
        weighting: a name of ``debias.WEIGHTINGS`` (each defined once in its own space and
            converted exactly to the prediction's: see ``debias.weighting``), a ``[T]``
            tensor or a callable of snr (epsilon space). Default "debias".
        prediction: what ``pred`` is: "epsilon", "v_prediction", "sample" (alias
            "denoised"), "flow" (noise - x0) or "raw" (EDM's preconditioned network output);
            None (default) takes the schedule's (a diffusers scheduler's config).
        x0: the clean data ``[B, ...]``; required by every target but "epsilon".
        reduction: "mean" (default) or "sum" over the batch, or "none" for ``[B]``.
        loss: the elementwise loss of ``d = pred - target``, sd-scripts' ``--loss_type``:
            "l2" (default) ``d^2``; "l1" ``|d|``; "huber" ``2 c (sqrt(d^2 + c^2) - c)``;
            "smooth_l1" ``2 (sqrt(d^2 + c^2) - c)``. The weighting stays a per-sample factor
            on the loss of the prediction (the weight of an l2 loss in pred's space, applied
            as is): no conversion to epsilon space is meaningful for a non-quadratic loss.
        huber_c: c of "huber" and "smooth_l1" (required by them, refused by the others): a
            float or a ``[B]`` tensor (sd-scripts' ``--huber_schedule``), finite and > 0.
        mask: a float tensor that broadcasts to pred (``[B, 1, H, W]`` alpha masks,
            ``[B, 1, F, 1, 1]`` frame masks, ``[B, N, 1]`` token masks, or one mask for the
            batch), finite and >= 0, without grad. It multiplies the elementwise loss before
            the mean over the non-batch dims (sd-scripts' ``apply_masked_loss``). The kernels
            read it at its own size, never expanded; a mask whose full dims are not adjacent
            (``[B, C, 1, W]``) is expanded over the dims between them only.
        mask_normalize: divide each sample's masked sum by the sum of the (broadcast) mask
            instead of by the element count: the mean over the masked area, as trainers that
            normalise by the mask do. A sample whose mask is all zero contributes 0.
        sample_weight: ``[B]`` float factors on each sample's loss (sd-scripts'
            ``loss_weights``), finite and >= 0, without grad; folded into the weight.
        backend: force "torch", "cpu", "triton" or "cuda".
        **options: ``gamma``, ``k``, ``max_weight``, ``normalize`` (see ``debias.weighting``);
            ``sigma_data`` (default 0.5) for schedule="edm".

    Returns:
        The loss in float32 (float64 for float64 ``pred``): a scalar, or ``[B]``.
        Gradients flow to ``pred`` only.
    """
    family = continuous_family(schedule)
    if family is None:
        schedule = as_schedule(schedule)
        prediction = resolve_prediction(schedule, prediction)
    else:
        prediction = resolve_continuous_prediction(family, prediction)
    if noise is None:
        _check_data("noise", noise)  # the TypeError naming noise
    terms = PREDICTIONS[prediction].terms
    _check_loss_inputs(pred, noise, x0, terms, reduction, f"prediction={prediction!r}")
    compute = torch.float64 if pred.dtype == torch.float64 else torch.float32
    if family is None:
        index = _index(schedule, t, pred)
        table = cached_loss_table(
            schedule, weighting, prediction, noise.dtype, compute, pred.device, options
        )
        coef = table[:, index]
    else:
        sigma = _sigma(family, t, pred)
        coef = continuous_loss_coefficients(family, sigma, weighting, prediction, compute, options)
    if sample_weight is not None:
        sample_weight = _coefficient("sample_weight", sample_weight, pred, low=0.0)
    shape = _LossShape(loss, huber_c, mask, mask_normalize, sample_weight)
    return _affine_loss(pred, noise, x0, coef, terms, reduction, backend, shape)


def affine_loss(
    pred: torch.Tensor,
    noise: torch.Tensor | PhiloxNoise | None,
    w: torch.Tensor,
    p: torch.Tensor | None,
    q: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    loss: str = "l2",
    huber_c: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    mask_normalize: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """The loss op itself: ``loss_b = w_b / D * sum_i (pred_bi - y_bi)^2`` with the target
    ``y = p_b noise + q_b x0``, per-sample coefficients, and its gradient in one pass
    (``fused_loss`` is this with a schedule's and a weighting's coefficients). For trainers
    whose lines fit no family name, e.g. sd-scripts' default ``--model_prediction_type
    sigma_scaled`` (``-sigma F + x_t`` against ``noise - x0``: on F, w = sigma^2 weighting,
    p = (sigma - 1) / sigma, q = (2 - sigma) / sigma), or the reversed flow convention
    (target ``x0 - noise``: p = -1, q = 1).

    Args:
        pred: ``[B, ...]`` float32/float64/bfloat16/float16.
        noise: a tensor like pred or a ``PhiloxNoise``; may be None when ``p`` is None.
        w: ``[B]`` weights, finite and >= 0.
        p: ``[B]``, or None for a target without a noise term.
        q: ``[B]``, or None (default) for a target without an x0 term.
        x0: ``[B, ...]`` like pred, required with ``q`` (and only then).
        reduction: "mean" (default) or "sum" over the batch, or "none" for ``[B]``.
        loss, huber_c, mask, mask_normalize: as for ``fused_loss`` (the squared error above
            is then that loss, times the mask).
        backend: force "torch", "cpu", "triton" or "cuda".

    Coefficients are float ``[B]`` tensors on pred's device, finite, without grad, used in
    the compute type (float64 for float64 pred, else float32).

    Returns:
        The loss in float32 (float64 for float64 ``pred``); gradients flow to ``pred`` only.

    Raises:
        TypeError / ValueError naming the argument (value checks on the host for CPU tensors
        in eager mode, asynchronously on other devices).
    """
    if p is None and q is None:
        raise ValueError("p and q are both None: the target y = p noise + q x0 needs a term")
    if (q is None) != (x0 is None):
        raise ValueError(
            "x0 is required with q (the target's x0 term) and only then"
            if q is not None
            else "x0 was given without q: pass q, the coefficient of x0 in the target"
        )
    terms = (TERM_EPS if p is not None else 0) | (TERM_X0 if q is not None else 0)
    if noise is None and p is not None:
        raise ValueError("noise is required with p (the target's noise term)")
    _check_loss_inputs(pred, noise, x0, terms, reduction, "q")
    compute = torch.float64 if pred.dtype == torch.float64 else torch.float32
    zero = None
    rows = []
    for name, value, nonnegative in (("w", w, True), ("p", p, False), ("q", q, False)):
        if value is None:
            zero = pred.new_zeros(pred.shape[0], dtype=compute) if zero is None else zero
            rows.append(zero)
        else:
            low = 0.0 if nonnegative else -math.inf
            rows.append(_coefficient(name, value, pred, low).to(compute))
    shape = _LossShape(loss, huber_c, mask, mask_normalize)
    return _affine_loss(pred, noise, x0, torch.stack(rows), terms, reduction, backend, shape)


class _LossShape(NamedTuple):
    """The loss's own options, as the user gave them (checked by ``kernel_form``), and
    fused_loss's sample_weight (checked)."""

    loss: str
    huber_c: Any
    mask: Any
    mask_normalize: bool
    sample_weight: torch.Tensor | None = None

    def kernel_form(self, pred: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(coef with the loss's factors folded into w and the row c when the kernel reads
        it, LossArgs' kind and mask fields): w times sample_weight; the trainers' "huber" is
        the kernels' pseudo-Huber with w times 2c, "smooth_l1" with w times 2
        (csrc/noise_loss.h); mask_normalize is w times D / the broadcast mask's sum."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        huber = self.loss in ("huber", "smooth_l1")
        if huber and self.huber_c is None:
            raise ValueError(f"loss={self.loss!r} needs huber_c (sd-scripts' default is 0.1)")
        if not huber and self.huber_c is not None:
            raise ValueError(
                f"huber_c is used by loss='huber' or 'smooth_l1' only, not {self.loss!r}"
            )
        if not isinstance(self.mask_normalize, bool):
            raise TypeError(
                f"mask_normalize must be a bool, got {type(self.mask_normalize).__name__}"
            )
        if self.mask_normalize and self.mask is None:
            raise ValueError("mask_normalize=True needs a mask")
        no_mask = {"mask": None, "mask_inner": 1, "mask_size": 1, "mask_batch_stride": 0}
        if not huber and self.mask is None and self.sample_weight is None:
            return coef, {"kind": reference.LOSS_KINDS.index(self.loss), **no_mask}
        compute = coef.dtype
        w = coef[0]
        if self.sample_weight is not None:
            w = w * self.sample_weight.to(compute)
        rows = [coef[1], coef[2]]
        if huber:
            c = _float_or_coefficient("huber_c", self.huber_c, pred, positive=True).to(compute)
            w = w * (2.0 * c if self.loss == "huber" else 2.0)
            rows.append(c)
        fields = no_mask
        if self.mask is not None:
            fields = _mask_fields(self.mask, pred, compute)
            if self.mask_normalize:
                values = fields["mask"].view(-1, fields["mask_size"]).double()
                total = values.sum(1)
                scale = torch.where(total > 0, fields["mask_size"] / total, 0.0)
                w = w * scale.to(compute)
        kind = reference.LOSS_KINDS.index("pseudo_huber" if huber else self.loss)
        return torch.stack((w, *rows)), {"kind": kind, **fields}


# The losses of fused_loss, sd-scripts' --loss_type.
LOSSES = ("l2", "l1", "huber", "smooth_l1")


def _mask_fields(mask: Any, pred: torch.Tensor, compute: torch.dtype) -> dict[str, Any]:
    """LossArgs' mask fields for a mask that broadcasts to pred: its values over the span of
    its full dims (those of pred's size; the others broadcast), one row per sample or one for
    the batch, in the compute type; element j of a sample reads row[(j // inner) % size]."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a float (or bool) tensor, got dtype {mask.dtype}")
    n = pred.dim()
    shape = (1,) * (n - mask.dim()) + tuple(mask.shape)
    if mask.dim() > n or any(m not in (1, p) for m, p in zip(shape, pred.shape, strict=True)):
        raise ValueError(
            f"mask of shape {list(mask.shape)} does not broadcast to pred's {list(pred.shape)}"
        )
    _check_same_device(pred=pred, mask=mask)
    _refuse_grad("mask", mask)
    full = [d for d in range(1, n) if shape[d] != 1]
    first, last = (full[0], full[-1]) if full else (n, n - 1)
    size = math.prod(pred.shape[first : last + 1])
    inner = math.prod(pred.shape[last + 1 :]) if full else 1
    span = [pred.shape[d] if first <= d <= last else 1 for d in range(1, n)]
    values = mask.expand(shape[0], *span).to(compute).contiguous().view(-1)
    check_range(values, lambda bad: f"mask must be finite and >= 0, got {values[bad][:4].tolist()}",
                "mask must be finite and >= 0", low=0.0)  # fmt: skip
    stride = size if shape[0] == pred.shape[0] and shape[0] > 1 else 0
    return {"mask": values, "mask_inner": inner, "mask_size": size, "mask_batch_stride": stride}


def _affine_loss(pred, noise, x0, coef, terms, reduction, backend, shape) -> torch.Tensor:
    """The one way to the loss op: ``coef [3, B]`` (w, p, q) in the compute type and the
    loss's options; the tensors checked by ``_check_loss_inputs``."""
    coef, loss_fields = shape.kernel_form(pred, coef)
    backend = _backend.resolve(backend, pred.device)
    philox = isinstance(noise, PhiloxNoise) and noise.values is None
    noise_tensor = noise.values if isinstance(noise, PhiloxNoise) else noise
    args = LossArgs(
        coef=coef,
        noise=noise_tensor.contiguous() if terms & TERM_EPS and not philox else None,
        x0=x0.contiguous() if terms & TERM_X0 else None,
        key=noise.key if philox and terms & TERM_EPS else None,
        terms=terms,
        eps_dtype=(noise if noise is not None else x0).dtype,
        **loss_fields,
        reduction=_REDUCTIONS.index(reduction),
    )
    if not (backend == "cpu" and pred[0].is_contiguous()):
        # The C++ kernels read samples any stride apart (model_output[:, :C] of a
        # learned-variance network, without a copy); the others want one run of memory.
        pred = pred.contiguous()
    if pred.requires_grad and torch.is_grad_enabled():
        return _NoiseLoss.apply(pred, args, backend)
    return _noise_loss(pred, *args, False, backend)[0]


# ---- input checks -------------------------------------------------------------------------


def _eager() -> bool:
    # Value checks read data on the host; under torch.compile they would break the graph.
    return not torch.compiler.is_compiling()


def _check_loss_inputs(pred, noise, x0, terms: int, reduction: str, x0_for: str) -> None:
    """The loss op's door for its tensors: pred, the noise (when the target reads it) and x0
    (when it reads it, required: ``x0_for`` says by what), the reduction."""
    _check_data("pred", pred)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(noise, PhiloxNoise):
        if tuple(noise.shape) != tuple(pred.shape):
            raise ValueError(f"noise has shape {list(noise.shape)} but pred has {list(pred.shape)}")
        _check_same_device(pred=pred, noise=noise)
    elif noise is not None or terms & TERM_EPS:
        _check_like("noise", noise, "pred", pred)
    if terms & TERM_X0:
        if x0 is None:
            raise ValueError(f"x0 is required for {x0_for}")
        _check_like("x0", x0, "pred", pred)
        if noise is not None and x0.dtype != noise.dtype:
            raise TypeError(f"x0 must have noise's dtype {noise.dtype}, got {x0.dtype}")
    for name, tensor in (("noise", noise), ("x0", x0)):
        if isinstance(tensor, torch.Tensor):
            _refuse_grad(name, tensor)


def _refuse_grad(name: str, x: torch.Tensor) -> None:
    if x.requires_grad:
        raise ValueError(
            f"{name} requires grad, but the loss differentiates with respect to pred only; "
            f"pass {name}.detach()"
        )


def _coefficient(
    name: str, x: Any, data: torch.Tensor, low: float = -math.inf, open_low: bool = False
):
    """A per-sample coefficient ``[B]`` of ``data [B, ...]``: a float tensor on data's device
    without grad, finite (and >= ``low``, > with ``open_low``): values checked on the host for
    CPU tensors in eager mode, asynchronously elsewhere (no synchronisation)."""
    batch = data.shape[0]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a float torch.Tensor [{batch}], got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got dtype {x.dtype}")
    if x.shape != (batch,):
        raise ValueError(
            f"{name} must have shape [{batch}] (one value per sample), got {list(x.shape)}"
        )
    _check_same_device(data=data, **{name: x})
    _refuse_grad(name, x)
    what = "finite" if low == -math.inf else f"finite and {'>' if open_low else '>='} {low:g}"
    check_range(x, lambda bad: f"{name} must be {what}, got {x[bad][:4].tolist()}",
                f"{name} must be {what}", low, open_low=open_low)  # fmt: skip
    return x


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _float_or_coefficient(name: str, x: Any, data: torch.Tensor, positive: bool) -> torch.Tensor:
    """A per-sample option given as a float or a ``[B]`` tensor (huber_c, input_perturbation),
    as ``[B]`` values: finite and > 0 (``positive``) or >= 0, checked as a coefficient."""
    if isinstance(x, torch.Tensor):
        return _coefficient(name, x, data, 0.0, open_low=positive)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(x).__name__}")
    if not (math.isfinite(x) and (x > 0 if positive else x >= 0)):
        raise ValueError(f"{name} must be finite and {'>' if positive else '>='} 0, got {x}")
    return torch.full((data.shape[0],), float(x), dtype=torch.float64, device=data.device)


def _sigma(family: str, t: Any, data: torch.Tensor) -> torch.Tensor:
    """t of a continuous family checked against data: the sigmas ``[B]``, detached."""
    if not isinstance(t, torch.Tensor):
        return check_sigma(t, family, data.shape[0])  # a TypeError naming t
    _check_same_device(data=data, t=t)
    return _lookup(family, t, data.shape[0], lambda: check_sigma(t, family, data.shape[0]))


def _check_data(name: str, x: Any) -> None:
    """Type, dtype and shape only: meta (fake) tensors pass, so that torch.compile traces the
    ops through their fake implementations and meta inputs give meta outputs."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_float_dtype(name, x)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty [B, ...] tensor, got {list(x.shape)}")


def _check_like(name: str, x: Any, like_name: str, like: torch.Tensor) -> None:
    _check_data(name, x)
    if x.shape != like.shape:
        raise ValueError(f"{name} has shape {list(x.shape)} but {like_name} has {list(like.shape)}")
    _check_same_device(**{like_name: like, name: x})


def _check_same_device(**tensors: Any) -> None:
    (first, a), *rest = tensors.items()
    for name, b in rest:
        if a.device != b.device:
            raise ValueError(
                f"{first} and {name} must be on the same device, got {a.device} and {b.device}"
            )


# The last lookup of t of this process, one entry: a training step hands fused_loss the t it
# gave add_noise, so t is looked up and checked once per step. Table schedules: a search of
# the table plus a host check of the values, ~18 us of a ~160 us fused_loss on a
# 128 x 3 x 32 x 32 float32 CPU batch for flow and EDM (~4 us for DDPM); continuous sigmas:
# the range check, ~25 us. The key is what t is read against (the schedule, held by a weak
# reference, or the continuous family's name), t itself (a weak reference: the entry keeps
# nothing alive), t's version counter and the batch size t was checked against, so another
# schedule, another t, an in-place change of t or another batch is a miss. Eager mode only:
# under torch.compile the lookup is part of the graph.
_last_lookup: tuple[Any, weakref.ref, int, int, torch.Tensor] | None = None


def _lookup(owner: NoiseSchedule | str, t: torch.Tensor, batch: int, look) -> torch.Tensor:
    """``look()``, or what it returned for the same (owner, t, t's version, batch) last time."""
    global _last_lookup
    eager = _eager() and not torch.is_inference(t)  # inference tensors have no version
    key = owner if isinstance(owner, str) else weakref.ref(owner)
    if eager:
        hit = _last_lookup
        if hit is not None and hit[0] == key and hit[1]() is t and hit[2:4] == (t._version, batch):
            return hit[4]
    found = look()
    if eager:
        _last_lookup = (key, weakref.ref(t), t._version, batch, found)
    return found


def _index(schedule: NoiseSchedule, t: Any, data: torch.Tensor) -> torch.Tensor:
    """The table index of each sample's timestep, ``[B]`` int64 on t's device. The schedule
    checks t: its shape against ``data``'s batch, and its values (on the host only in eager
    mode on the CPU: elsewhere asynchronously, so nothing synchronises)."""
    batch = data.shape[0]
    if not isinstance(t, torch.Tensor):
        return schedule.index(t, batch)  # a TypeError naming t
    _check_same_device(data=data, t=t)
    return _lookup(schedule, t, batch, lambda: schedule.index(t, batch))


# ---- tables and keys ----------------------------------------------------------------------


# Tables are constants of a compiled graph: torch.compile evaluates this once while tracing.
@torch.compiler.assume_constant_result
def _noise_table(schedule: NoiseSchedule, dtype: torch.dtype, device: torch.device):
    return schedule.noise_table(dtype, device)


_GENERATOR_WHY = "the Philox key is drawn on the host so the device never synchronises"


def _draw_key(generator: torch.Generator | None) -> torch.Tensor:
    """A fresh (seed, offset) from a CPU generator (checked by add_noise): drawn on the host,
    so no device sync."""
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator)


# ---- custom ops and autograd ----------------------------------------------------------------
#
# Each kernel entry is a torch.library custom op with a fake implementation, so torch.compile
# traces through it; eager mode calls the same implementation directly, since the custom op's
# Python dispatch costs more than a small kernel (_custom_op). Autograd is a plain
# autograd.Function, which dynamo traces as well.


def _custom_op(name: str, impl, schema: str | None = None):
    """Registers ``impl`` as custom op ``name``; returns (the op, a caller that uses the op
    under torch.compile and ``impl`` itself in eager mode)."""
    op = torch.library.custom_op(name, impl, mutates_args=(), schema=schema)

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else impl(*args)

    return op, call


def _triton_kernels():
    """triton_kernels/noise_loss.py, imported on first use: importing Triton takes a second,
    and TRITON_INTERPRET must be set before the kernels are imported."""
    from debias.triton_kernels import noise_loss

    return noise_loss


def _philox_normal_impl(
    key: torch.Tensor, shape: list[int], dtype: torch.dtype, device: torch.device, backend: str
) -> torch.Tensor:
    seed, offset = key.tolist()
    out = torch.empty(shape, dtype=dtype, device=device)
    if backend in ("cpu", "cuda"):
        torch.ops.debias_C.philox_normal_(out, seed, offset)
    elif backend == "triton":
        _triton_kernels().philox_fill(out, seed, offset)
    else:
        out.copy_(reference.philox_normal(seed, offset, out.numel(), device).view(shape))
    return out


def _add_noise_impl(
    x0: torch.Tensor,
    coef: torch.Tensor,
    noise: torch.Tensor | None,
    key: torch.Tensor | None,
    keep_noise: bool,
    xi: torch.Tensor | None,
    xi_key: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, the generated noise if ``keep_noise`` else an empty tensor); coef [2, B]: a, s,
    or [3, B]: a, s, g with xi (the tensor, or the stream of ``xi_key``) perturbing x_t."""
    seed, offset = key.tolist() if key is not None else (0, 0)
    xi_seed, xi_offset = xi_key.tolist() if xi_key is not None else (0, 0)
    streams = (seed, offset, xi, xi_seed, xi_offset)
    if backend in ("cpu", "cuda"):
        return torch.ops.debias_C.add_noise(x0, coef, noise, seed, offset, keep_noise, *streams[2:])
    kept = x0.new_empty(0)
    if backend == "triton":
        return _triton_kernels().add_noise(x0, coef, noise, *streams), kept
    if noise is None:
        noise = _philox_normal_impl(key, list(x0.shape), x0.dtype, x0.device, backend)
        kept = noise if keep_noise else kept
    eps = noise
    if coef.shape[0] == 3:
        if xi is None:
            xi = _philox_normal_impl(xi_key, list(x0.shape), x0.dtype, x0.device, backend)
        eps = reference.perturbed(noise, xi, coef[2])
    return reference.noised(x0, eps, coef[0], coef[1]), kept


def _noise_loss_impl(pred: torch.Tensor, *fields: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss reduced as asked, d loss / d pred or an empty tensor if not ``need_grad``); the
    gradient already carries the 1/B of a mean. ``fields``: LossArgs, need_grad, backend."""
    *fields, need_grad, backend = fields
    args = LossArgs(*fields)
    div = args.divisor(pred.shape[0])
    if backend == "triton":
        per_sample, total, grad = _triton_kernels().noise_loss(
            *args.kernel_args(pred), grad_div=div, loss_div=div, need_grad=need_grad
        )
        grad = grad if need_grad else pred.new_empty(0)
    elif backend in ("cpu", "cuda"):
        per_sample, total, grad = torch.ops.debias_C.noise_loss_fwd(
            *args.kernel_args(pred), div, div, need_grad
        )
    else:
        target = _target_torch(pred, args)
        loss = _torch_loss_args(pred, args)
        per_sample = reference.weighted_loss(pred, target, args.coef[0], "none", **loss)
        total = per_sample.sum() / div
        grad = pred.new_empty(0)
        if need_grad:
            grad = reference.weighted_loss_grad(pred, target, args.coef[0], div, **loss)
    return (per_sample if _REDUCTIONS[args.reduction] == "none" else total), grad


def _noise_loss_bwd_impl(pred: torch.Tensor, *fields: Any) -> torch.Tensor:
    """d loss / d pred recomputed from pred and the noise, times ``grad_output`` (a scalar or
    ``[B]`` for reduction "none", in the loss dtype), which stays on the device.
    ``fields``: LossArgs, grad_output, backend."""
    *fields, grad_output, backend = fields
    args = LossArgs(*fields)
    div = args.divisor(pred.shape[0])
    grad_output = grad_output.contiguous()
    if backend == "triton":
        return _triton_kernels().noise_loss(
            *args.kernel_args(pred), grad_div=div, need_loss=False, grad_output=grad_output
        )[2]
    if backend in ("cpu", "cuda"):
        return torch.ops.debias_C.noise_loss_bwd(*args.kernel_args(pred), div, grad_output)
    target = _target_torch(pred, args)
    loss = _torch_loss_args(pred, args)
    grad = reference.weighted_loss_grad(pred, target, args.coef[0], div, **loss)
    return grad * grad_output.view((-1,) + (1,) * (pred.dim() - 1)).to(grad.dtype)


def _torch_loss_args(pred: torch.Tensor, args: LossArgs) -> dict[str, Any]:
    """The kind, c and the expanded mask of reference.weighted_loss for the torch backend."""
    kind = reference.LOSS_KINDS[args.kind]
    c = args.coef[3] if kind == "pseudo_huber" else None
    return {"kind": kind, "c": c, "mask": args.torch_mask(pred)}


def _target_torch(pred: torch.Tensor, args: LossArgs) -> torch.Tensor:
    """The torch backend's target: reference.affine_target on the noise (the stream drawn by
    the reference when it is not given) and x0, with the terms the op names."""
    eps = None
    if args.terms & TERM_EPS:
        eps = args.noise
        if eps is None:
            shape = list(pred.shape)
            eps = _philox_normal_impl(args.key, shape, args.eps_dtype, pred.device, "torch")
    x0 = args.x0 if args.terms & TERM_X0 else None
    return reference.affine_target(eps, x0, args.coef[1], args.coef[2])


_LOSS_SCHEMA = _schema("Tensor pred", "bool need_grad, str backend") + " -> (Tensor, Tensor)"
_LOSS_BWD_SCHEMA = _schema("Tensor pred", "Tensor grad_output, str backend") + " -> Tensor"
_philox_normal_op, _philox_normal = _custom_op("debias::philox_normal", _philox_normal_impl)
_add_noise_op, _add_noise = _custom_op("debias::add_noise", _add_noise_impl)
_noise_loss_op, _noise_loss = _custom_op("debias::noise_loss", _noise_loss_impl, _LOSS_SCHEMA)
_noise_loss_bwd_op, _noise_loss_bwd = _custom_op(
    "debias::noise_loss_bwd", _noise_loss_bwd_impl, _LOSS_BWD_SCHEMA
)


@_philox_normal_op.register_fake
def _(key, shape, dtype, device, backend):
    return torch.empty(shape, dtype=dtype, device=device)


@_add_noise_op.register_fake
def _(x0, coef, noise, key, keep_noise, xi, xi_key, backend):
    kept = torch.empty_like(x0) if keep_noise and noise is None else x0.new_empty(0)
    return torch.empty_like(x0), kept


@_noise_loss_op.register_fake
def _(pred, *fields):
    *fields, need_grad, _backend_name = fields
    args = LossArgs(*fields)
    loss_shape = (pred.shape[0],) if _REDUCTIONS[args.reduction] == "none" else ()
    grad_shape = pred.shape if need_grad else (0,)
    return pred.new_empty(loss_shape, dtype=args.coef.dtype), pred.new_empty(grad_shape)


@_noise_loss_bwd_op.register_fake
def _(pred, *fields):
    return torch.empty_like(pred)


class _AddNoise(torch.autograd.Function):
    """x_t = a x0 + s noise (+ s g xi): the gradients are the per-sample coefficients."""

    @staticmethod
    def forward(ctx, x0, coef, noise, key, keep_noise, xi, xi_key, backend):
        ctx.save_for_backward(coef)
        ctx.dim = x0.dim()
        x_t, kept = _add_noise(x0, coef, noise, key, keep_noise, xi, xi_key, backend)
        ctx.mark_non_differentiable(kept)
        ctx.set_materialize_grads(False)
        return x_t, kept

    @staticmethod
    def backward(ctx, grad, _grad_kept):
        if grad is None:
            return (None,) * 8
        (coef,) = ctx.saved_tensors
        shape = (-1,) + (1,) * (ctx.dim - 1)
        grad_x0 = grad * coef[0].to(grad.dtype).view(shape)
        grad_noise = grad * coef[1].to(grad.dtype).view(shape) if ctx.needs_input_grad[2] else None
        return grad_x0, None, grad_noise, None, None, None, None, None


def _is_host_one(x: torch.Tensor) -> bool:
    """x == 1, read only where reading costs no device sync and breaks no graph."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and x.item() == 1.0


class _NoiseLoss(torch.autograd.Function):
    """Two designs (GRAD_IN_FORWARD): the gradient computed in forward and kept, backward
    only scaling it by grad_output; or forward computing the loss alone and backward
    recomputing the gradient from pred and the regenerated noise, grad_output read on the
    device. Neither synchronises the device. The LossArgs record travels whole: its tensors
    through save_for_backward, the rest on ctx."""

    @staticmethod
    def forward(ctx, pred, args, backend):
        ctx.dim = pred.dim()
        ctx.keep = GRAD_IN_FORWARD[backend]
        loss, grad = _noise_loss(pred, *args, ctx.keep, backend)
        if ctx.keep:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(pred, *(getattr(args, f) for f in _TENSOR_FIELDS))
            ctx.args = args._replace(**dict.fromkeys(_TENSOR_FIELDS))
            ctx.backend = backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.keep:
            pred, *tensors = ctx.saved_tensors
            args = ctx.args._replace(**dict(zip(_TENSOR_FIELDS, tensors, strict=True)))
            return _noise_loss_bwd(pred, *args, grad_loss, ctx.backend), None, None
        (grad,) = ctx.saved_tensors
        if grad_loss.dim() > 0:  # reduction="none": one upstream gradient per sample
            grad_loss = grad_loss.view((-1,) + (1,) * (ctx.dim - 1))
        elif _is_host_one(grad_loss):
            # loss.backward() on the CPU: the kept gradient is the answer, no pass over it.
            # Autograd copies it if the graph is retained and accumulates into .grad without
            # writing to it, so handing out the kept buffer is safe.
            return grad, None, None
        # A scalar of pred's dtype rounds once; the usual grad_output of 1 (or a power-of-two
        # loss scale) passes the kept gradient through exactly.
        return grad * grad_loss.to(grad.dtype), None, None
