"""The loss side of a diffusion training step: noising, and the weighted loss with its
gradient, each in one pass over the data.

    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                       (add_noise)
    L_b  = w(t_b) / D * sum_i (pred_bi - y_bi)^2,   y = eps | v | x0     (fused_loss)
    dL/dpred = 2 w(t_b) / D * (pred - y) * scale                         (same pass)

With ``noise=None`` the noise is a Philox stream (``PhiloxNoise``): drawn inside the kernel from
a key taken from torch's generator and drawn again by the loss, so it need never be written to
memory (the compute-bound CPU backend keeps it instead; see ``PhiloxNoise.values``).
The gradient is either computed in the forward pass and kept until backward, which scales it
by ``grad_output``, or recomputed in backward (``GRAD_IN_FORWARD``); ``grad_output`` stays
on the device either way (no synchronisation).

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
# Backends that keep the noise they generate (PhiloxNoise.values): compute-bound ones.
_KEEPS_NOISE = ("torch", "cpu")
_TARGETS = {"epsilon": 0, "v_prediction": 1, "sample": 2}
# The gradient design per backend: True computes the gradient in the loss's forward pass and
# keeps it for backward (on the CPU, whose backward then usually costs nothing: see
# _NoiseLoss.backward); False computes the loss alone and recomputes the gradient in
# backward, regenerating the noise: the GPU kernels are bound by memory, and this moves 5
# tensor passes for the loss side instead of 6 (benchmarks/bench_noise_loss.py times both).
GRAD_IN_FORWARD = {"torch": True, "cpu": True, "triton": False, "cuda": False}
_REDUCTIONS = ("mean", "sum", "none")


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
    key = _draw_key(generator) if noise is None else None
    noise_arg = None if noise is None else noise.contiguous()
    keep = noise is None and backend in _KEEPS_NOISE
    args = (x0.contiguous(), t.long(), coef[0], coef[1], noise_arg, key, keep, backend)
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
    philox = isinstance(noise, PhiloxNoise) and noise.values is None
    if isinstance(noise, PhiloxNoise) and not philox:
        noise = noise.values
    args = (
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
    )
    pred = pred.contiguous()
    if pred.requires_grad and torch.is_grad_enabled():
        return _NoiseLoss.apply(pred, *args, backend)
    return _noise_loss(pred, *args, False, backend)[0]


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


# ---- custom ops and autograd ----------------------------------------------------------------
#
# Each kernel entry is a torch.library custom op with a fake implementation, so torch.compile
# traces through it; eager mode calls the same implementation directly, since the custom op's
# Python dispatch costs more than a small kernel (_custom_op). Autograd is a plain
# autograd.Function, which dynamo traces as well.


def _custom_op(name: str, impl):
    """Registers ``impl`` as custom op ``name``; returns (the op, a caller that uses the op
    under torch.compile and ``impl`` itself in eager mode)."""
    op = torch.library.custom_op(name, impl, mutates_args=())

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
    t: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    noise: torch.Tensor | None,
    key: torch.Tensor | None,
    keep_noise: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, the generated noise if ``keep_noise`` else an empty tensor)."""
    seed, offset = key.tolist() if key is not None else (0, 0)
    if backend in ("cpu", "cuda"):
        return torch.ops.debias_C.add_noise(x0, t, coef_a, coef_b, noise, seed, offset, keep_noise)
    kept = x0.new_empty(0)
    if backend == "triton":
        return _triton_kernels().add_noise(x0, t, coef_a, coef_b, noise, seed, offset), kept
    if noise is None:
        noise = _philox_normal_impl(key, list(x0.shape), x0.dtype, x0.device, backend)
        kept = noise if keep_noise else kept
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = coef_a[t].to(x0.dtype).view(shape)
    s = coef_b[t].to(x0.dtype).view(shape)
    return a * x0 + s * noise, kept


