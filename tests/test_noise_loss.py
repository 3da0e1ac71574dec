"""add_noise and fused_loss against the reference, on every backend that runs here."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import CPU, DTYPE_IDS, DTYPES, skip_unless_backend

import debias
from debias import NoiseSchedule, PhiloxNoise, reference
from debias.ops import _backend
from debias.ops.noise_loss import GRAD_IN_FORWARD

SHAPES = [(1, 1, 1, 1), (3, 1, 7, 5), (5, 3, 33, 31), (2, 4, 64, 64)]
WEIGHTINGS = [("constant", {}), ("debias", {}), ("p2", {"gamma": 0.5}), ("min_snr", {"gamma": 5})]
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SCHEDULE = NoiseSchedule.linear(1000)


def _abar(dtype: torch.dtype) -> torch.Tensor:
    """The table diffusers keeps (float32); float64 data uses the float64 table."""
    abar = SCHEDULE.alphas_cumprod
    return abar if dtype == torch.float64 else abar.float()


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    pred = torch.randn(shape, generator=g).to(dtype)
    # the extremes of the schedule are always in the batch
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    t[0] = 999
    if shape[0] > 1:
        t[1] = 0
    return x0, noise, pred, t


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _assert_within(name, got, oracle, baseline, dtype):
    """flash-attention's rule: our error against the fp64 oracle is at most twice that of the
    reference run in the same precision, plus a floor of a few ulp of the result's scale."""
    floor = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 2e-3)
    scale = oracle.double().abs().max().item() + 1e-30
    err, base = _max_err(got, oracle), _max_err(baseline, oracle)
    assert err <= 2 * base + floor * scale, (
        f"{name}: max error {err:.3g} vs reference's {base:.3g} (scale {scale:.3g})"
    )


@pytest.fixture(params=["kept", "recomputed"])
def design(request, backend, monkeypatch):
    """The gradient design of fused_loss on ``backend``: computed in forward and kept, or
    recomputed in backward (debias.ops.noise_loss.GRAD_IN_FORWARD)."""
    monkeypatch.setitem(GRAD_IN_FORWARD, backend, request.param == "kept")
    return request.param


# ---- add_noise ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_noise_equals_diffusers_bitwise(backend, shape, dtype):
    x0, noise, _, t = _inputs(shape, dtype)
    x_t, returned = debias.add_noise(x0, t, SCHEDULE, noise=noise, backend=backend)
    assert returned is noise
    assert torch.equal(x_t, reference.add_noise(x0, t, _abar(dtype), noise))


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=DTYPE_IDS.get)
def test_add_noise_special_values_round_like_torch(backend, dtype):
    """NaN, infinities, the largest finite value (its product rounds past it), subnormals and
    -0 go through the kernel's rounding exactly as through torch's."""
    info = torch.finfo(dtype)
    special = [
        float("nan"),
        float("inf"),
        -float("inf"),
        info.max,
        -info.max,
        info.tiny / 3,
        -0.0,
        0.0,
        1.0,
        info.eps,
    ]
    x0 = torch.tensor(special, dtype=torch.float64).to(dtype).view(-1, 1).repeat(1, 37)
    noise = x0.flip(0)
    t = torch.arange(len(special)) * 100
    x_t, _ = debias.add_noise(x0, t, SCHEDULE, noise=noise, backend=backend)
    expected = reference.add_noise(x0, t, _abar(dtype), noise)
    torch.testing.assert_close(x_t, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_add_noise_philox_equals_materialized(backend, dtype):
    x0, _, _, t = _inputs((5, 3, 33, 31), dtype)
    x_t, noise = debias.add_noise(x0, t, SCHEDULE, backend=backend)
    assert isinstance(noise, PhiloxNoise) and noise.shape == x0.shape and noise.dtype == dtype
    eps = noise.materialize()
    assert eps.shape == x0.shape and eps.dtype == dtype
    assert torch.equal(x_t, reference.add_noise(x0, t, _abar(dtype), eps))


def test_add_noise_gradients(backend):
    x0, noise, _, t = _inputs((3, 2, 5, 4), torch.float64)
    x0.requires_grad_(True)
    noise.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda a, b: debias.add_noise(a, t, SCHEDULE, noise=b, backend=backend)[0], (x0, noise)
    )


