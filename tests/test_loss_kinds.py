"""The loss's kinds, masks and input perturbation (csrc/noise_loss.h) on every backend.

Each test compares a backend with the trainers' lines as sd-scripts writes them
(library/train_util.py ``conditional_loss``, library/custom_train_functions.py
``apply_masked_loss``, the ``loss.mean([1, 2, 3]) * loss_weights`` of train_network.py, and
the ``--ip_noise_gamma`` line of library/flux_train_utils.py), restated below with their
sources; and the gradient with the kernels' closed form (``reference.weighted_loss_grad``)
bit for bit, and between backends.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE_IDS, run_avx2_and_portable

import debias
from debias import reference
from debias.ops.noise_loss import LOSSES

RTOL = 1e-5
# Odd shapes: [B, C, H, W] images, [B, C, F, H, W] video and [B, N, C] packed tokens.
SHAPES = [(3, 2, 5, 7), (2, 3, 4, 3, 5), (3, 11, 6)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def conditional_loss(model_pred, target, loss_type, huber_c):
    """sd-scripts library/train_util.py ``conditional_loss(..., reduction="none")``."""
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(model_pred, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(model_pred, target, reduction="none")
    huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
    if loss_type == "huber":
        return 2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
    return 2 * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)


def trainer_loss(pred, target, loss_type, huber_c, mask, weights, normalize=False):
    """train_network.py's lines: conditional_loss on ``.float()``, times the mask
    (apply_masked_loss), the mean over the non-batch dims, times ``loss_weights``, the batch
    mean; with ``normalize`` the masked sum over the mask's sum (the masked-area mean)."""
    loss = conditional_loss(pred.float(), target.float(), loss_type, huber_c)
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    dims = list(range(1, loss.dim()))
    if normalize:
        area = mask.to(loss.dtype).expand_as(loss).sum(dims)
        loss = loss.sum(dims) / area
    else:
        loss = loss.mean(dims)
    return (loss * weights).mean()


def masks(shape, gen):
    """Every mask form a trainer hands over: per-pixel alpha, frame, token, one for the
    batch, full, non-adjacent full dims (expanded between them), and a bool mask."""
    B = shape[0]
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    out = {"none": None, "full": rand(*shape), "sample": rand(B, *[1] * (len(shape) - 1))}
    if len(shape) == 3:
        _, N, C = shape
        out["token"] = (rand(B, N, 1) > 0.5).float()
        out["channel"] = rand(C)
    elif len(shape) == 4:
        _, C, H, W = shape
        out["alpha"] = rand(B, 1, H, W)
        out["shared"] = rand(H, W)
        out["gap"] = rand(B, C, 1, W)
        out["bool"] = rand(B, 1, H, W) > 0.3
    else:
        _, C, F, H, W = shape
        out["frame"] = (rand(B, 1, F, 1, 1) > 0.4).float()
        out["token"] = rand(B, 1, F, H, 1)
    return out


def make(shape, dtype, gen):
    x0 = torch.randn(shape, generator=gen).to(dtype)
    noise = torch.randn(shape, generator=gen).to(dtype)
    pred = (torch.randn(shape, generator=gen) * 0.7).to(dtype)
    sigma = torch.rand(shape[0], generator=gen)
    return x0, noise, pred, sigma


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DTYPE_IDS.get)
def test_losses_and_masks_equal_sd_scripts(backend, shape, loss, dtype):
    gen = torch.Generator().manual_seed(3)
    x0, noise, pred0, sigma = make(shape, dtype, gen)
    c = (0.05 + torch.rand(shape[0], generator=gen)) if loss in ("huber", "smooth_l1") else None
    weights = torch.rand(shape[0], generator=gen) + 0.5
    # The target in the compute type: a bf16 script's `noise - latents` rounds it to bf16
    # first (README's bf16 note); the lines compared here are the loss's.
    acc = torch.promote_types(dtype, torch.float32)
    target = noise.to(acc) - x0.to(acc)
    for name, mask in masks(shape, gen).items():
        for normalize in (False, True) if mask is not None else (False,):
            want_pred = pred0.clone().requires_grad_()
            want = trainer_loss(
                want_pred, target, loss, c, mask, weights.double() if dtype == torch.float64
                else weights, normalize,
            )  # fmt: skip
            want.backward()
            pred = pred0.clone().requires_grad_()
            got = debias.fused_loss(
                pred, noise, sigma, "flow", "none", "flow", x0, loss=loss, huber_c=c,
                mask=mask, mask_normalize=normalize, sample_weight=weights, backend=backend,
            )  # fmt: skip
            got.backward()
            rtol = RTOL if dtype != torch.bfloat16 else 1e-4  # the trainer's bf16 pred.grad
            where = f"mask={name} normalize={normalize}"
            say = lambda m, where=where: f"{where}: {m}"  # noqa: E731
            torch.testing.assert_close(got, want.to(got.dtype), rtol=RTOL, atol=0, msg=say)
            torch.testing.assert_close(
                pred.grad.float(),
                want_pred.grad.float(),
                rtol=rtol,
                atol=1e-9,
                msg=say,
            )