def _noise_loss_impl(
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
    """(loss reduced as asked, d loss / d pred or an empty tensor if not ``need_grad``); the
    gradient already carries the 1/B of a mean."""
    seed, offset = key.tolist() if key is not None else (0, 0)
    div = pred.shape[0] if _REDUCTIONS[reduction] == "mean" else 1
    args = (pred, t, weight, coef_a, coef_b, noise, x0, target, noise_dtype, seed, offset)
    if backend == "triton":
        per_sample, total, grad = _triton_kernels().noise_loss(
            *args, grad_div=div, loss_div=div, need_grad=need_grad
        )
        grad = grad if need_grad else pred.new_empty(0)
    elif backend in ("cpu", "cuda"):
        per_sample, total, grad = torch.ops.debias_C.noise_loss_fwd(
            *args, 1.0 / div, 1.0 / div, need_grad
        )
    else:
        per_sample, grad = _noise_loss_torch(*args, 1.0 / div, need_grad)
        total = per_sample.sum() / div
    return (per_sample if _REDUCTIONS[reduction] == "none" else total), grad


def _noise_loss_bwd_impl(
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
    grad_output: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """d loss / d pred recomputed from pred and the noise, times ``grad_output`` (a scalar or
    ``[B]`` for reduction "none", in the loss dtype), which stays on the device."""
    seed, offset = key.tolist() if key is not None else (0, 0)
    div = pred.shape[0] if _REDUCTIONS[reduction] == "mean" else 1
    args = (pred, t, weight, coef_a, coef_b, noise, x0, target, noise_dtype, seed, offset)
    grad_output = grad_output.contiguous()
    if backend == "triton":
        return _triton_kernels().noise_loss(
            *args, grad_div=div, need_loss=False, grad_output=grad_output
        )[2]
    if backend in ("cpu", "cuda"):
        return torch.ops.debias_C.noise_loss_bwd(*args, 1.0 / div, grad_output)
    grad = _noise_loss_torch(*args, 1.0 / div, True)[1]
    return grad * grad_output.view((-1,) + (1,) * (pred.dim() - 1)).to(grad.dtype)


def _noise_loss_torch(
    pred, t, weight, coef_a, coef_b, noise, x0, target, noise_dtype, seed, offset, grad_scale,
    need_grad,
):  # fmt: skip
    compute = weight.dtype
    if noise is None:
        key = torch.tensor([seed, offset])
        noise = _philox_normal_impl(key, list(pred.shape), noise_dtype, pred.device, "torch")
    shape = (-1,) + (1,) * (pred.dim() - 1)
    eps = noise.to(compute)
    if target == _TARGETS["epsilon"]:
        y = eps
    elif target == _TARGETS["v_prediction"]:
        y = coef_a[t].view(shape) * eps - coef_b[t].view(shape) * x0.to(compute)
    else:
        y = x0.to(compute)
    diff = pred.to(compute) - y
    w = weight[t]
    per_sample = w * diff.square().mean(dim=list(range(1, pred.dim())))
    grad = torch.empty(0, dtype=pred.dtype, device=pred.device)
    if need_grad:
        grad = ((2.0 * grad_scale / diff[0].numel()) * w).view(shape) * diff
        grad = grad.to(pred.dtype)
    return per_sample, grad


_philox_normal_op, _philox_normal = _custom_op("debias::philox_normal", _philox_normal_impl)
_add_noise_op, _add_noise = _custom_op("debias::add_noise", _add_noise_impl)
_noise_loss_op, _noise_loss = _custom_op("debias::noise_loss", _noise_loss_impl)
_noise_loss_bwd_op, _noise_loss_bwd = _custom_op("debias::noise_loss_bwd", _noise_loss_bwd_impl)


@_philox_normal_op.register_fake
def _(key, shape, dtype, device, backend):
    return torch.empty(shape, dtype=dtype, device=device)


@_add_noise_op.register_fake
def _(x0, t, coef_a, coef_b, noise, key, keep_noise, backend):
    kept = torch.empty_like(x0) if keep_noise and noise is None else x0.new_empty(0)
    return torch.empty_like(x0), kept


@_noise_loss_op.register_fake
def _(pred, t, weight, coef_a, coef_b, noise, x0, key, target, noise_dtype, reduction,
      need_grad, backend):  # fmt: skip
    loss_shape = (pred.shape[0],) if _REDUCTIONS[reduction] == "none" else ()
    grad_shape = pred.shape if need_grad else (0,)
    return pred.new_empty(loss_shape, dtype=weight.dtype), pred.new_empty(grad_shape)


@_noise_loss_bwd_op.register_fake
def _(pred, t, weight, coef_a, coef_b, noise, x0, key, target, noise_dtype, reduction,
      grad_output, backend):  # fmt: skip
    return torch.empty_like(pred)


class _AddNoise(torch.autograd.Function):
    """x_t = a_t x0 + s_t noise: the gradients are the per-sample coefficients."""

    @staticmethod
    def forward(ctx, x0, t, coef_a, coef_b, noise, key, keep_noise, backend):
        ctx.save_for_backward(t, coef_a, coef_b)
        ctx.dim = x0.dim()
        x_t, kept = _add_noise(x0, t, coef_a, coef_b, noise, key, keep_noise, backend)
        ctx.mark_non_differentiable(kept)
        ctx.set_materialize_grads(False)
        return x_t, kept

    @staticmethod
    def backward(ctx, grad, _grad_kept):
        if grad is None:
            return (None,) * 8
        t, coef_a, coef_b = ctx.saved_tensors
        shape = (-1,) + (1,) * (ctx.dim - 1)
        grad_x0 = grad * coef_a[t].to(grad.dtype).view(shape)
        grad_noise = (
            grad * coef_b[t].to(grad.dtype).view(shape) if ctx.needs_input_grad[4] else None
        )
        return grad_x0, None, None, None, grad_noise, None, None, None


def _is_host_one(x: torch.Tensor) -> bool:
    """x == 1, read only where reading costs no device sync and breaks no graph."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and x.item() == 1.0


class _NoiseLoss(torch.autograd.Function):
    """Two designs (GRAD_IN_FORWARD): the gradient computed in forward and kept, backward
    only scaling it by grad_output; or forward computing the loss alone and backward
    recomputing the gradient from pred and the regenerated noise, grad_output read on the
    device. Neither synchronises the device."""

    @staticmethod
    def forward(ctx, pred, *args):
        *args, backend = args
        ctx.dim = pred.dim()
        ctx.keep = GRAD_IN_FORWARD[backend]
        loss, grad = _noise_loss(pred, *args, ctx.keep, backend)
        if ctx.keep:
            ctx.save_for_backward(grad)
        else:
            t, weight, coef_a, coef_b, noise, x0, key = args[:7]
            ctx.save_for_backward(pred, t, weight, coef_a, coef_b, noise, x0, key)
            ctx.args = (*args[7:], backend)  # target, noise_dtype, reduction; backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.keep:
            pred, *tensors = ctx.saved_tensors
            *consts, backend = ctx.args
            grad = _noise_loss_bwd(pred, *tensors, *consts, grad_loss, backend)
            return (grad,) + (None,) * 11
        (grad,) = ctx.saved_tensors
        if grad_loss.dim() > 0:  # reduction="none": one upstream gradient per sample
            grad_loss = grad_loss.view((-1,) + (1,) * (ctx.dim - 1))
        elif _is_host_one(grad_loss):
            # loss.backward() on the CPU: the kept gradient is the answer, no pass over it.
            # Autograd copies it if the graph is retained and accumulates into .grad without
            # writing to it, so handing out the kept buffer is safe.
            return (grad,) + (None,) * 11
        # A scalar of pred's dtype rounds once; the usual grad_output of 1 (or a power-of-two
        # loss scale) passes the kept gradient through exactly.
        return (grad * grad_loss.to(grad.dtype),) + (None,) * 11
