"""Continuous time (schedule "flow" / "edm", t the per-sample sigma), the sigma draws of the
trainers that use it, sample_weight, and the op's own contract (affine_noise, affine_loss),
against the trainers' lines on every backend that runs here."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import skip_unless_backend
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

import debias
from debias import NoiseSchedule, PhiloxNoise, reference
from debias.weighting import FAMILY_WEIGHTINGS

# B = 1, 3, 7 with an odd D; the last shape is small for Triton's interpreter.
SHAPES = [(1, 1, 5, 3), (3, 3, 7, 5), (7, 2, 9, 11)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
RTOL = 1e-5


def _data(shape, dtype=torch.float32, seed=0, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    pred = torch.randn(shape, generator=g).to(dtype)
    sigma = low + (high - low) * torch.rand(shape[0], generator=g)
    return x0, noise, pred, sigma


def _close(name, got, want, rtol=RTOL):
    scale = want.double().abs().max().item() + 1e-30
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} at scale {scale:.3g}"


def _view(x, like):
    return x.view((-1,) + (1,) * (like.dim() - 1))


# ---- draws: the trainers' lines -------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_flow_draws_equal_diffusers_density(scheme):
    """diffusers' training_utils.compute_density_for_timestep_sampling, called as is."""
    kwargs = {"logit_mean": 0.3, "logit_std": 1.2, "mode_scale": 1.1}
    torch.manual_seed(7)
    want = compute_density_for_timestep_sampling(scheme, 33, **kwargs)
    torch.manual_seed(7)
    got = debias.sample_timesteps(33, "flow", scheme, **kwargs)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = compute_density_for_timestep_sampling(scheme, 5, **kwargs, generator=g1)
    assert torch.equal(debias.sample_timesteps(5, "flow", scheme, **kwargs, generator=g2), want)


def _sd_scripts_sigmas(scheme, bsz, h, w, sigmoid_scale=1.0, shift=3.0, device="cpu"):
    """kohya-ss/sd-scripts, library/flux_train_utils.py, get_noisy_model_input_and_timesteps
    (with time_shift and get_lin_function of the same file), the sigma lines restated as
    written there (``args.discrete_flow_shift`` is ``shift``; h, w of the latents)."""

    def time_shift(mu, sigma, t):
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)

    def get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15):
        m = (y2 - y1) / (x2 - x1)
        b = y1 - m * x1
        return lambda x: m * x + b

    if scheme == "uniform" or scheme == "sigmoid":
        if scheme == "sigmoid":
            sigmas = torch.sigmoid(sigmoid_scale * torch.randn((bsz,), device=device))
        else:
            sigmas = torch.rand((bsz,), device=device)
    elif scheme == "shift":
        sigmas = torch.randn(bsz, device=device)
        sigmas = sigmas * sigmoid_scale
        sigmas = sigmas.sigmoid()
        sigmas = (sigmas * shift) / (1 + (shift - 1) * sigmas)
    else:
        sigmas = torch.randn(bsz, device=device)
        sigmas = sigmas * sigmoid_scale
        sigmas = sigmas.sigmoid()
        mu = get_lin_function(y1=0.5, y2=1.15)((h // 2) * (w // 2))
        sigmas = time_shift(mu, 1.0, sigmas)
    return sigmas


@pytest.mark.parametrize(
    "scheme, kwargs, hw",
    [
        ("uniform", {}, (64, 64)),
        ("sigmoid", {"sigmoid_scale": 1.0}, (64, 64)),
        ("sigmoid", {"sigmoid_scale": 2.5}, (64, 64)),
        ("shift", {"shift": 3.0, "sigmoid_scale": 1.0}, (64, 64)),
        ("shift", {"shift": 1.7, "sigmoid_scale": 0.8}, (64, 64)),
        ("flux_shift", {"sigmoid_scale": 1.0}, (128, 128)),
        ("flux_shift", {"sigmoid_scale": 1.3}, (64, 96)),
        ("flux_shift", {"sigmoid_scale": 1.0}, (17, 33)),
    ],
)
def test_flow_draws_equal_sd_scripts(scheme, kwargs, hw):
    h, w = hw
    torch.manual_seed(11)
    want = _sd_scripts_sigmas(scheme, 9, h, w, **kwargs)
    torch.manual_seed(11)
    seq = {"seq_len": (h // 2) * (w // 2)} if scheme == "flux_shift" else {}
    got = debias.sample_timesteps(9, "flow", scheme, **kwargs, **seq)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert ((got >= 0) & (got <= 1)).all()
    # a CPU generator seeded alike draws the same numbers
    torch.manual_seed(5)
    want = _sd_scripts_sigmas(scheme, 9, h, w, **kwargs)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(
        debias.sample_timesteps(9, "flow", scheme, **kwargs, **seq, generator=g), want
    )


def test_edm_lognormal_draws_equal_the_paper():
    """Karras et al. 2022, training/loss.py EDMLoss: rnd_normal * P_std + P_mean, exp."""
    torch.manual_seed(2)
    want = (torch.randn(6) * 1.2 + -1.2).exp()
    torch.manual_seed(2)
    assert torch.equal(debias.sample_timesteps(6, "edm", "lognormal"), want)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"scheme": "cosmap"}, ValueError, "scheme"),
        ({"scheme": "flux_shift"}, ValueError, "seq_len"),
        ({"scheme": "shift", "seq_len": 1024}, ValueError, "seq_len"),
        ({"scheme": "flux_shift", "seq_len": 0}, ValueError, "seq_len"),
        ({"scheme": "shift", "shift": -1.0}, ValueError, "shift"),
        ({"scheme": "sigmoid", "sigmoid_scale": math.nan}, ValueError, "sigmoid_scale"),
        ({"scheme": "mode", "mode_scale": 3.0}, ValueError, "mode_scale"),
        ({"scheme": 3}, TypeError, "scheme"),
    ],
)
def test_flow_draws_refuse_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        debias.sample_timesteps(4, "flow", **kwargs)
    with pytest.raises(ValueError, match="schedule"):
        debias.sample_timesteps(4, "ddpm")