def kernel_case(shape, dtype, kind, gen):
    """A low-level call's inputs: (pred, noise, x0, w, p, q, c)."""
    x0, noise, pred, _ = make(shape, dtype, gen)
    w = torch.rand(shape[0], generator=gen) + 0.1
    p = torch.randn(shape[0], generator=gen)
    q = torch.randn(shape[0], generator=gen)
    c = 0.02 + torch.rand(shape[0], generator=gen) if kind == "smooth_l1" else None
    return pred, noise, x0, w, p, q, c


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", ["l2", "l1", "smooth_l1"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get
)
def test_gradient_is_the_closed_form_bit_for_bit(backend, shape, kind, dtype):
    """grad = rnd_P((k w / D / B) * (m h(d))) with l2's, l1's and pseudo-Huber's h: the same
    bits on every backend (smooth_l1 is pseudo-Huber with w times 2)."""
    gen = torch.Generator().manual_seed(5)
    pred0, noise, x0, w, p, q, c = kernel_case(shape, dtype, kind, gen)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    for name, mask in masks(shape, gen).items():
        pred = pred0.clone().requires_grad_()
        loss = debias.affine_loss(
            pred, noise, w, p, q, x0, loss=kind, huber_c=c, mask=mask, backend=backend
        )
        loss.backward()
        target = reference.affine_target(noise, x0, p.to(compute), q.to(compute))
        ref_kind = "pseudo_huber" if kind == "smooth_l1" else kind
        wk = w.to(compute) * 2.0 if kind == "smooth_l1" else w.to(compute)
        full = None if mask is None else mask.expand(shape).to(compute)
        want = reference.weighted_loss_grad(
            pred0, target, wk, shape[0], ref_kind, None if c is None else c.to(compute), full
        )
        assert torch.equal(pred.grad, want), f"mask={name}"
        want_loss = reference.weighted_loss(
            pred0.to(compute), target, wk, "mean", ref_kind, c, full
        )
        torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=0, msg=f"mask={name}")


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_and_upstream_gradient(backend, reduction):
    gen = torch.Generator().manual_seed(7)
    shape = (4, 3, 5, 6)
    pred0, noise, x0, w, p, q, _ = kernel_case(shape, torch.float32, "l1", gen)
    mask = torch.rand(4, 1, 5, 6, generator=gen)
    c = torch.rand(4, generator=gen) + 0.1
    upstream = torch.rand(4, generator=gen) if reduction == "none" else torch.tensor(3.0)
    pred = pred0.clone().requires_grad_()
    kw = dict(loss="huber", huber_c=c, mask=mask, mask_normalize=True)
    got = debias.affine_loss(pred, noise, w, p, q, x0, reduction, backend=backend, **kw)
    got.backward(upstream)
    want_pred = pred0.clone().requires_grad_()
    want = debias.affine_loss(want_pred, noise, w, p, q, x0, reduction, backend="torch", **kw)
    want.backward(upstream)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
    # Within one rounding: a backend that keeps the gradient from forward rounds it, then its
    # product with the upstream gradient; one that recomputes it folds the upstream gradient
    # into g_b first (csrc/noise_loss.h), one rounding in all.
    torch.testing.assert_close(pred.grad, want_pred.grad, rtol=2.5e-7, atol=0)


def test_masked_area_of_an_empty_mask_is_zero(backend):
    """mask_normalize over a sample whose mask is all zero: that sample adds 0, no NaN."""
    gen = torch.Generator().manual_seed(8)
    shape = (3, 2, 4, 4)
    pred, noise, x0, w, p, q, _ = kernel_case(shape, torch.float32, "l2", gen)
    pred.requires_grad_()
    mask = torch.rand(3, 1, 4, 4, generator=gen)
    mask[1] = 0
    loss = debias.affine_loss(
        pred, noise, w, p, q, x0, "none", mask=mask, mask_normalize=True, backend=backend
    )
    loss.sum().backward()
    assert loss[1] == 0 and torch.isfinite(loss).all()
    assert (pred.grad[1] == 0).all() and torch.isfinite(pred.grad).all()


# ---- input perturbation ----------------------------------------------------------------------


