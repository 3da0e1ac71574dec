"""The loss side of a diffusion training step: noising, and the weighted loss with its
gradient, each in one pass over the data.

    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                       (add_noise)
    L_b  = w(t_b) / D * sum_i (pred_bi - y_bi)^2,   y = eps | v | x0     (fused_loss)
    dL/dpred = 2 w(t_b) / D * (pred - y) * scale                         (same pass)

With ``noise=None`` the noise is a Philox stream (``PhiloxNoise``): drawn inside the kernel from
a key taken from torch's generator, never written to memory, and drawn again by the loss.
The gradient is computed in the forward pass and kept until backward, which only scales it
by ``grad_output``; ``grad_output`` stays on the device (no synchronisation).

Each public function checks its input once; the custom ops below it trust their input.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from debias import reference
from debias.ops import _backend
from debias.schedules import NoiseSchedule, as_schedule
from debias.weighting import Weighting, cached_weight_table, check_timesteps, resolve_prediction

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TARGETS = {"epsilon": 0, "v_prediction": 1, "sample": 2}
_REDUCTIONS = ("mean", "sum", "none")


class PhiloxNoise(NamedTuple):
    """Standard normal noise held as a Philox key instead of a tensor.

    ``key`` is an int64 ``[2]`` CPU tensor ``(seed, offset)``; element i of the noise (flat,
    row-major) is a fixed function of ``(seed, offset, i)`` that every backend computes the
    same way up to float rounding (a few ulp). ``materialize()`` writes it out as a tensor,
    with the backend that drew it, so the bits are the ones ``add_noise`` used.
    """

    key: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    backend: str

    def materialize(self) -> torch.Tensor:
        """The noise as a tensor of ``shape``, ``dtype`` on ``device`` (like randn_like)."""
        return _philox_normal(self.key, list(self.shape), self.dtype, self.device, self.backend)

    def numel(self) -> int:
        return self.shape.numel()


# ---- public ops ---------------------------------------------------------------------------


def add_noise(
    x0: torch.Tensor,
    t: torch.Tensor,
    schedule: Any,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | PhiloxNoise]:
    """Noise ``x0`` to timesteps ``t``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Args:
        x0: clean data ``[B, ...]``, float32/float64/bfloat16/float16.
        t: integer timesteps ``[B]`` in [0, T).
        schedule: a ``NoiseSchedule`` or a diffusers scheduler.
        noise: a tensor like ``x0``; with it the result equals diffusers'
            ``scheduler.add_noise(x0, noise, t)`` bit for bit. None (default) draws the noise
            from a Philox stream inside the kernel.
        generator: a CPU ``torch.Generator`` for the Philox key; None uses torch's default,
            so ``torch.manual_seed`` makes runs repeatable.
        backend: force "torch", "cpu", "triton" or "cuda" (default: fastest available).

    Returns:
        ``(x_t, noise)``: x_t like ``x0``; ``noise`` is the given tensor or a
        ``PhiloxNoise`` to hand to ``fused_loss`` (``.materialize()`` gives the tensor).
    """
    schedule = as_schedule(schedule)
    _check_data("x0", x0)
    if _eager():
        check_timesteps(t, schedule.num_timesteps, batch=x0.shape[0])
    _check_same_device(x0=x0, t=t)
    if noise is not None:
        _check_like("noise", noise, "x0", x0)
        if noise.dtype != x0.dtype:
            raise TypeError(f"noise must have x0's dtype {x0.dtype}, got {noise.dtype}")
        if generator is not None:
            raise ValueError("generator is only used when noise=None; pass one or the other")
    backend = _backend.resolve(backend, x0.device)
    coef = _coefficients(schedule, x0.dtype, x0.device)
    key = None
    if noise is None:
        key = _draw_key(generator)
        noise = PhiloxNoise(key, x0.shape, x0.dtype, x0.device, backend)
    x_t = _add_noise_op(
        x0.contiguous(),
        t.long(),
        coef[0],
        coef[1],
        None if key is not None else noise.contiguous(),
        key,
        backend,
    )
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
    backend: str | None = None,
    **options: Any,
) -> torch.Tensor:
    """The weighted diffusion loss and its gradient in one pass.

    Equal to diffusers' ``mse_loss(pred.float(), target.float(), "none")`` averaged over the
    non-batch dims, times the per-sample weight, then reduced over the batch.

    Args:
        pred: the network's output ``[B, ...]``, float32/float64/bfloat16/float16.
        noise: the noise used to make x_t: a tensor like ``pred`` or the ``PhiloxNoise``
            that ``add_noise`` returned.
        t: integer timesteps ``[B]``.
        schedule: a ``NoiseSchedule`` or a diffusers scheduler.
        weighting: "constant", "debias" (default), "p2", "min_snr", a ``[T]`` tensor or a
            callable of snr, all in epsilon space (see ``debias.weighting``).
        prediction: what ``pred`` is: "epsilon", "v_prediction" or "sample"; None (default)
            takes the schedule's prediction type (a diffusers scheduler's config).
        x0: the clean data ``[B, ...]``; required for "v_prediction" and "sample".
        reduction: "mean" (default) or "sum" over the batch, or "none" for ``[B]``.
        backend: force "torch", "cpu", "triton" or "cuda".
        **options: ``gamma``, ``k``, ``max_weight``, ``normalize`` (see ``debias.weighting``).

    Returns:
        The loss in float32 (float64 for float64 ``pred``): a scalar, or ``[B]``.
        Gradients flow to ``pred`` only.
    """
    schedule = as_schedule(schedule)
    prediction = resolve_prediction(schedule, prediction)
    _check_data("pred", pred)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(noise, PhiloxNoise):
        if tuple(noise.shape) != tuple(pred.shape):
            raise ValueError(f"noise has shape {list(noise.shape)} but pred has {list(pred.shape)}")
        _check_same_device(pred=pred, noise=noise)
        noise_dtype = noise.dtype
    else:
        _check_like("noise", noise, "pred", pred)
        noise_dtype = noise.dtype
    if prediction != "epsilon":
        if x0 is None:
            raise ValueError(f"x0 is required for prediction={prediction!r}")
        _check_like("x0", x0, "pred", pred)
        if x0.dtype != noise_dtype:
            raise TypeError(f"x0 must have noise's dtype {noise_dtype}, got {x0.dtype}")
    if _eager():
        check_timesteps(t, schedule.num_timesteps, batch=pred.shape[0])
    _check_same_device(pred=pred, t=t)
    for name, tensor in (("noise", noise), ("x0", x0)):
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            raise ValueError(
                f"{name} requires grad, but fused_loss differentiates with respect to pred "
                f"only; pass {name}.detach()"
            )
    backend = _backend.resolve(backend, pred.device)

    compute = torch.float64 if pred.dtype == torch.float64 else torch.float32
    weight = cached_weight_table(schedule, weighting, prediction, compute, pred.device, options)
    coef = _coefficients(schedule, noise_dtype, pred.device, compute)
    philox = isinstance(noise, PhiloxNoise)
    loss, _ = _noise_loss_op(
        pred.contiguous(),
        t.long(),
        weight,
        coef[0],
        coef[1],
        None if philox else noise.contiguous(),
        x0.contiguous() if prediction != "epsilon" else None,
        noise.key if philox else None,
        _TARGETS[prediction],
        noise_dtype,
        _REDUCTIONS.index(reduction),
        pred.requires_grad and torch.is_grad_enabled(),
        backend,
    )
    return loss


# ---- input checks -------------------------------------------------------------------------


def _eager() -> bool:
    # Value checks read data on the host; under torch.compile they would break the graph.
    return not torch.compiler.is_compiling()


def _check_data(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float64, bfloat16 or float16, got dtype {x.dtype}"
        )
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


# ---- tables and keys ----------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _coefficients(
    schedule: NoiseSchedule, dtype: torch.dtype, device: torch.device, compute=None
) -> torch.Tensor:
    """``[2, T]``: sqrt(abar) and sqrt(1 - abar) as diffusers computes them in ``dtype`` (from
    the float32 table it keeps; float64 data uses the float64 table), stored in the compute
    type (float64 for float64 data, else float32) so the kernel's products round like
    diffusers' do."""
    compute = compute or (torch.float64 if dtype == torch.float64 else torch.float32)

    def build() -> torch.Tensor:
        abar = schedule.alphas_cumprod
        if dtype != torch.float64:
            abar = abar.float().to(dtype)
        return torch.stack((abar.sqrt(), (1 - abar).sqrt())).to(compute)

    return schedule.table(("coef", dtype, compute), build, device)