# ---- fused_loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting, opts", WEIGHTINGS, ids=[w for w, _ in WEIGHTINGS])
def test_fused_loss_matches_reference(backend, design, weighting, opts, prediction, shape, dtype):
    x0, noise, pred, t = _inputs(shape, dtype)
    w64 = debias.weight_table(SCHEDULE, weighting, prediction, **opts)

    pred_ours = pred.clone().requires_grad_(True)
    loss = debias.fused_loss(
        pred_ours, noise, t, SCHEDULE, weighting, prediction, x0=x0, backend=backend, **opts
    )
    loss.backward()

    # the reference as users run it (float32 weights, the input precision) ...
    pred_ref = pred.clone().requires_grad_(True)
    base = reference.noise_loss(pred_ref, noise, t, w64.float(), x0, _abar(dtype), prediction)
    base.backward()
    # ... and the same in float64 on the same (rounded) inputs: the oracle
    pred_64 = pred.double().requires_grad_(True)
    oracle = reference.noise_loss(
        pred_64, noise.double(), t, w64, x0.double(), SCHEDULE.alphas_cumprod, prediction
    )
    oracle.backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert pred_ours.grad.dtype == dtype
    _assert_within("loss", loss, oracle, base, torch.float32)
    _assert_within("grad", pred_ours.grad, pred_64.grad, pred_ref.grad, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_per_sample_grad_output(backend, design, reduction):
    _x0, noise, pred, t = _inputs((5, 3, 9, 7), torch.float32)
    w = debias.weight_table(SCHEDULE, "debias")
    pred_ours = pred.clone().requires_grad_(True)
    pred_ref = pred.clone().requires_grad_(True)
    loss = debias.fused_loss(pred_ours, noise, t, SCHEDULE, reduction=reduction, backend=backend)
    ref = reference.noise_loss(pred_ref, noise, t, w.float(), reduction=reduction)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grad_out = torch.rand(loss.shape) + 0.5  # a per-sample upstream gradient for "none"
    loss.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(pred_ours.grad, pred_ref.grad, rtol=1e-5, atol=1e-7)


def test_backward_twice_accumulates_and_scales(backend, design):
    """The gradient survives retain_graph, accumulation into .grad and loss scaling: exactly
    when kept (a power-of-two scale is exact either way); a recomputed gradient folds the
    scale into the per-sample factor, one rounding away from scaling the result."""
    _, noise, pred, t = _inputs((3, 2, 6, 5), torch.float32)
    p = pred.clone().requires_grad_(True)
    loss = debias.fused_loss(p, noise, t, SCHEDULE, backend=backend)
    loss.backward(retain_graph=True)
    once = p.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(p.grad, 2 * once, rtol=0, atol=0)
    loss.backward(torch.tensor(0.5))  # a loss scale
    torch.testing.assert_close(p.grad, 2.5 * once, rtol=1e-7, atol=0)
    p.grad = None
    (3 * debias.fused_loss(p, noise, t, SCHEDULE, backend=backend)).backward()
    rtol = 1e-7 if design == "kept" else 2.5e-7
    torch.testing.assert_close(p.grad, 3 * once, rtol=rtol, atol=0)


def test_float64_gradcheck(backend, design):
    x0, noise, pred, t = _inputs((3, 2, 5, 3), torch.float64)
    pred.requires_grad_(True)
    for prediction in PREDICTIONS:
        torch.autograd.gradcheck(
            lambda p, prediction=prediction: debias.fused_loss(
                p,
                noise,
                t,
                SCHEDULE,
                "min_snr",
                prediction,
                x0=x0,
                reduction="none",
                backend=backend,
            ),
            (pred,),
        )


def test_reference_gradcheck():
    """The oracle itself differentiates correctly (float64)."""
    x0, noise, pred, t = _inputs((3, 2, 5, 3), torch.float64)
    w = debias.weight_table(SCHEDULE, "debias", "v_prediction")
    pred.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda p: reference.noise_loss(
            p, noise, t, w, x0, SCHEDULE.alphas_cumprod, "v_prediction", "none"
        ),
        (pred,),
    )


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_philox_loss_equals_materialized(backend, prediction, dtype):
    """The loss regenerates the noise add_noise used: same as handing it the tensor."""
    x0, _, pred, t = _inputs((3, 3, 17, 9), dtype)
    _, kept = debias.add_noise(x0, t, SCHEDULE, backend=backend)
    regen = kept._replace(values=None)  # what a GPU backend hands over: the key alone
    eps = regen.materialize()
    # compute-bound backends keep what they drew; the GPU ones hand over the key alone
    assert (kept.values is not None) == (backend in ("torch", "cpu"))
    assert kept.values is None or torch.equal(kept.values, eps)
    grads, losses = [], []
    for noise in (regen, kept, eps):
        p = pred.clone().requires_grad_(True)
        loss = debias.fused_loss(
            p, noise, t, SCHEDULE, prediction=prediction, x0=x0, backend=backend
        )
        loss.backward()
        losses.append(loss)
        grads.append(p.grad)
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        torch.testing.assert_close(loss, losses[0], rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, grads[0], rtol=0, atol=0)


def test_no_grad_and_eval():
    _, noise, pred, t = _inputs((3, 3, 8, 8), torch.float32)
    with torch.no_grad():
        loss = debias.fused_loss(pred.requires_grad_(True), noise, t, SCHEDULE)
    assert loss.grad_fn is None
    loss = debias.fused_loss(pred.detach(), noise, t, SCHEDULE)
    assert not loss.requires_grad


# ---- the noise stream ---------------------------------------------------------------------


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    counters = torch.tensor(
        [[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]]
    )
    keys = [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (0xA4093822, 0x299F31D0)]
    expected = [
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ]
    for counter, key, want in zip(counters, keys, expected, strict=False):
        assert reference.philox4x32(counter[None], key)[0].tolist() == want


def test_philox_stream_equal_across_backends():
    skip_unless_backend("cpu")
    key = torch.tensor([0x0123456789ABCDEF, -7])
    shape = [3, 5, 7, 11]
    cpu = debias.ops.noise_loss._philox_normal_impl(
        key, shape, torch.float32, torch.device("cpu"), "cpu"
    )
    ref = debias.ops.noise_loss._philox_normal_impl(
        key, shape, torch.float32, torch.device("cpu"), "torch"
    )
    # the same stream up to float rounding of log, sin and cos
    torch.testing.assert_close(cpu, ref, rtol=4e-6, atol=1e-6)
    if "triton" in _backend.available(CPU):
        for dtype in (torch.float32, torch.bfloat16):
            cpu, triton = (
                debias.ops.noise_loss._philox_normal_impl(key, shape, dtype, CPU, backend)
                for backend in ("cpu", "triton")
            )
            # Triton follows philox.h's polynomials and fused multiply-adds: the same bits as
            # the CPU's AVX2+FMA path (the portable path is an ulp or so away)
            if _cpu_uses_fma():
                assert torch.equal(cpu, triton)
            torch.testing.assert_close(cpu, triton, rtol=4e-6, atol=1e-6)


def _cpu_uses_fma() -> bool:
    avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return avx2 and os.environ.get("DEBIAS_NO_AVX2", "") in ("", "0")


def _stream(backend, numel, seed=1234, offset=0):
    key = torch.tensor([seed, offset])
    return debias.ops.noise_loss._philox_normal_impl(
        key, [numel], torch.float64, torch.device("cpu"), backend
    )