# ---- noising ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_flow_add_noise_equals_the_trainers_line_bitwise(backend, shape):
    """``(1.0 - sigmas) * latents + sigmas * noise`` (sd-scripts' flux lines; diffusers'
    flux2 / qwen_image / z_image scripts) with sigmas drawn continuously, fp32."""
    x0, noise, _, sigma = _data(shape)
    sigma[0] = 1.0
    if shape[0] > 1:
        sigma[1] = 0.0
    want = (1.0 - _view(sigma, x0)) * x0 + _view(sigma, x0) * noise
    x_t, kept = debias.add_noise(x0, sigma, "flow", noise=noise, backend=backend)
    assert kept is noise and torch.equal(x_t, want)
    edm = reference.edm_noised(x0, noise, sigma + 0.1)
    assert torch.equal(
        debias.add_noise(x0, sigma + 0.1, "edm", noise=noise, backend=backend)[0], edm
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flow_add_noise_low_precision_within_one_step(backend, dtype):
    """sd-scripts computes x_t in float32 (float32 sigmas promote the latents) and rounds it to
    the latents' dtype; debias rounds sigma to the data's dtype first, as diffusers does for
    its tables: the two stay within one step of the data's dtype at the inputs' scale (a
    step of sigma moves x_t by up to a step of |x0| + |noise|)."""
    x0, noise, _, sigma = _data((5, 3, 7, 9), dtype)
    want = ((1.0 - _view(sigma, x0)) * x0 + _view(sigma, x0) * noise).to(dtype)
    x_t, _ = debias.add_noise(x0, sigma, "flow", noise=noise, backend=backend)
    assert x_t.dtype == dtype
    step = torch.finfo(dtype).eps * (x0.float().abs() + noise.float().abs())
    assert ((x_t.float() - want.float()).abs() <= step).all()


def test_continuous_equals_the_table_path_on_its_sigmas(backend):
    """The table path is the same per-sample functions on the table's sigmas: a flow or EDM
    schedule's timesteps and the continuous family on their sigmas give the same bits."""
    for schedule, family in (
        (NoiseSchedule.flow_matching(1000, shift=3.0), "flow"),
        (NoiseSchedule.edm(1000, sigma_data=0.5), "edm"),
    ):
        x0, noise, pred, _ = _data((7, 3, 5, 5), seed=3)
        idx = torch.tensor([0, 999, 1, 500, 250, 998, 3])
        t, sigma = schedule.timesteps[idx], schedule.sigmas[idx]
        x_a, _ = debias.add_noise(x0, t, schedule, noise=noise, backend=backend)
        x_b, _ = debias.add_noise(x0, sigma, family, noise=noise, backend=backend)
        assert torch.equal(x_a, x_b)
        for weighting in FAMILY_WEIGHTINGS[family]:
            for prediction in debias.schedules.FAMILY_PREDICTIONS[family]:
                opts = {"max_weight": 1e3} if weighting in ("debias", "sigma_sqrt") else {}
                args = (pred, noise)
                kw = {"x0": x0, "reduction": "none", "backend": backend, **opts}
                try:
                    a = debias.fused_loss(*args, t, schedule, weighting, prediction, **kw)
                except ValueError:
                    with pytest.raises(ValueError):
                        debias.fused_loss(*args, sigma, family, weighting, prediction, **kw)
                    continue
                b = debias.fused_loss(*args, sigma, family, weighting, prediction, **kw)
                assert torch.equal(a, b), (family, weighting, prediction)
                wa = debias.loss_weight(t, schedule, weighting, prediction, **opts)
                wb = debias.loss_weight(sigma, family, weighting, prediction, **opts)
                assert torch.equal(wa, wb), (family, weighting, prediction)


# ---- the loss: diffusers' SD3 / Flux DreamBooth lines with continuous sigmas -----------------


def _sd3_loss(pred, x0, noise, sigma, scheme, sample_weight=None):
    """train_dreambooth_lora_{sd3,flux}.py: weighting = compute_loss_weighting_for_sd3(
    weighting_scheme, sigmas); target = noise - model_input; loss = mean((weighting.float() *
    (model_pred.float() - target.float()) ** 2).reshape(B, -1), 1); loss.mean()."""
    sigmas = _view(sigma, pred)
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
    target = noise - x0
    loss = torch.mean(
        (weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1),
        1,
    )
    if sample_weight is not None:
        loss = loss * sample_weight
    return loss.mean()


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap", "logit_normal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_flow_loss_and_gradient_equal_the_dreambooth_lines(backend, scheme, shape):
    x0, noise, pred, sigma = _data(shape, low=0.02, high=0.999)
    pred_ref = pred.clone().requires_grad_()
    want = _sd3_loss(pred_ref, x0, noise, sigma, scheme)
    want.backward()
    pred.requires_grad_()
    got = debias.fused_loss(pred, noise, sigma, "flow", scheme, x0=x0, backend=backend)
    got.backward()
    _close("loss", got, want)
    _close("grad", pred.grad, pred_ref.grad)


@pytest.mark.parametrize("weighting", FAMILY_WEIGHTINGS["flow"])
@pytest.mark.parametrize("prediction", ["flow", "epsilon", "v_prediction", "sample"])
def test_flow_weights_equal_the_oracle(weighting, prediction):
    """Every weighting valid on flow, converted to each target, against reference.weight
    (debias -> sigma (1 - sigma) on the flow target)."""
    sigma = torch.linspace(0.01, 0.99, 13)
    want = reference.weight(weighting, "flow", sigma, prediction)
    got = debias.loss_weight(sigma, "flow", weighting, prediction)
    assert got.dtype == torch.float32
    _close(weighting, got, want)
    if weighting == "debias" and prediction == "flow":
        _close("sigma(1-sigma)", got, sigma.double() * (1 - sigma.double()))


@pytest.mark.parametrize("weighting", FAMILY_WEIGHTINGS["edm"])
@pytest.mark.parametrize("prediction", ["raw", "sample", "epsilon", "v_prediction"])
def test_edm_weights_equal_the_oracle(weighting, prediction):
    sigma = torch.logspace(-2, 1.5, 11)
    want = reference.weight(weighting, "edm", sigma, prediction, sigma_data=0.3)
    got = debias.loss_weight(sigma, "edm", weighting, prediction, sigma_data=0.3)
    _close(weighting, got, want)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_edm_raw_loss_equals_edm_loss(backend, shape):
    """EDMLoss on the raw output F (reference.edm_loss) with sigma_data 0.3 and lambda(sigma)."""
    x0, noise, pred, sigma = _data(shape, low=0.05, high=5.0)
    pred_ref = pred.clone().requires_grad_()
    want = reference.edm_loss(pred_ref, x0, noise, sigma, sigma_data=0.3)
    want.backward()
    pred.requires_grad_()
    got = debias.fused_loss(
        pred, noise, sigma, "edm", "edm", x0=x0, backend=backend, sigma_data=0.3
    )
    got.backward()
    _close("loss", got, want)
    _close("grad", pred.grad, pred_ref.grad)


def test_philox_noise_flows_from_add_noise_to_the_loss(backend):
    x0, _, pred, sigma = _data((3, 3, 7, 5))
    torch.manual_seed(4)
    x_t, noise = debias.add_noise(x0, sigma, "flow", backend=backend)
    assert isinstance(noise, PhiloxNoise)
    eps = noise.materialize()
    _close("x_t", x_t, reference.flow_noised(x0, eps, sigma), 1e-6)
    got = debias.fused_loss(pred, noise, sigma, "flow", "cosmap", x0=x0, backend=backend)
    _close("loss", got, _sd3_loss(pred, x0, eps, sigma, "cosmap"))


def test_bf16_loss_matches_the_lines_in_float32(backend):
    """bf16 data: the lines on the same values in float32 to 1e-5; the lines as written (their
    target noise - x0 rounds to bf16) are farther from that than the fused loss is."""
    x0, noise, pred, sigma = _data((3, 4, 5, 7), torch.bfloat16, low=0.05, high=0.95)
    got = debias.fused_loss(pred, noise, sigma, "flow", "cosmap", x0=x0, backend=backend)
    exact = _sd3_loss(pred.float(), x0.float(), noise.float(), sigma, "cosmap")
    _close("loss", got, exact, 1e-5)
    as_written = _sd3_loss(pred, x0, noise, sigma, "cosmap")
    assert (got - exact).abs() <= (as_written - exact).abs() + 1e-5 * exact


# ---- edges: sigma at 0 and 1, nothing silently NaN --------------------------------------------


@pytest.mark.parametrize("prediction", ["flow", "epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("weighting", FAMILY_WEIGHTINGS["flow"])
def test_flow_ends_are_finite_or_refused_naming_the_cap(weighting, prediction):
    """sigma = 0 (no noise) and 1 (pure noise): the table path's rules for unbounded weights,
    a finite weight or a ValueError, never inf or NaN."""
    sigma = torch.tensor([0.0, 1.0, 0.5])
    try:
        w = debias.loss_weight(sigma, "flow", weighting, prediction)
    except ValueError as e:
        assert "max_weight" in str(e) or "prediction" in str(e)
        return
    assert torch.isfinite(w).all() and (w >= 0).all()


def test_flow_ends_debias_is_zero_and_sigma_sqrt_needs_a_cap():
    sigma = torch.tensor([0.0, 1.0, 0.25])
    w = debias.loss_weight(sigma, "flow", "debias")
    assert w.tolist() == [0.0, 0.0, 0.1875]
    with pytest.raises(ValueError, match=r"max_weight.*"):
        debias.loss_weight(sigma, "flow", "sigma_sqrt")
    capped = debias.loss_weight(sigma, "flow", "sigma_sqrt", max_weight=100.0)
    assert capped.tolist() == [100.0, 1.0, 16.0]


# ---- sample_weight ----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sample_weight_multiplies_each_sample(backend, reduction):
    """sd-scripts' ``loss = loss * loss_weights`` after the per-sample mean."""
    x0, noise, pred, sigma = _data((7, 3, 5, 3), low=0.05, high=0.95)
    sw = torch.rand(7, generator=torch.Generator().manual_seed(9)) + 0.5
    pred_ref = pred.clone().requires_grad_()
    per_sample = reference.flow_loss(
        pred_ref, noise - x0, compute_loss_weighting_for_sd3("cosmap", sigma), "none"
    )
    want = per_sample * sw
    want = {"mean": want.mean(), "sum": want.sum(), "none": want}[reduction]
    want.sum().backward()
    pred.requires_grad_()
    got = debias.fused_loss(
        pred, noise, sigma, "flow", "cosmap", x0=x0, reduction=reduction,
        sample_weight=sw, backend=backend,
    )  # fmt: skip
    got.sum().backward()
    _close("loss", got, want)
    _close("grad", pred.grad, pred_ref.grad)
    # the table path takes it as well
    schedule = NoiseSchedule.linear(1000)
    t = torch.randint(0, 1000, (7,))
    plain = debias.fused_loss(pred, noise, t, schedule, reduction="none", backend=backend)
    weighted = debias.fused_loss(
        pred, noise, t, schedule, reduction="none", sample_weight=sw, backend=backend
    )
    _close("table", weighted, plain * sw)


@pytest.mark.parametrize(
    "sample_weight, err",
    [
        (torch.ones(3), ValueError),
        (torch.ones(7, 1), ValueError),
        (torch.ones(7, requires_grad=True), ValueError),
        (torch.tensor([1.0] * 6 + [math.nan]), ValueError),
        (torch.tensor([1.0] * 6 + [-1.0]), ValueError),
        (torch.ones(7, dtype=torch.int64), TypeError),
        ([1.0] * 7, TypeError),
    ],
)
def test_sample_weight_refused_naming_it(sample_weight, err):
    x0, noise, pred, sigma = _data((7, 3, 5, 3))
    with pytest.raises(err, match="sample_weight"):
        debias.fused_loss(pred, noise, sigma, "flow", x0=x0, sample_weight=sample_weight)


# ---- the op's own contract: affine_noise, affine_loss ---------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_reversed_convention_through_the_low_level_call(backend, shape):
    """x_t = (1 - s) noise + s x0 with target x0 - noise (the reversed flow convention)."""
    x0, noise, pred, s = _data(shape)
    x_t, _ = debias.affine_noise(x0, s, 1 - s, noise=noise, backend=backend)
    assert torch.equal(x_t, _view(1 - s, x0) * noise + _view(s, x0) * x0)
    pred_ref = pred.clone().requires_grad_()
    want = F.mse_loss(pred_ref.float(), (x0 - noise).float())
    want.backward()
    pred.requires_grad_()
    one = torch.ones(shape[0])
    got = debias.affine_loss(pred, noise, one, -one, one, x0, backend=backend)
    got.backward()
    _close("loss", got, want)
    _close("grad", pred.grad, pred_ref.grad)


def _sd_scripts_sigma_scaled_loss(model_pred, latents, noise, sigmas, weighting_scheme):
    """kohya-ss/sd-scripts, flux_train_network.py + library/flux_train_utils.py, the default
    ``--model_prediction_type sigma_scaled`` restated: noisy_model_input = (1.0 - sigmas) *
    latents + sigmas * noise; apply_model_prediction_type: model_pred = model_pred * (-sigmas)
    + noisy_model_input, weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas);
    target = noise - latents; loss = conditional_loss(model_pred.float(), target.float(),
    "none", "l2") * weighting, mean over [1, 2, 3], mean."""
    sigmas = _view(sigmas, latents)
    noisy_model_input = (1.0 - sigmas) * latents + sigmas * noise
    model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    target = noise - latents
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss * weighting
    return loss.mean([1, 2, 3]).mean()


@pytest.mark.parametrize("scheme", ["none", "cosmap"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_sd_scripts_sigma_scaled_through_the_low_level_call(backend, scheme, shape):
    """On F the loss is sigma^2 weighting ||F - y||^2 with y = ((sigma - 1) eps + (2 - sigma)
    x0) / sigma: one fused call with w = sigma^2 weighting, p = (sigma - 1) / sigma,
    q = (2 - sigma) / sigma."""
    x0, noise, pred, sigma = _data(shape, low=0.1, high=0.9)
    pred_ref = pred.clone().requires_grad_()
    want = _sd_scripts_sigma_scaled_loss(pred_ref, x0, noise, sigma, scheme)
    want.backward()
    sig = sigma.double()
    w = sig**2 * compute_loss_weighting_for_sd3(scheme, sig)
    p, q = (sig - 1) / sig, (2 - sig) / sig
    pred.requires_grad_()
    got = debias.affine_loss(pred, noise, w.float(), p.float(), q.float(), x0, backend=backend)
    got.backward()
    _close("loss", got, want, 1e-5)
    _close("grad", pred.grad, pred_ref.grad, 1e-5)


def test_affine_loss_terms_and_philox(backend):
    x0, _, pred, sigma = _data((3, 2, 5, 5))
    a, s = 1 - sigma, sigma
    x_t, noise = debias.affine_noise(x0, a, s, backend=backend)
    eps = noise.materialize()
    _close("x_t", x_t, reference.noised(x0, eps, a, s), 1e-6)
    w = torch.rand(3) + 0.5
    # noise term only, x0 term only, both
    want_eps = reference.weighted_mse(pred, eps, w)
    _close("eps", debias.affine_loss(pred, noise, w, torch.ones(3), backend=backend), want_eps)
    got_x0 = debias.affine_loss(pred, None, w, None, torch.ones(3), x0, backend=backend)
    _close("x0", got_x0, reference.weighted_mse(pred, x0, w))
    both = debias.affine_loss(pred, noise, w, s, -a, x0, "none", backend=backend)
    _close(
        "both",
        both,
        reference.weighted_mse(
            pred, s.view(-1, 1, 1, 1) * eps - a.view(-1, 1, 1, 1) * x0, w, "none"
        ),
    )


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda x, n, o: debias.affine_noise(x, o[:2], o), ValueError, r"^a must have shape"),
        (lambda x, n, o: debias.affine_noise(x, o, o.long()), TypeError, r"^s must be a float"),
        (lambda x, n, o: debias.affine_noise(x, o, o * math.inf), ValueError, r"^s must be finite"),
        (
            lambda x, n, o: debias.affine_noise(x, o.requires_grad_(), o),
            ValueError,
            r"^a requires grad",
        ),
        (
            lambda x, n, o: debias.affine_loss(x, n, -o, o),
            ValueError,
            r"^w must be finite and >= 0",
        ),
        (
            lambda x, n, o: debias.affine_loss(x, n, o, o * math.nan),
            ValueError,
            r"^p must be finite",
        ),
        (lambda x, n, o: debias.affine_loss(x, n, o, o, o), ValueError, "x0"),
        (lambda x, n, o: debias.affine_loss(x, n, o, None), ValueError, "p and q"),
        (lambda x, n, o: debias.affine_loss(x, None, o, o), ValueError, "noise"),
        (lambda x, n, o: debias.affine_loss(x, n, o, o, None, x), ValueError, "q"),
        (lambda x, n, o: debias.affine_loss(x, n, 1.0, o), TypeError, r"^w must be a float"),
        (lambda x, n, o: debias.affine_loss(x, n, o, o, reduction="avg"), ValueError, "reduction"),
    ],
)
def test_low_level_call_refuses_bad_input_naming_it(call, err, match):
    x0, noise, _, _ = _data((3, 2, 5, 5))
    with pytest.raises(err, match=match):
        call(x0, noise, torch.ones(3))


@pytest.mark.parametrize(
    "t, schedule, kwargs, err, match",
    [
        (torch.tensor([0.1, 0.5, 1.5]), "flow", {}, ValueError, r"^t holds the sigma.*\[0, 1\]"),
        (torch.tensor([0.1, math.nan, 0.5]), "flow", {}, ValueError, "sigma"),
        (torch.tensor([-0.1, 0.2, 0.5]), "flow", {}, ValueError, "sigma"),
        (torch.tensor([0.0, 0.2, 0.5]), "edm", {}, ValueError, r"sigma.*\(0, inf\)"),
        (torch.tensor([math.inf, 0.2, 0.5]), "edm", {}, ValueError, "sigma"),
        (torch.tensor([1, 0, 1]), "flow", {}, TypeError, r"^t must hold per-sample sigmas"),
        (
            torch.rand(2),
            "flow",
            {},
            ValueError,
            r"^t \(the per-sample sigma\) must have shape \[3\]",
        ),
        (torch.rand(3, 1), "flow", {}, ValueError, r"sigma\) must have shape"),
        ([0.1, 0.2, 0.3], "flow", {}, TypeError, "sigma"),
        (torch.rand(3), "ddpm", {}, ValueError, "schedule"),
        (torch.rand(3), "flow", {"weighting": "edm"}, ValueError, "weighting"),
        (torch.rand(3), "flow", {"prediction": "raw"}, ValueError, "prediction"),
        (torch.rand(3), "flow", {"sigma_data": 0.5}, ValueError, "sigma_data"),
        (torch.rand(3), "edm", {"sigma_data": -1.0}, ValueError, "sigma_data"),
        (torch.rand(3), "flow", {"normalize": True}, ValueError, "normalize"),
        (torch.rand(3), "flow", {"weighting": torch.ones(1000)}, TypeError, "weighting"),
        (torch.rand(3), "flow", {"sigma": 1}, TypeError, "option"),
    ],
)
def test_continuous_refuses_bad_input_naming_it(t, schedule, kwargs, err, match):
    x0, noise, pred, _ = _data((3, 2, 5, 5))
    with pytest.raises(err, match=match):
        debias.fused_loss(pred, noise, t, schedule, x0=x0, **kwargs)
    if not kwargs:
        with pytest.raises(err, match=match):
            debias.add_noise(x0, t, schedule, noise=noise)


def test_callable_weighting_of_snr_on_continuous_sigmas():
    sigma = torch.tensor([0.2, 0.5, 0.8])
    got = debias.loss_weight(sigma, "flow", lambda snr: 1 / (1 + snr), "epsilon")
    snr = ((1 - sigma.double()) / sigma.double()) ** 2
    _close("callable", got, 1 / (1 + snr))


def test_compile_fullgraph_continuous_step():
    """The continuous path traces without a graph break (its value checks step aside)."""
    skip_unless_backend("torch")
    x0, noise, pred, sigma = _data((3, 2, 5, 5), low=0.1, high=0.9)

    def step(pred, x0, noise, sigma):
        x_t, _ = debias.add_noise(x0, sigma, "flow", noise=noise, backend="torch")
        return (
            debias.fused_loss(pred, noise, sigma, "flow", "cosmap", x0=x0, backend="torch")
            + 0 * x_t.sum()
        )

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="eager")(pred, x0, noise, sigma)
    _close("compiled", got, step(pred, x0, noise, sigma))


def test_sigmas_checked_once_per_step_and_again_when_changed(backend):
    """fused_loss reuses add_noise's check of the same sigmas (the op's one-entry lookup), and
    only while they are unchanged: an in-place change, another batch or another family checks
    them again."""
    x0, noise, pred, sigma = _data((3, 2, 5), low=0.1, high=0.9)
    debias.add_noise(x0, sigma, "flow", noise=noise, backend=backend)
    first = debias.fused_loss(pred, noise, sigma, "flow", "cosmap", x0=x0, backend=backend)
    sigma[:] = sigma.flip(0)  # in place: a new version of the same tensor
    changed = debias.fused_loss(pred, noise, sigma, "flow", "cosmap", x0=x0, backend=backend)
    fresh = debias.fused_loss(pred, noise, sigma.clone(), "flow", "cosmap", x0=x0, backend=backend)
    assert torch.equal(changed, fresh) and not torch.equal(first, changed)
    with pytest.raises(ValueError, match=r"sigma must have shape \[2\]|t \(the per-sample sigma"):
        debias.fused_loss(pred[:2], noise[:2], sigma, "flow", x0=x0[:2], backend=backend)
    sigma[0] = 1.5  # outside flow's [0, 1]: refused although these sigmas were seen before
    with pytest.raises(ValueError, match="sigma"):
        debias.fused_loss(pred, noise, sigma, "flow", "cosmap", x0=x0, backend=backend)
    assert debias.fused_loss(pred, noise, sigma, "edm", "edm", x0=x0, backend=backend).isfinite()