def _draw_key(generator: torch.Generator | None) -> torch.Tensor:
    """A fresh (seed, offset) from a CPU generator: drawn on the host, so no device sync."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(
                "generator must be a CPU torch.Generator (the Philox key is drawn on the host "
                f"so the device never synchronises), got one on {generator.device}"
            )
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator)


def _key_values(key: torch.Tensor) -> tuple[int, int]:
    seed, offset = key.tolist()
    return seed, offset


# ---- custom ops: what torch.compile sees ----------------------------------------------------


@torch.library.custom_op("debias::philox_normal", mutates_args=())
def _philox_normal(
    key: torch.Tensor, shape: list[int], dtype: torch.dtype, device: torch.device, backend: str
) -> torch.Tensor:
    seed, offset = _key_values(key)
    if backend == "cpu":
        return torch.ops.debias_C.philox_normal(seed, offset, shape, dtype)
    numel = torch.Size(shape).numel()
    return reference.philox_normal(seed, offset, numel, device).view(shape).to(dtype)


@_philox_normal.register_fake
def _(key, shape, dtype, device, backend):
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("debias::add_noise", mutates_args=())
def _add_noise_op(
    x0: torch.Tensor,
    t: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    noise: torch.Tensor | None,
    key: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    seed, offset = _key_values(key) if key is not None else (0, 0)
    if backend == "cpu":
        return torch.ops.debias_C.add_noise(x0, t, coef_a, coef_b, noise, seed, offset)
    if noise is None:
        noise = _philox_normal(key, list(x0.shape), x0.dtype, x0.device, backend)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = coef_a[t].to(x0.dtype).view(shape)
    s = coef_b[t].to(x0.dtype).view(shape)
    return a * x0 + s * noise


@_add_noise_op.register_fake
def _(x0, t, coef_a, coef_b, noise, key, backend):
    return torch.empty_like(x0)


def _add_noise_setup(ctx, inputs, output):
    x0, t, coef_a, coef_b, noise, _, _ = inputs
    ctx.save_for_backward(t, coef_a, coef_b)
    ctx.dim, ctx.has_noise = x0.dim(), noise is not None


def _add_noise_backward(ctx, grad):
    t, coef_a, coef_b = ctx.saved_tensors
    shape = (-1,) + (1,) * (ctx.dim - 1)
    grad_x0 = grad * coef_a[t].to(grad.dtype).view(shape)
    grad_noise = grad * coef_b[t].to(grad.dtype).view(shape) if ctx.has_noise else None
    return grad_x0, None, None, None, grad_noise, None, None


_add_noise_op.register_autograd(_add_noise_backward, setup_context=_add_noise_setup)


@torch.library.custom_op("debias::noise_loss", mutates_args=())
def _noise_loss_op(
    pred: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    noise: torch.Tensor | None,
    x0: torch.Tensor | None,
    key: torch.Tensor | None,
    target: int,
    noise_dtype: torch.dtype,
    reduction: int,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, grad): loss reduced as asked, grad = d loss / d pred (empty if not
    ``need_grad``), already scaled by 1/B for the mean."""
    seed, offset = _key_values(key) if key is not None else (0, 0)
    batch = pred.shape[0]
    grad_scale = 1.0 / batch if _REDUCTIONS[reduction] == "mean" else 1.0
    if backend == "cpu":
        per_sample, grad = torch.ops.debias_C.noise_loss_fwd(
            pred, t, weight, coef_a, coef_b, noise, x0, target, noise_dtype, seed, offset,
            grad_scale, need_grad,
        )  # fmt: skip
    else:
        per_sample, grad = _noise_loss_torch(
            pred, t, weight, coef_a, coef_b, noise, x0, key, target, noise_dtype, grad_scale,
            need_grad,
        )  # fmt: skip
    loss = {"mean": per_sample.mean, "sum": per_sample.sum}.get(_REDUCTIONS[reduction])
    return (loss() if loss else per_sample), grad