def test_philox_statistics(backend):
    if backend == "triton":
        pytest.skip(
            "slow in the interpreter; the Triton stream is compared with the cpu one in "
            "test_philox_stream_equal_across_backends"
        )
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 1 << 20
    x = _stream(backend, n)
    assert abs(x.mean().item()) < 5 / n**0.5
    assert abs(x.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert scipy_stats.kstest(x.numpy(), "norm").pvalue > 1e-3
    # the four lanes of one Philox block and neighbouring elements are uncorrelated
    for lag in (1, 2, 3, 4, 5):
        r = torch.corrcoef(torch.stack((x[:-lag], x[lag:])))[0, 1].item()
        assert abs(r) < 5 / n**0.5, f"lag {lag}: correlation {r:.2e}"
    for lane in range(4):
        lane_x = x[lane::4]
        p = scipy_stats.kstest(lane_x.numpy(), "norm").pvalue
        assert p > 1e-3, f"lane {lane}: KS p-value {p:.2e}"
    # tails: the fraction beyond 3 sigma matches the normal's 0.0027
    tail = (x.abs() > 3).double().mean().item()
    assert abs(tail - 0.0026998) < 5 * (0.0027 / n) ** 0.5


def test_philox_independent_across_keys(backend):
    if backend == "triton":
        pytest.skip(
            "slow in the interpreter; the Triton stream is compared with the cpu one in "
            "test_philox_stream_equal_across_backends"
        )
    n = 1 << 18
    a, b, c = _stream(backend, n, 1), _stream(backend, n, 2), _stream(backend, n, 1, offset=1)
    for other in (b, c):
        r = torch.corrcoef(torch.stack((a, other)))[0, 1].item()
        assert abs(r) < 5 / n**0.5


def test_repeatable_under_manual_seed(backend):
    x0, _, _, t = _inputs((2, 3, 8, 8), torch.float32)
    torch.manual_seed(7)
    first, n1 = debias.add_noise(x0, t, SCHEDULE, backend=backend)
    second, n2 = debias.add_noise(x0, t, SCHEDULE, backend=backend)
    torch.manual_seed(7)
    again, n3 = debias.add_noise(x0, t, SCHEDULE, backend=backend)
    assert torch.equal(first, again) and torch.equal(n1.key, n3.key)
    assert not torch.equal(first, second) and not torch.equal(n1.key, n2.key)
    g = torch.Generator().manual_seed(3)
    with_gen, _ = debias.add_noise(x0, t, SCHEDULE, generator=g, backend=backend)
    g.manual_seed(3)
    assert torch.equal(with_gen, debias.add_noise(x0, t, SCHEDULE, generator=g, backend=backend)[0])


def test_stream_does_not_depend_on_threads():
    skip_unless_backend("cpu")
    threads = torch.get_num_threads()
    x0, _, pred, t = _inputs((8, 4, 32, 32), torch.float32)
    key = torch.tensor([11, 12])
    noise = PhiloxNoise(key, x0.shape, x0.dtype, x0.device, "cpu")
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            coef = SCHEDULE.noise_table(x0.dtype, x0.device)[:, t]
            x_t = debias.ops.noise_loss._add_noise_op(
                x0, coef, None, key, False, None, None, "cpu"
            )[0]
            p = pred.clone().requires_grad_(True)
            loss = debias.fused_loss(p, noise, t, SCHEDULE, backend="cpu")
            loss.backward()
            results.append((x_t, loss, p.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=False):
        assert torch.equal(a, b)


# ---- the Triton kernels -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(131, 1, 1, 37), (3, 4500)], ids=["many-samples", "many-chunks"])
def test_triton_reduction_across_programs(monkeypatch, shape):
    """The loss sums over programs: per-sample partials in order, then the batch. Small
    programs (32 elements) make both sums loop past one reduction tile (128 entries)."""
    skip_unless_backend("triton")
    skip_unless_backend("cpu")
    from debias.triton_kernels import noise_loss as kernels

    monkeypatch.setattr(kernels, "_MAX_CHUNK", 32)
    monkeypatch.setattr(kernels, "_MAX_TILE", 16)
    _x0, noise, pred, t = _inputs(shape, torch.float32)
    for reduction in ("mean", "none"):
        losses, grads = [], []
        for backend in ("triton", "cpu"):
            p = pred.clone().requires_grad_(True)
            loss = debias.fused_loss(p, noise, t, SCHEDULE, reduction=reduction, backend=backend)
            loss.backward(torch.ones_like(loss))
            losses.append(loss)
            grads.append(p.grad)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
        torch.testing.assert_close(grads[0], grads[1], rtol=2.5e-7, atol=0)


# ---- torch.compile ------------------------------------------------------------------------


def test_compile_fullgraph_training_step(backend, design):
    """A step (noising, model, fused loss) traces without a graph break; AOTAutograd compiles
    its backward, which goes through the op's registered autograd."""
    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    x0 = torch.randn(4, 3, 8, 8)
    t = torch.randint(0, 1000, (4,))
    noise = torch.randn_like(x0)

    def step(x0, t, noise):
        x_t, noise = debias.add_noise(x0, t, SCHEDULE, noise=noise, backend=backend)
        return debias.fused_loss(model(x_t), noise, t, SCHEDULE, "min_snr", backend=backend)

    eager = step(x0, t, noise)
    eager.backward()
    eager_grad = model.weight.grad.clone()
    model.weight.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(x0, t, noise)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(model.weight.grad, eager_grad)


def test_compile_fullgraph_with_philox(backend):
    model = torch.nn.Conv2d(3, 3, 1)
    x0 = torch.randn(2, 3, 4, 4)
    t = torch.randint(0, 1000, (2,))

    def step(x0, t):
        x_t, noise = debias.add_noise(x0, t, SCHEDULE, backend=backend)
        return debias.fused_loss(model(x_t), noise, t, SCHEDULE, backend=backend)

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x0, t)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.weight.grad).all()


# ---- every family through one op ----------------------------------------------------------
#
# Flow matching (SD3/Flux) and EDM against reference.py: the trainers' noising lines bit for
# bit, and a float64 oracle from the papers' closed forms (reference.coefficients and
# reference.weight), independent of the package's tables: x_t = a x0 + s eps, target
# p eps + q x0, weight in the prediction's own space.

FLOW = NoiseSchedule.flow_matching(1000, shift=3.0)
EDM = NoiseSchedule.edm(1000)
# (schedule id, prediction, weighting, options): every weighting of the family's own space and
# the epsilon-space names converted to it.
FAMILY_CASES = [
    *[("flow", "flow", w, {}) for w in ("none", "sigma_sqrt", "cosmap", "logit_normal")],
    *[("flow", "flow", w, o) for w, o in WEIGHTINGS],
    ("flow", "epsilon", "p2", {"gamma": 1.0}),
    ("flow", "sample", "min_snr", {"gamma": 5}),
    ("edm", "sample", "edm", {}),
    ("edm", "raw", "edm", {}),
    ("edm", "sample", "constant", {}),
    ("edm", "raw", "debias", {}),
]
FAMILY_SCHEDULES = {"flow": FLOW, "edm": EDM}