def ip_noise_line(latents, noise, sigmas, gamma, xi):
    """sd-scripts library/flux_train_utils.py get_noisy_model_input_and_timesteps with
    ``--ip_noise_gamma``: ``(1.0 - sigmas) * latents + sigmas * (noise + ip_noise_gamma * xi)``
    (sigmas [B, 1, ...] in the latents' dtype)."""
    sigmas = sigmas.view(-1, *[1] * (latents.dim() - 1)).to(latents.dtype)
    return (1.0 - sigmas) * latents + sigmas * (noise + gamma * xi)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DTYPE_IDS.get)
def test_input_perturbation_equals_the_trainers_line_bitwise(backend, shape, dtype):
    gen = torch.Generator().manual_seed(9)
    x0, noise, _, sigma = make(shape, dtype, gen)
    xi = torch.randn(shape, generator=gen).to(dtype)
    sigma = sigma.to(dtype).to(torch.float32)  # the trainer's sigmas in the latents' dtype
    want = ip_noise_line(x0, noise, sigma, 0.1, xi)
    x_t, returned = debias.add_noise(
        x0, sigma, "flow", noise, input_perturbation=0.1, perturbation_noise=xi, backend=backend
    )
    assert torch.equal(x_t, want)
    assert returned is noise  # the target keeps the unperturbed noise


def test_input_perturbation_per_sample_and_from_the_stream(backend):
    """A [B] strength (sd-scripts' --ip_noise_gamma_random_strength) and xi from a second
    Philox key of the generator: x_t is the trainer's line on the two streams (as this backend
    draws them), the noise's key is the one drawn without perturbation, and the loss reads
    the unperturbed noise."""
    shape = (3, 2, 6, 5)
    gen = torch.Generator().manual_seed(10)
    x0 = torch.randn(shape, generator=gen)
    sigma = torch.rand(3, generator=gen)
    gamma = torch.tensor([0.0, 0.05, 0.2])

    def run(**kw):
        torch.manual_seed(4)
        return debias.add_noise(x0, sigma, "flow", backend=backend, **kw)

    x_t, noise = run(input_perturbation=gamma)
    plain, plain_noise = run()
    assert torch.equal(noise.key, plain_noise.key)
    assert torch.equal(x_t[0], plain[0])  # gamma 0
    assert not torch.equal(x_t[1:], plain[1:])
    torch.manual_seed(4)
    torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)  # the noise's key
    xi_key = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    xi = debias.PhiloxNoise(xi_key, x0.shape, x0.dtype, x0.device, backend).materialize()
    eps = noise.materialize()
    assert torch.equal(x_t, ip_noise_line(x0, eps, sigma, gamma.view(-1, 1, 1, 1), xi))
    pred = torch.randn(shape)
    got = debias.fused_loss(pred, noise, sigma, "flow", "none", "flow", x0, backend=backend)
    torch.testing.assert_close(got, ((pred - (eps - x0)) ** 2).mean(), rtol=RTOL, atol=0)


def test_input_perturbation_gradients_reach_x0_and_noise(backend):
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    noise = torch.randn(2, 3, 4, 4, requires_grad=True)
    sigma = torch.tensor([0.3, 0.8])
    xi = torch.randn(2, 3, 4, 4)
    x_t, _ = debias.add_noise(
        x0, sigma, "flow", noise, input_perturbation=0.1, perturbation_noise=xi, backend=backend
    )
    x_t.sum().backward()
    torch.testing.assert_close(x0.grad, (1 - sigma).view(-1, 1, 1, 1).expand_as(x0))
    torch.testing.assert_close(noise.grad, sigma.view(-1, 1, 1, 1).expand_as(x0))


# ---- bad input -------------------------------------------------------------------------------