def _noise_loss_torch(
    pred, t, weight, coef_a, coef_b, noise, x0, key, target, noise_dtype, grad_scale, need_grad
):
    compute = weight.dtype
    if noise is None:
        noise = _philox_normal(key, list(pred.shape), noise_dtype, pred.device, "torch")
    shape = (-1,) + (1,) * (pred.dim() - 1)
    eps = noise.to(compute)
    if target == _TARGETS["epsilon"]:
        y = eps
    elif target == _TARGETS["v_prediction"]:
        y = coef_a[t].view(shape) * eps - coef_b[t].view(shape) * x0.to(compute)
    else:
        y = x0.to(compute)
    diff = pred.to(compute) - y
    dims = list(range(1, pred.dim()))
    w = weight[t]
    per_sample = w * diff.square().mean(dim=dims)
    grad = torch.empty(0, dtype=pred.dtype, device=pred.device)
    if need_grad:
        grad = ((2.0 * grad_scale / diff[0].numel()) * w).view(shape) * diff
        grad = grad.to(pred.dtype)
    return per_sample, grad


@_noise_loss_op.register_fake
def _(pred, t, weight, coef_a, coef_b, noise, x0, key, target, noise_dtype, reduction,
      need_grad, backend):  # fmt: skip
    batch = pred.shape[0]
    loss_shape = (batch,) if _REDUCTIONS[reduction] == "none" else ()
    grad_shape = pred.shape if need_grad else (0,)
    return (
        pred.new_empty(loss_shape, dtype=weight.dtype),
        pred.new_empty(grad_shape),
    )


def _noise_loss_setup(ctx, inputs, output):
    ctx.dim = inputs[0].dim()
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _noise_loss_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError(
            "fused_loss was called without grad enabled for pred; its gradient was not kept"
        )
    if grad_loss.dim() > 0:  # reduction="none": one upstream gradient per sample
        grad_loss = grad_loss.view((-1,) + (1,) * (ctx.dim - 1))
    # Multiplying by a scalar of pred's dtype rounds once; for the usual grad_output of 1 (or
    # a power-of-two loss scale) the kept gradient passes through exactly.
    grad_pred = grad * grad_loss.to(grad.dtype)
    return (grad_pred,) + (None,) * 12


_noise_loss_op.register_autograd(_noise_loss_backward, setup_context=_noise_loss_setup)