def _family_oracle(name, prediction, weighting, opts, sigma):
    """(a, s, p, q, w) in float64 for each sample's sigma: reference's closed forms."""
    a, s, p, q = reference.coefficients(name, sigma, prediction)
    return a, s, p, q, reference.weight(weighting, name, sigma, prediction, **opts)


def _family_inputs(schedule, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise, pred = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    index = torch.randint(0, schedule.num_timesteps, (shape[0],), generator=g)
    index[0] = 0  # the extremes of the schedule are always in the batch
    if shape[0] > 1:
        index[1] = schedule.num_timesteps - 1
    return x0, noise, pred, schedule.timesteps[index], index


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(1, 7), (3, 1, 7, 5), (2, 4, 3, 9, 11)], ids=str)
@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: "-".join(map(str, c[:3])))
def test_families_match_oracle(backend, design, case, shape, dtype):
    name, prediction, weighting, opts = case
    schedule = FAMILY_SCHEDULES[name]
    x0, noise, pred, t, index = _family_inputs(schedule, shape, dtype)
    a, s, p, q, w = _family_oracle(name, prediction, weighting, opts, schedule.sigma[index])

    x_t, _ = debias.add_noise(x0, t, schedule, noise=noise, backend=backend)
    trainers = reference.flow_noised if name == "flow" else reference.edm_noised
    assert torch.equal(x_t, trainers(x0, noise, schedule.sigmas[index]))
    expected = reference.noised(x0, noise, *(c.to(x0.dtype) for c in (a, s)))
    # the coefficients round once into the data's dtype; x_t may differ from the float64
    # coefficients' by that one rounding only
    torch.testing.assert_close(x_t, expected, **_rounding(dtype))

    pred_ours = pred.clone().requires_grad_(True)
    loss = debias.fused_loss(
        pred_ours, noise, t, schedule, weighting, prediction, x0=x0, backend=backend, **opts
    )
    loss.backward()
    pred_64 = pred.double().clone().requires_grad_(True)
    y = reference.affine_target(noise.double(), x0.double(), p, q)
    oracle = reference.weighted_mse(pred_64, y, w)
    oracle.backward()
    pred_ref = pred.clone().requires_grad_(True)  # the trainers' lines in the input precision
    y_ref = reference.affine_target(noise, x0, p.to(dtype), q.to(dtype)).to(dtype)
    base = reference.weighted_mse(pred_ref, y_ref, w.float())
    base.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_within("loss", loss, oracle, base, loss.dtype)
    _assert_within("grad", pred_ours.grad, pred_64.grad, pred_ref.grad, dtype)


def _rounding(dtype):
    tol = {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 1e-2, torch.float16: 1e-3}
    return dict(rtol=tol[dtype], atol=tol[dtype])


def test_families_gradcheck_fp64(backend, design):
    for name, prediction, weighting, _opts in (FAMILY_CASES[1], FAMILY_CASES[-3]):
        schedule = FAMILY_SCHEDULES[name]
        x0, noise, pred, t, _ = _family_inputs(schedule, (3, 2, 5), torch.float64)
        pred.requires_grad_(True)
        args = dict(x0=x0, reduction="none", backend=backend)
        torch.autograd.gradcheck(
            lambda p, rest=(noise, t, schedule, weighting, prediction), kw=args: debias.fused_loss(
                p, *rest, **kw
            ),
            (pred,),
        )


def test_families_compile_fullgraph(backend):
    model = torch.nn.Conv3d(2, 2, 1)
    x0 = torch.randn(3, 2, 3, 4, 5)  # video latents [B, C, F, H, W]
    t = FLOW.timesteps[torch.tensor([0, 500, 999])]

    def step(x0, t):
        x_t, noise = debias.add_noise(x0, t, FLOW, backend=backend)
        return debias.fused_loss(model(x_t), noise, t, FLOW, "cosmap", x0=x0, backend=backend)

    eager = step(x0, t)
    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x0, t)
    assert torch.isfinite(compiled)
    compiled.backward()
    assert torch.isfinite(model.weight.grad).all()
    assert eager.shape == compiled.shape


def test_flow_unbounded_weights_are_refused_naming_the_cap():
    """debias in epsilon space is infinite at sigma = 1 (snr = 0): an epsilon target cannot
    carry it without a cap; the flow target's limit sigma (1 - sigma) is finite."""
    _x0, noise, pred, t, index = _family_inputs(FLOW, (2, 3), torch.float32)
    with pytest.raises(ValueError, match="max_weight"):
        debias.fused_loss(pred, noise, t, FLOW, "debias", "epsilon")
    capped = debias.loss_weight(t, FLOW, "debias", "epsilon", max_weight=1e3)
    assert torch.isfinite(capped).all() and capped[0] == 1e3
    w = debias.loss_weight(t, FLOW, "debias")
    sigma = FLOW.sigma[index]
    torch.testing.assert_close(w.double(), sigma * (1 - sigma), rtol=1e-6, atol=0)


def test_flow_float_timesteps_not_in_schedule_are_refused():
    x0, noise, pred, t, _ = _family_inputs(FLOW, (2, 3), torch.float32)
    for bad in (t + 0.25, torch.tensor([float("nan"), t[1].item()])):
        with pytest.raises(ValueError, match=r"\bt\b"):
            debias.add_noise(x0, bad, FLOW)
        with pytest.raises(ValueError, match=r"\bt\b"):
            debias.fused_loss(pred, noise, bad, FLOW, "none", x0=x0)


# ---- the contract, written once -------------------------------------------------------------