B4 = (2, 3, 4, 4)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"loss": "mse"}, ValueError, "loss must be one of"),
        ({"loss": "huber"}, ValueError, "needs huber_c"),
        ({"loss": "huber", "huber_c": 0.0}, ValueError, "huber_c must be finite and > 0"),
        ({"loss": "huber", "huber_c": float("nan")}, ValueError, "huber_c must be finite"),
        ({"loss": "smooth_l1", "huber_c": torch.tensor([0.1, -1.0])}, ValueError, "huber_c must"),
        ({"loss": "huber", "huber_c": torch.tensor([0.1])}, ValueError, r"huber_c must have shape"),
        ({"loss": "huber", "huber_c": "0.1"}, TypeError, "huber_c must be a float"),
        ({"huber_c": 0.1}, ValueError, "huber_c is used by loss='huber' or 'smooth_l1' only"),
        ({"mask": torch.ones(2, 1, 3, 4)}, ValueError, "mask of shape .* does not broadcast"),
        ({"mask": torch.ones(3, 1, 4, 4)}, ValueError, "mask of shape .* does not broadcast"),
        ({"mask": torch.ones(1, 2, 3, 4, 4)}, ValueError, "mask of shape .* does not broadcast"),
        ({"mask": -torch.ones(2, 1, 4, 4)}, ValueError, "mask must be finite and >= 0"),
        ({"mask": torch.full((4, 4), float("inf"))}, ValueError, "mask must be finite"),
        ({"mask": torch.ones(2, 1, 4, 4, dtype=torch.int64)}, TypeError, "mask must be a float"),
        ({"mask": [[1.0]]}, TypeError, "mask must be a torch.Tensor"),
        ({"mask_normalize": True}, ValueError, "mask_normalize=True needs a mask"),
        ({"mask": torch.ones(4, 4), "mask_normalize": 1}, TypeError, "mask_normalize must"),
        ({"sample_weight": torch.ones(3)}, ValueError, r"sample_weight must have shape \[2\]"),
    ],
)
def test_loss_options_refused_naming_them(kwargs, err, match):
    pred, noise, x0 = torch.randn(B4), torch.randn(B4), torch.randn(B4)
    sigma = torch.tensor([0.2, 0.7])
    with pytest.raises(err, match=match):
        debias.fused_loss(pred, noise, sigma, "flow", "none", "flow", x0, **kwargs)


def test_mask_requiring_grad_is_refused():
    pred, noise = torch.randn(B4), torch.randn(B4)
    mask = torch.ones(2, 1, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="mask requires grad"):
        debias.affine_loss(pred, noise, torch.ones(2), torch.ones(2), mask=mask)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"input_perturbation": -0.1}, ValueError, "input_perturbation must be finite and >= 0"),
        ({"input_perturbation": float("inf")}, ValueError, "input_perturbation must be finite"),
        ({"input_perturbation": "0.1"}, TypeError, "input_perturbation must be a float"),
        ({"input_perturbation": torch.ones(3)}, ValueError, "input_perturbation must have shape"),
        ({"perturbation_noise": torch.randn(B4)}, ValueError, "without input_perturbation"),
        (
            {"input_perturbation": 0.1, "perturbation_noise": torch.randn(2, 3, 4)},
            ValueError,
            "perturbation_noise has shape",
        ),
        (
            {"input_perturbation": 0.1, "perturbation_noise": torch.randn(B4).double()},
            TypeError,
            "perturbation_noise must have x0's dtype",
        ),
    ],
)
def test_perturbation_refused_naming_it(kwargs, err, match):
    with pytest.raises(err, match=match):
        debias.add_noise(torch.randn(B4), torch.tensor([0.2, 0.7]), "flow", **kwargs)


# The cpu backend's loss and noising tiles, compiled for the baseline ISA and for AVX2
# (csrc/noise_loss.cpp): every kind, mask and dtype, with the noise given (the two paths'
# generators differ by fused multiply-adds), on samples of several tiles and chunks.
_PORTABLE_SCRIPT = """
import sys, torch, debias
g = torch.Generator().manual_seed(5)
out = {}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for shape in ((3, 5, 37, 41), (2, 3, 97, 101)):
        B = shape[0]
        x0, noise, xi, pred = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
        sigma = torch.rand(B, generator=g)
        x_t, _ = debias.add_noise(x0, sigma, "flow", noise=noise, input_perturbation=0.1,
                                  perturbation_noise=xi, backend="cpu")
        out[(str(dtype), shape, "x_t")] = x_t
        masks = {"none": None, "alpha": torch.rand(B, 1, *shape[2:], generator=g),
                 "frame": torch.rand(B, 1, shape[2], 1, generator=g)}
        for loss in ("l2", "l1", "huber"):
            c = torch.rand(B, generator=g) + 0.01 if loss == "huber" else None
            for name, mask in masks.items():
                p = pred.clone().requires_grad_()
                value = debias.fused_loss(p, noise, sigma, "flow", "none", "flow", x0,
                                          loss=loss, huber_c=c, mask=mask, backend="cpu")
                value.backward()
                out[(str(dtype), shape, loss, name)] = (value, p.grad)
torch.save(out, sys.argv[1])
"""


def test_portable_tiles_match_avx2(tmp_path):
    """DEBIAS_NO_AVX2=1 runs the baseline-ISA tiles: the same bits as the AVX2 ones."""
    if "cpu" not in debias.ops._backend.available(torch.device("cpu")):
        pytest.skip("the C++ extension is not built")
    avx2, portable = run_avx2_and_portable(_PORTABLE_SCRIPT, tmp_path)
    assert avx2.keys() == portable.keys()
    for key, value in avx2.items():
        for a, b in zip(
            torch.utils._pytree.tree_leaves(value),
            torch.utils._pytree.tree_leaves(portable[key]),
            strict=True,
        ):
            assert torch.equal(a, b), key