def test_contract_constants_agree_across_languages():
    """csrc/noise_loss.h, the Python record and the Triton kernels state one contract."""
    import re
    from pathlib import Path

    from debias.ops import noise_loss as ops

    header = (Path(__file__).parents[1] / "csrc" / "noise_loss.h").read_text()
    consts = {k: int(v) for k, v in re.findall(r"\b(k\w+) = (\d+)", header)}
    assert (consts["kEpsTerm"], consts["kX0Term"]) == (ops.TERM_EPS, ops.TERM_X0)
    assert (consts["kRowW"], consts["kRowP"], consts["kRowQ"]) == (0, 1, 2)  # LossArgs.coef
    assert (consts["kRowA"], consts["kRowS"]) == (0, 1)  # the add_noise coef
    if "triton" in _backend.available(CPU):
        from debias.triton_kernels import noise_loss as tk

        assert (tk.TERM_EPS, tk.TERM_X0) == (ops.TERM_EPS, ops.TERM_X0)
    if "cpu" in _backend.available(CPU):
        # the C++ schema's arguments are the record's, with the key as (seed, offset) and the
        # reduction as its divisors
        cpp = [a.name for a in torch.ops.debias_C.noise_loss_fwd.default._schema.arguments]
        expand = {"key": ["seed", "offset"], "reduction": ["grad_div", "loss_div"]}
        names = ["pred"]
        for field in ops.LossArgs._fields:
            names += expand.get(field, [field])
        order = ["pred", "coef", "noise", "x0", "terms", "eps_dtype", "seed", "offset"]
        assert [n for n in cpp if n in order] == order
        assert sorted(cpp[:-1]) == sorted(names)  # need_grad is the op's own


# ---- bad input ----------------------------------------------------------------------------


def _bad_cases():
    x0, noise, pred, t = _inputs((2, 3, 4, 4), torch.float32)
    return [
        ("shape", dict(noise=noise[:1]), ValueError, "noise has shape"),
        ("t-shape", dict(t=t[:1]), ValueError, r"t must have shape \[2\]"),
        ("t-2d", dict(t=t[:, None]), ValueError, "t must have shape"),
        ("t-dtype", dict(t=t.float()), TypeError, "t must be an integer"),
        ("t-range", dict(t=torch.tensor([0, 1000])), ValueError, r"t must lie in \[0, 1000\)"),
        ("t-negative", dict(t=torch.tensor([-1, 0])), ValueError, "t must lie in"),
        ("t-list", dict(t=[0, 1]), TypeError, "t must be an integer torch.Tensor"),
        ("int-pred", dict(pred=pred.long()), TypeError, "pred must be float32"),
        ("empty-pred", dict(pred=pred[:0], noise=noise[:0], t=t[:0]), ValueError, "non-empty"),
        ("weighting", dict(weighting="snr"), ValueError, "weighting must be one of"),
        ("prediction", dict(prediction="x0"), ValueError, "prediction must be one of"),
        ("no-x0", dict(prediction="v_prediction"), ValueError, "x0 is required"),
        ("x0-shape", dict(prediction="sample", x0=x0[:1]), ValueError, "x0 has shape"),
        ("x0-dtype", dict(prediction="sample", x0=x0.double()), TypeError, "x0 must have"),
        ("reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
        ("noise-grad", dict(noise=noise.requires_grad_()), ValueError, "noise requires grad"),
        ("option", dict(cap=3), TypeError, "unknown option"),
        ("backend", dict(backend="metal"), ValueError, "backend must be one of"),
        ("gpu-backend", dict(backend="cuda"), ValueError, "cannot run on cpu"),
        ("meta-pred", dict(pred=pred.to("meta")), ValueError, "same device"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_fused_loss_rejects_bad_input(case):
    _, kwargs, err, match = case
    _x0, noise, pred, t = _inputs((2, 3, 4, 4), torch.float32)
    args = dict(pred=pred, noise=noise, t=t, schedule=SCHEDULE)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        debias.fused_loss(**args)


def test_zero_terminal_snr_debias_is_refused_without_cap():
    s = SCHEDULE.rescale_zero_terminal_snr()
    _x0, noise, pred, t = _inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="max_weight"):
        debias.fused_loss(pred, noise, t, s, "debias")
    loss = debias.fused_loss(pred, noise, t, s, "debias", max_weight=1e3)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(x0=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "x0 must be float32"),
        (dict(noise=torch.zeros(2, 4)), ValueError, "noise has shape"),
        (dict(noise=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "noise must have x0's"),
        (dict(generator=torch.Generator(), noise=torch.zeros(2, 3)), ValueError, "generator"),
        (dict(generator=3), TypeError, "generator must be a torch.Generator"),
        (dict(t=torch.tensor([0, 5000])), ValueError, "t must lie in"),
        (dict(schedule="linear"), ValueError, "schedule must be"),
    ],
)
def test_add_noise_rejects_bad_input(kwargs, err, match):
    args = dict(x0=torch.zeros(2, 3), t=torch.tensor([0, 1]), schedule=SCHEDULE)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        debias.add_noise(**args)


def test_backend_environment_variable(monkeypatch):
    _, noise, pred, t = _inputs((2, 3, 4, 4), torch.float32)
    monkeypatch.setenv("DEBIAS_BACKEND", "torch")
    assert _backend.resolve(None, CPU) == "torch"
    fastest = _backend.available(CPU)[0]
    assert _backend.resolve(fastest, CPU) == fastest  # the argument wins over the variable
    monkeypatch.setenv("DEBIAS_BACKEND", "tpu")
    with pytest.raises(ValueError, match="DEBIAS_BACKEND must be one of"):
        debias.fused_loss(pred, noise, t, SCHEDULE)


def test_non_contiguous_inputs(backend):
    """channels_last outputs and sliced inputs give the contiguous answer."""
    x0, noise, pred, t = _inputs((3, 4, 6, 5), torch.float32)
    p_cl = pred.to(memory_format=torch.channels_last).requires_grad_(True)
    p = pred.clone().requires_grad_(True)
    wide = torch.cat((noise, noise), dim=3)[..., :5]  # a strided view
    a = debias.fused_loss(p_cl, wide, t, SCHEDULE, backend=backend)
    b = debias.fused_loss(p, noise, t, SCHEDULE, backend=backend)
    (a + b).backward()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(p_cl.grad, p.grad, rtol=0, atol=0)
    x_t, _ = debias.add_noise(
        x0.to(memory_format=torch.channels_last), t, SCHEDULE, noise=wide, backend=backend
    )
    assert torch.equal(x_t, debias.add_noise(x0, t, SCHEDULE, noise=noise, backend=backend)[0])


def test_runs_without_compiled_kernels():
    """Built with DEBIAS_NO_EXTENSIONS=1 (no debias._C): every op works on the torch backend
    and says so once."""
    code = """
import sys, warnings
sys.modules["debias._C"] = None  # what an install without the extension looks like
import torch, debias
s = debias.NoiseSchedule.linear()
x0 = torch.randn(2, 3, 4, 4); t = torch.tensor([0, 999])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        x_t, noise = debias.add_noise(x0, t, s)
        pred = torch.randn_like(x0, requires_grad=True)
        debias.fused_loss(pred, noise, t, s).backward()
assert noise.backend == "torch", noise.backend
assert torch.isfinite(pred.grad).all()
messages = [str(w.message) for w in caught if "debias._C" in str(w.message)]
assert len(messages) == 1, messages
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_compiled_kernels_are_built_in_ci():
    """CI must exercise the C++ kernels and the Triton ones (in the interpreter), not skip
    them or silently fall back to the torch backend."""
    if os.environ.get("CI") != "true":
        pytest.skip("only enforced in CI")
    assert "cpu" in _backend.available(torch.device("cpu"))
    assert "triton" in _backend.available(torch.device("cpu"))


# ---- on a GPU -----------------------------------------------------------------------------
#
# The contracts above on CUDA tensors, for every GPU backend in both gradient designs
# (debias.ops.noise_loss.GRAD_IN_FORWARD: True keeps the gradient computed in forward, False
# recomputes it in backward from the regenerated noise). Skipped without a GPU. Each
# parametrization draws its own inputs, and outputs land in NaN-poisoned memory.

CUDA = torch.device("cuda")
GPU_BACKENDS = ("triton", "cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request) -> str:
    skip_unless_backend(request.param, CUDA)
    return request.param


@pytest.fixture(params=[True, False], ids=["kept", "recomputed"])
def gpu_design(request, gpu_backend, monkeypatch) -> bool:
    """GRAD_IN_FORWARD[gpu_backend] for this test only."""
    monkeypatch.setitem(debias.ops.noise_loss.GRAD_IN_FORWARD, gpu_backend, request.param)
    return request.param


@pytest.fixture
def gpu_seed(request) -> int:
    """A seed of its own for every parametrization, the same from run to run."""
    import zlib

    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def poisoned():
    """Every tensor torch allocates without initialising it (torch.empty, in Python or C++)
    holds NaN during the test (integers: their maximum), so an output element that a kernel
    never writes fails the finiteness checks. torch does this only in deterministic mode;
    warn_only keeps ops without a deterministic kernel running."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _poison_cache(*nbytes: int, copies: int = 3) -> None:
    """Leave NaN bytes (0xFF: NaN in every float type, -1 in every integer type) in the
    blocks the CUDA caching allocator hands out next for these sizes, which also covers
    memory taken from the allocator without torch.empty's fill."""
    blocks = [
        torch.full((n,), 0xFF, dtype=torch.uint8, device=CUDA)
        for n in nbytes
        for _ in range(copies)
    ]
    del blocks


def _cuda_inputs(shape, dtype, seed):
    return tuple(x.to(CUDA) for x in _inputs(shape, dtype, seed))


def _oracle(x0, eps, t, prediction):
    """x_t and the training target in float64, from the coefficients the op is defined with:
    sqrt(abar) and sqrt(1 - abar) as diffusers computes them for x0's dtype (the float32
    table cast to it, the roots taken in it). Their rounding (2^-9 in bfloat16) is part of the
    definition, so the float64 oracle measures the kernels' arithmetic alone."""
    abar = _abar(x0.dtype).to(x0.dtype).to(x0.device)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = (abar**0.5).double()[t].view(shape)
    s = ((1 - abar) ** 0.5).double()[t].view(shape)
    x0, eps = x0.double(), eps.double()
    target = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction]
    return a * x0 + s * eps, target


def _assert_finite(**tensors: torch.Tensor) -> None:
    for name, x in tensors.items():
        bad = (~torch.isfinite(x)).sum().item()
        assert bad == 0, f"{name}: {bad} of {x.numel()} elements are not finite (never written?)"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_gpu_philox_stream_matches_cpu(dtype):
    """add_noise(noise=None) draws the same stream on the CPU and on each GPU backend for the
    same key: a few float32 ulp apart (log, sin and cos round differently), in bfloat16 at most
    one rounding step apart; and all of them match reference.philox_normal."""
    backends = [b for b in GPU_BACKENDS if b in _backend.available(CUDA)]
    if not backends:
        pytest.skip(f"no GPU backend is built here (available: {_backend.available(CUDA)})")
    shape = (3, 5, 67, 129)  # 129645 normals: odd, many Philox groups and kernel blocks

    def stream(backend, device):
        x0 = torch.randn(shape, device=device).to(dtype)
        t = torch.randint(0, 1000, (shape[0],), device=device)
        gen = torch.Generator().manual_seed(1234)
        _, noise = debias.add_noise(x0, t, SCHEDULE, generator=gen, backend=backend)
        eps = noise.materialize()
        assert eps.shape == shape and eps.dtype == dtype and eps.device.type == device.type
        return noise.key, eps.cpu().float()

    key, cpu = stream(_backend.available(CPU)[0], CPU)
    seed, offset = key.tolist()
    spec = reference.philox_normal(seed, offset, cpu.numel()).view(shape).to(dtype).float()
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    for backend in backends:
        gpu_key, gpu = stream(backend, CUDA)
        assert torch.equal(gpu_key, key)
        torch.testing.assert_close(gpu, cpu, **tol, msg=lambda m, b=backend: f"{b} vs cpu: {m}")
        torch.testing.assert_close(gpu, spec, **tol, msg=lambda m, b=backend: f"{b} vs spec: {m}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_add_noise_equals_diffusers_bitwise(gpu_backend, shape, dtype, gpu_seed, poisoned):
    """With the noise given, x_t is diffusers' add_noise in x0's dtype, bit for bit (as the
    docstring promises), on the GPU too."""
    x0, noise, _, t = _cuda_inputs(shape, dtype, gpu_seed)
    _poison_cache(x0.numel() * x0.element_size())
    x_t, returned = debias.add_noise(x0, t, SCHEDULE, noise=noise, backend=gpu_backend)
    assert returned is noise
    _assert_finite(x_t=x_t)
    want = reference.add_noise(x0, t, _abar(dtype), noise)
    assert torch.equal(x_t, want), f"max abs err {_max_err(x_t, want):.3g}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting, opts", WEIGHTINGS, ids=[w for w, _ in WEIGHTINGS])
def test_gpu_matches_fp64_reference(
    gpu_backend, gpu_design, weighting, opts, prediction, shape, dtype, gpu_seed, poisoned
):
    """Philox noise drawn in the kernel, then x_t, the loss and pred.grad against
    debias.reference on float64 copies (noise: PhiloxNoise.materialize()), with the error
    allowance of _assert_within; every output element written."""
    x0, _, pred, t = _cuda_inputs(shape, dtype, gpu_seed)
    nbytes = x0.numel() * x0.element_size()
    w64 = debias.weight_table(SCHEDULE, weighting, prediction, **opts)

    _poison_cache(nbytes)
    gen = torch.Generator().manual_seed(gpu_seed)
    x_t, noise = debias.add_noise(x0, t, SCHEDULE, generator=gen, backend=gpu_backend)
    p = pred.clone().requires_grad_(True)
    _poison_cache(nbytes, 4 * shape[0])
    loss = debias.fused_loss(
        p, noise, t, SCHEDULE, weighting, prediction, x0=x0, backend=gpu_backend, **opts
    )
    _poison_cache(nbytes)
    loss.backward()
    _poison_cache(nbytes)
    eps = noise.materialize()
    _assert_finite(x_t=x_t, loss=loss, grad=p.grad, noise=eps)

    # the reference in the input precision, as users run it (the baseline) ...
    x_t_base = reference.add_noise(x0, t, _abar(dtype), eps)
    pred_ref = pred.clone().requires_grad_(True)
    base = reference.noise_loss(pred_ref, eps, t, w64.float(), x0, _abar(dtype), prediction)
    base.backward()
    # ... and in float64 on the same (rounded) inputs: the oracle. w64 is the table of
    # `prediction`'s space, so the float64 target goes in as an epsilon-space "noise".
    x_t_oracle, target = _oracle(x0, eps, t, prediction)
    pred_64 = pred.double().requires_grad_(True)
    oracle = reference.noise_loss(pred_64, target, t, w64)
    oracle.backward()

    assert x_t.dtype == dtype and loss.dtype == torch.float32 and loss.shape == ()
    assert p.grad.dtype == dtype
    _assert_within("x_t", x_t, x_t_oracle, x_t_base, dtype)
    _assert_within("loss", loss, oracle, base, torch.float32)
    _assert_within("grad", p.grad, pred_64.grad, pred_ref.grad, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_upstream_gradient(gpu_backend, gpu_design, reduction, gpu_seed):
    """A random upstream gradient on the device (per sample for "none", a loss scale
    otherwise) reaches pred.grad without a host round trip; a second backward accumulates, a
    scaled loss scales."""
    torch.manual_seed(gpu_seed)
    x0, _, pred, t = _cuda_inputs((5, 3, 9, 7), torch.float32, gpu_seed)
    gen = torch.Generator().manual_seed(gpu_seed)
    _, noise = debias.add_noise(x0, t, SCHEDULE, generator=gen, backend=gpu_backend)
    eps = noise.materialize()
    w = debias.weight_table(SCHEDULE, "debias").float()
    p, q = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    loss = debias.fused_loss(p, noise, t, SCHEDULE, reduction=reduction, backend=gpu_backend)
    ref = reference.noise_loss(q, eps, t, w, reduction=reduction)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)

    grad_out = torch.rand(loss.shape, device=CUDA) + 0.5
    loss.backward(grad_out, retain_graph=True)
    ref.backward(grad_out)
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    once = p.grad.clone()
    loss.backward(grad_out)
    torch.testing.assert_close(p.grad, 2 * once, rtol=1e-6, atol=1e-12)
    p.grad = None
    loss = debias.fused_loss(p, noise, t, SCHEDULE, reduction=reduction, backend=gpu_backend)
    (3 * loss).backward(grad_out)
    torch.testing.assert_close(p.grad, 3 * once, rtol=1e-6, atol=1e-12)


@pytest.mark.gpu
@needs_cuda
def test_gpu_compile_fullgraph(gpu_backend, gpu_design, monkeypatch):
    """A CUDA step (noising, model, fused loss) compiles with Inductor without a graph break
    and gives eager's loss and gradients; the Philox path traces too."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # both runs in fp32
    model = torch.nn.Conv2d(3, 3, 3, padding=1).to(CUDA)
    x0 = torch.randn(4, 3, 8, 8, device=CUDA)
    t = torch.randint(0, 1000, (4,), device=CUDA)
    noise = torch.randn_like(x0)

    def step(x0, t, noise):
        x_t, noise = debias.add_noise(x0, t, SCHEDULE, noise=noise, backend=gpu_backend)
        return debias.fused_loss(model(x_t), noise, t, SCHEDULE, "min_snr", backend=gpu_backend)

    eager = step(x0, t, noise)
    eager.backward()
    eager_grad = model.weight.grad.clone()
    model.weight.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(x0, t, noise)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.weight.grad, eager_grad, rtol=1e-4, atol=1e-6)

    def philox_step(x0, t):
        x_t, noise = debias.add_noise(x0, t, SCHEDULE, backend=gpu_backend)
        return debias.fused_loss(model(x_t), noise, t, SCHEDULE, backend=gpu_backend)

    model.weight.grad = None
    torch._dynamo.reset()
    loss = torch.compile(philox_step, fullgraph=True, backend="aot_eager")(x0, t)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.weight.grad).all()


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_gpu_beyond_2_31_elements(gpu_backend, gpu_design, poisoned):
    """More than 2^31 elements, so every flat index needs 64 bits: 32768 samples of 65539
    bfloat16 values, sample 32766 straddling element 2^31 and sample 32767 wholly past it.
    x_t, the per-sample losses and pred.grad of those two samples are checked against the
    reference run on them alone, with their noise from reference.philox_normal(start=...)
    (element i of the stream depends only on the key and i)."""
    B, D, dtype = 32768, 65539, torch.bfloat16
    numel = B * D
    assert (B - 2) * D < 2**31 < (B - 1) * D
    # x0, pred, x_t, the kept gradient, pred.grad, one bool mask, and room to spare
    need = 7 * numel * 2
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(CUDA)
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} free")
    gen = torch.Generator(device=CUDA).manual_seed(0)
    x0 = torch.randn(B, D, device=CUDA, generator=gen, dtype=dtype)
    pred = torch.randn(B, D, device=CUDA, generator=gen, dtype=dtype).requires_grad_(True)
    t = torch.randint(0, 1000, (B,), device=CUDA, generator=gen)
    t[-2:] = torch.tensor([0, 999], device=CUDA)
    grad_out = torch.rand(B, device=CUDA, generator=gen) + 0.5
    prediction, w64 = "v_prediction", debias.weight_table(SCHEDULE, "debias", "v_prediction")

    key_gen = torch.Generator().manual_seed(7)
    x_t, noise = debias.add_noise(x0, t, SCHEDULE, generator=key_gen, backend=gpu_backend)
    loss = debias.fused_loss(
        pred,
        noise,
        t,
        SCHEDULE,
        "debias",
        prediction,
        x0=x0,
        reduction="none",
        backend=gpu_backend,
    )
    loss.backward(grad_out)
    _assert_finite(x_t=x_t, loss=loss, grad=pred.grad)

    rows = slice(B - 2, B)
    seed, offset = noise.key.tolist()
    eps = reference.philox_normal(seed, offset, 2 * D, CUDA, start=(B - 2) * D)
    eps = eps.view(2, D).to(dtype)
    x0_s, t_s, go_s = x0[rows], t[rows], grad_out[rows]
    x_t_base = reference.add_noise(x0_s, t_s, _abar(dtype), eps)
    x_t_oracle, target = _oracle(x0_s, eps, t_s, prediction)
    _assert_within("x_t", x_t[rows], x_t_oracle, x_t_base, dtype)

    p_ref = pred.detach()[rows].clone().requires_grad_(True)
    base = reference.noise_loss(
        p_ref, eps, t_s, w64.float(), x0_s, _abar(dtype), prediction, "none"
    )
    base.backward(go_s)
    p_64 = pred.detach()[rows].double().requires_grad_(True)
    oracle = reference.noise_loss(p_64, target, t_s, w64, reduction="none")
    oracle.backward(go_s.double())
    _assert_within("loss", loss.detach()[rows], oracle, base, torch.float32)
    _assert_within("grad", pred.grad[rows], p_64.grad, p_ref.grad, dtype)


def test_learned_variance_mean_channels_read_in_place(backend, design):
    """fused_loss on model_output[:, :C] of a 2C-channel (learned-variance) output: the same
    loss and gradient as on a contiguous copy; the gradient lands in the mean channels only."""
    x0, noise, _, t = _inputs((3, 4, 6, 5), torch.float32)
    out = torch.randn(3, 8, 6, 5, requires_grad=True)
    copy = out.detach()[:, :4].clone().requires_grad_(True)
    a = debias.fused_loss(
        out[:, :4], noise, t, SCHEDULE, "debias", "v_prediction", x0=x0, backend=backend
    )
    b = debias.fused_loss(
        copy, noise, t, SCHEDULE, "debias", "v_prediction", x0=x0, backend=backend
    )
    (a + b).backward()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(out.grad[:, :4], copy.grad, rtol=0, atol=0)
    assert not out.grad[:, 4:].any()


def test_timesteps_looked_up_once_per_step_and_again_when_changed(backend):
    """fused_loss reuses add_noise's lookup of the same t, and only while t is unchanged."""
    x0, noise, pred, t, index = _family_inputs(FLOW, (3, 5), torch.float32)
    debias.add_noise(x0, t, FLOW, noise=noise, backend=backend)
    first = debias.fused_loss(pred, noise, t, FLOW, "cosmap", x0=x0, backend=backend)
    t[:] = FLOW.timesteps[index.flip(0)]  # in place: a new version of the same tensor
    changed = debias.fused_loss(pred, noise, t, FLOW, "cosmap", x0=x0, backend=backend)
    fresh = debias.fused_loss(pred, noise, t.clone(), FLOW, "cosmap", x0=x0, backend=backend)
    torch.testing.assert_close(changed, fresh, rtol=0, atol=0)
    assert not torch.equal(first, changed)
    t[0] = 0.5  # not a timestep of the schedule: refused although t was seen before
    with pytest.raises(ValueError, match=r"\bt\b"):
        debias.fused_loss(pred, noise, t, FLOW, "cosmap", x0=x0, backend=backend)


def test_timestep_lookup_cache_writes_nothing_on_the_schedule_and_keeps_nothing_alive():
    """The one-entry lookup cache lives in the op module: the schedule's attributes are the
    same after a step, a hit needs the batch t was checked against, and neither t nor the
    schedule is kept alive by it."""
    import gc
    import weakref

    schedule = NoiseSchedule.flow_matching(1000)
    x0, noise, pred, t, _ = _family_inputs(schedule, (3, 5), torch.float32)
    before = set(vars(schedule))
    debias.add_noise(x0, t, schedule, noise=noise)
    debias.fused_loss(pred, noise, t, schedule, "cosmap", x0=x0)
    assert set(vars(schedule)) == before
    # the entry holds t as checked against a batch of 3: another batch checks it again
    with pytest.raises(ValueError, match=r"t must have shape \[2\]"):
        debias.fused_loss(pred[:2], noise[:2], t, schedule, "cosmap", x0=x0[:2])
    t_ref, schedule_ref = weakref.ref(t), weakref.ref(schedule)
    del t, schedule
    gc.collect()
    assert t_ref() is None and schedule_ref() is None
