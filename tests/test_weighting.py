"""Schedules and weightings against their published definitions."""

import math

import pytest
import torch

import debias
from debias import NoiseSchedule, weight_table
from debias.weighting import FAMILY_WEIGHTINGS, SPACES

PREDICTIONS = ("epsilon", "v_prediction", "sample")


# ---- schedules ----------------------------------------------------------------------------


def test_linear_matches_official_debias_code():
    """Official code: betas linspace(1e-4, 0.02, 1000) in float64, snr = 1/(1-abar) - 1."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    s = NoiseSchedule.linear(1000)
    torch.testing.assert_close(s.alphas_cumprod, abar, rtol=0, atol=0)
    # 1/(1-abar) - 1 cancels near abar -> 0 (a few 1e-12 relative); abar/(1-abar) does not
    torch.testing.assert_close(s.snr, 1 / (1 - abar) - 1, rtol=1e-10, atol=0)


def test_linear_scales_with_num_timesteps():
    """guided-diffusion: beta range scaled by 1000/T."""
    s = NoiseSchedule.linear(250)
    betas = torch.linspace(4e-4, 0.08, 250, dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-15, atol=0)


def test_cosine_matches_improved_ddpm():
    T, s_ = 100, 0.008
    f = [math.cos((i / T + s_) / (1 + s_) * math.pi / 2) ** 2 for i in range(T + 1)]
    betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)], dtype=torch.float64)
    s = NoiseSchedule.cosine(T)
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-14, atol=0)
    assert (1 - s.alphas_cumprod[1:] / s.alphas_cumprod[:-1]).max() <= 0.999 + 1e-12


def test_scaled_linear_matches_stable_diffusion():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    s = NoiseSchedule.scaled_linear()
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-15, atol=0)


def test_from_diffusers_reads_table_and_config():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=500, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    s = NoiseSchedule.from_diffusers(sched)
    assert s.num_timesteps == 500 and s.prediction_type == "v_prediction"
    assert torch.equal(s.alphas_cumprod.float(), sched.alphas_cumprod)


def test_rescale_zero_terminal_snr():
    s = NoiseSchedule.scaled_linear().rescale_zero_terminal_snr()
    assert s.alphas_cumprod[-1] == 0 and s.snr[-1] == 0
    torch.testing.assert_close(
        s.alphas_cumprod[0], NoiseSchedule.scaled_linear().alphas_cumprod[0], rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(
    "table, match",
    [
        (torch.tensor([]), "at least one"),
        (torch.tensor([0.9, 1.0]), r"\[0, 1\)"),
        (torch.tensor([0.9, float("nan")]), "finite"),
        (torch.tensor([0.0, 0.0]), r"alphas_cumprod\[0\]"),
    ],
)
def test_bad_schedules(table, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_alphas_cumprod(table)


def test_bad_schedule_arguments():
    with pytest.raises(TypeError, match="num_timesteps"):
        NoiseSchedule.linear(10.0)
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule.linear(0)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.linear(prediction_type="x0")
    with pytest.raises(TypeError, match="schedule"):
        debias.loss_weight(torch.zeros(2, dtype=torch.long), object())


# ---- weightings ---------------------------------------------------------------------------


def test_debias_official_numbers():
    """Debias paper / official code: 0.0100 at t=0, 157.4 at t=999, mean 17.8 over t."""
    w = weight_table(NoiseSchedule.linear(1000), "debias", "epsilon")
    assert w.dtype == torch.float64 and w.shape == (1000,)
    assert round(w[0].item(), 4) == 0.0100
    assert round(w[999].item(), 1) == 157.4
    assert round(w.mean().item(), 1) == 17.8


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_published_formulas(prediction):
    s = NoiseSchedule.cosine(1000)
    snr = s.snr
    factor = {"epsilon": 1.0, "v_prediction": snr / (snr + 1), "sample": snr}[prediction]
    expected = {
        "constant": torch.ones_like(snr),
        "debias": 1 / snr.sqrt(),
        "p2": 1 / (1 + snr) ** 0.5,
        "min_snr": torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr,
    }
    for name, w_eps in expected.items():
        opts = {"gamma": 0.5} if name == "p2" else {}
        got = weight_table(s, name, prediction, **opts)
        torch.testing.assert_close(got, w_eps * factor, rtol=1e-13, atol=0, msg=name)


def test_min_snr_v_prediction_is_diffusers_formula():
    """diffusers: min(snr, gamma) / (snr + 1) for v-prediction."""
    s = NoiseSchedule.linear()
    expected = torch.clamp(s.snr, max=5.0) / (s.snr + 1)
    torch.testing.assert_close(
        weight_table(s, "min_snr", "v_prediction"), expected, rtol=1e-14, atol=0
    )


def test_conversion_identities_hold_on_random_predictions():
    """||v - v_hat||^2 = ||eps - eps_hat||^2 (snr+1)/snr and ||x0 - x0_hat||^2 = .../snr."""
    s = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (64,), generator=g)
    a, b = s.alphas_cumprod[t].sqrt()[:, None], (1 - s.alphas_cumprod[t]).sqrt()[:, None]
    x0, eps, eps_hat = (torch.randn(64, 10, dtype=torch.float64, generator=g) for _ in range(3))
    x_t = a * x0 + b * eps
    x0_hat = (x_t - b * eps_hat) / a
    v, v_hat = a * eps - b * x0, a * eps_hat - b * x0_hat
    err = {
        "epsilon": (eps - eps_hat).square().sum(1),
        "v_prediction": (v - v_hat).square().sum(1),
        "sample": (x0 - x0_hat).square().sum(1),
    }
    for pred in PREDICTIONS:
        w = weight_table(s, "debias", pred)[t]
        torch.testing.assert_close(w * err[pred], weight_table(s, "debias")[t] * err["epsilon"])


def test_normalize_and_cap():
    s = NoiseSchedule.linear()
    w = weight_table(s, "debias", normalize=True)
    assert abs(w.mean().item() - 1) < 1e-12
    assert weight_table(s, "debias", max_weight=50.0).max().item() == 50.0
    # normalisation is of the epsilon-space objective, so it carries over to every target
    torch.testing.assert_close(
        weight_table(s, "debias", "v_prediction", normalize=True),
        w * s.snr / (s.snr + 1),
    )


def test_zero_terminal_snr_debias_needs_cap():
    s = NoiseSchedule.scaled_linear().rescale_zero_terminal_snr()
    with pytest.raises(ValueError, match="max_weight"):
        weight_table(s, "debias", "epsilon")
    capped = weight_table(s, "debias", "epsilon", max_weight=1000.0)
    assert torch.isfinite(capped).all() and capped[-1] == 1000.0
    # v and x0 targets have a finite limit at snr = 0: sqrt(snr)/(snr+1) -> 0, sqrt(snr) -> 0
    for pred in ("v_prediction", "sample"):
        w = weight_table(s, "debias", pred)
        assert torch.isfinite(w).all() and w[-1] == 0.0
    # min_snr = min(1, gamma/snr) is 1 at snr = 0 in epsilon space
    assert weight_table(s, "min_snr")[-1] == 1.0
    assert weight_table(s, "min_snr", "v_prediction")[-1] == 0.0


def test_user_table_and_callable():
    s = NoiseSchedule.linear(100)
    table = torch.rand(100, dtype=torch.float64) + 0.1
    torch.testing.assert_close(weight_table(s, table), table)
    torch.testing.assert_close(weight_table(s, table, "sample"), table * s.snr)
    torch.testing.assert_close(weight_table(s, lambda snr: snr.rsqrt()), weight_table(s))
    with pytest.raises(ValueError, match="one entry per timestep"):
        weight_table(s, torch.ones(99))
    with pytest.raises(ValueError, match=">= 0"):
        weight_table(s, -torch.ones(100))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"weighting": "snr"}, ValueError, "weighting must be one of"),
        ({"weighting": 3}, TypeError, "weighting must be"),
        ({"prediction": "x0"}, ValueError, "prediction must be one of"),
        ({"gamma": -1.0, "weighting": "min_snr"}, ValueError, "gamma"),
        ({"k": 1.0, "weighting": "debias"}, ValueError, "'k' does not apply"),
        ({"max_weight": 0.0}, ValueError, "max_weight"),
        ({"normalize": 1}, TypeError, "normalize"),
        ({"cap": 3.0}, TypeError, "unknown option"),
    ],
)
def test_bad_weighting_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        weight_table(NoiseSchedule.linear(100), **kwargs)


def test_loss_weight_gathers_per_sample():
    s = NoiseSchedule.linear()
    t = torch.tensor([0, 999, 500])
    w = debias.loss_weight(t, s, "debias")
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, weight_table(s)[t].float())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        debias.loss_weight(torch.tensor([1000]), s)
    with pytest.raises(TypeError, match="t must be an integer"):
        debias.loss_weight(torch.tensor([1.0]), s)


# ---- every family -------------------------------------------------------------------------

FAMILY_SCHEDULES = {
    "ddpm": lambda: NoiseSchedule.linear(1000),
    "ddpm-zero-snr": lambda: NoiseSchedule.scaled_linear().rescale_zero_terminal_snr(),
    "flow": lambda: NoiseSchedule.flow_matching(1000, shift=3.0),
    "flow-T7": lambda: NoiseSchedule.flow_matching(7),
    "edm": lambda: NoiseSchedule.edm(1000),
    "edm-sd1": lambda: NoiseSchedule.edm(33, sigma_data=1.0),
}
TARGETS = ("epsilon", "v_prediction", "sample", "flow", "raw")


def _targets(schedule):
    return [p for p in TARGETS if p != "raw" or schedule.family == "edm"]


def _weightings(schedule):
    """(label, weighting, options, declared space): every weighting the family accepts, with
    options, plus a table and a callable (epsilon space)."""
    T = schedule.num_timesteps
    bounded = {"max_weight": 100.0} if (schedule.snr == 0).any() else {}
    out = [
        (name, name, bounded if name == "debias" else {}, SPACES[name])
        for name in FAMILY_WEIGHTINGS[schedule.family]
    ]
    out += [
        ("p2-0.5", "p2", {"k": 1.0, "gamma": 0.5}, "epsilon"),
        ("min_snr-1-normalized", "min_snr", {"gamma": 1.0, "normalize": True}, "epsilon"),
        ("constant-capped", "constant", {"max_weight": 0.5}, "epsilon"),
        ("table", torch.linspace(0.1, 2.0, T, dtype=torch.float64), {}, "epsilon"),
        ("callable", lambda snr: 1 / (snr + 2), {}, "epsilon"),
    ]
    if schedule.family == "edm":
        out.append(
            ("edm-capped-normalized", "edm", {"max_weight": 10.0, "normalize": True}, "sample")
        )
    if schedule.family == "flow":
        out.append(("sigma_sqrt-normalized", "sigma_sqrt", {"normalize": True}, "flow"))
    return out


def _errors(schedule, idx, g):
    """Squared errors ``[B]`` of one network's prediction in every target's space, at
    fixed x_t (from random x0, eps and the network's eps_hat)."""
    a, s = schedule.alpha[idx][:, None], schedule.sigma[idx][:, None]
    x0, eps, eps_hat = (
        torch.randn(len(idx), 10, dtype=torch.float64, generator=g) for _ in range(3)
    )
    x_t = a * x0 + s * eps
    x0_hat = (x_t - s * eps_hat) / a
    errors = {}
    for prediction in _targets(schedule):
        p, q = debias.weighting.target_table(schedule, prediction, torch.float64)[:, idx, None]
        errors[prediction] = ((p * eps + q * x0) - (p * eps_hat + q * x0_hat)).square().sum(1)
    return errors


@pytest.mark.parametrize("family", FAMILY_SCHEDULES, ids=FAMILY_SCHEDULES.keys())
def test_every_target_weighs_the_same_objective(family):
    """The real test of the conversion: for random x0, eps and a network's eps_hat at fixed
    x_t, the weighted squared error in every target's space is one number, for every
    weighting, whatever space it is declared in."""
    schedule = FAMILY_SCHEDULES[family]()
    T = schedule.num_timesteps
    g = torch.Generator().manual_seed(2)
    # away from snr = 0, where x0 (and so the error of every target but epsilon) is undefined
    idx = torch.randint(0, T, (64,), generator=g)
    idx = idx[schedule.snr[idx] > 0]
    errors = _errors(schedule, idx, g)
    for label, weighting, options, space in _weightings(schedule):
        objective = weight_table(schedule, weighting, space, **options)[idx] * errors[space]
        for prediction in _targets(schedule):
            if prediction == "epsilon" and space != "epsilon" and (schedule.snr == 0).any():
                continue  # no finite epsilon weight at snr = 0: test_refusals
            w = weight_table(schedule, weighting, prediction, **options)
            assert w.dtype == torch.float64 and w.shape == (T,), label
            assert torch.isfinite(w).all() and (w >= 0).all(), label
            torch.testing.assert_close(
                w[idx] * errors[prediction],
                objective,
                rtol=1e-9,
                atol=0,
                msg=lambda m, p=prediction, n=label: f"{n} -> {p}: {m}",
            )


def test_flow_weightings_closed_forms():
    flow = NoiseSchedule.flow_matching(1000, shift=3.0)
    sigma, snr = flow.sigma, flow.snr
    assert sigma[0] == 1 and snr[0] == 0  # t = 1000 is pure noise
    # epsilon-space weightings on the flow target: w (1 - sigma)^2
    torch.testing.assert_close(
        weight_table(flow, "debias"), sigma * (1 - sigma), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(weight_table(flow, "constant"), (1 - sigma) ** 2, rtol=1e-15, atol=0)
    min_snr = torch.where(snr > 0, torch.clamp(snr, max=5.0) / snr, 1.0) * (1 - sigma) ** 2
    torch.testing.assert_close(weight_table(flow, "min_snr"), min_snr, rtol=1e-13, atol=0)
    p2 = (1 + snr) ** -0.5 * (1 - sigma) ** 2
    torch.testing.assert_close(weight_table(flow, "p2", gamma=0.5), p2, rtol=1e-13, atol=0)
    # diffusers' compute_loss_weighting_for_sd3, on the flow-matching loss
    torch.testing.assert_close(weight_table(flow, "sigma_sqrt"), sigma**-2.0, rtol=0, atol=0)
    cosmap = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    torch.testing.assert_close(weight_table(flow, "cosmap"), cosmap, rtol=0, atol=0)
    for name in ("none", "logit_normal", "mode"):
        assert torch.equal(weight_table(flow, name), torch.ones_like(sigma))
    # flow-space weights on other targets: ||u - u_hat||^2 = ||x0 - x0_hat||^2 / sigma^2
    torch.testing.assert_close(
        weight_table(flow, "sigma_sqrt", "sample"), sigma**-4.0, rtol=1e-14, atol=0
    )
    v = weight_table(flow, "none", "v_prediction")
    torch.testing.assert_close(v, 1 / ((1 - sigma) ** 2 + sigma**2), rtol=1e-14, atol=0)
    assert v[0] == 1.0  # at sigma = 1 the v, x0 and flow errors are all the x0 error


def test_edm_weightings_closed_forms():
    edm = NoiseSchedule.edm(1000)
    s, sd = edm.sigma, 0.5
    lam = (s**2 + sd**2) / (s * sd) ** 2
    torch.testing.assert_close(weight_table(edm, "edm", "sample"), lam, rtol=0, atol=0)
    torch.testing.assert_close(weight_table(edm, "edm", "denoised"), lam, rtol=0, atol=0)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    torch.testing.assert_close(weight_table(edm, "edm"), lam * c_out**2, rtol=1e-14, atol=0)
    assert torch.allclose(weight_table(edm, "edm"), torch.ones_like(s), rtol=1e-14, atol=0)
    # EDM's lambda is the weight that makes the raw network output's loss uniform
    torch.testing.assert_close(weight_table(edm, "edm", "epsilon"), lam * s**2, rtol=1e-14, atol=0)
    torch.testing.assert_close(weight_table(edm, "debias", "sample"), 1 / s, rtol=1e-14, atol=0)


def test_target_rows():
    ddpm, flow, edm = NoiseSchedule.linear(), NoiseSchedule.flow_matching(), NoiseSchedule.edm()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, s = ddpm.noise_table(dtype).double()
        rows = debias.weighting.loss_table(ddpm, "debias", "v_prediction", dtype, {})
        assert rows.dtype == torch.float64 and rows.shape == (3, 1000)
        assert torch.equal(rows[1:], torch.stack((a, -s)))  # get_velocity's rounding
        torch.testing.assert_close(rows[0], weight_table(ddpm, "debias", "v_prediction"))
    rows = debias.weighting.loss_table(flow, "logit_normal", None, torch.bfloat16, {})
    assert torch.equal(
        rows, torch.stack([torch.ones(1000), torch.ones(1000), -torch.ones(1000)]).double()
    )
    pq = debias.weighting.target_table(flow, "v_prediction", torch.float32)
    norm = (flow.alpha**2 + flow.sigma**2).sqrt()
    torch.testing.assert_close(pq, torch.stack((flow.alpha / norm, -flow.sigma / norm)))
    # raw: D = c_skip x_t + c_out F with D = x0 gives F = p eps + q x0
    s, sd = edm.sigma, edm.sigma_data
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    p, q = debias.weighting.target_table(edm, "raw", torch.float32)
    torch.testing.assert_close(p, -c_skip * s / c_out, rtol=1e-13, atol=0)
    torch.testing.assert_close(q, (1 - c_skip) / c_out, rtol=1e-9, atol=0)
    for name, table in (("epsilon", (1, 0)), ("sample", (0, 1)), ("flow", (1, -1))):
        pq = debias.weighting.target_table(edm, name, torch.float16)
        assert pq[0].eq(table[0]).all() and pq[1].eq(table[1]).all(), name
    with pytest.raises(TypeError, match="dtype"):
        debias.weighting.loss_table(ddpm, "debias", None, torch.int32, {})


def test_refusals():
    flow, edm, ddpm = (
        NoiseSchedule.flow_matching(1000),
        NoiseSchedule.edm(),
        NoiseSchedule.linear(),
    )
    # epsilon-space debias is unbounded where snr = 0: every flow schedule's t = 1000
    with pytest.raises(ValueError, match=r"unbounded at timesteps \[1000.0\].*max_weight"):
        weight_table(flow, "debias", "epsilon")
    with pytest.raises(ValueError, match="max_weight"):
        weight_table(flow, "debias", normalize=True)
    capped = weight_table(flow, "debias", "epsilon", max_weight=100.0)
    assert capped[0] == 100.0 and torch.isfinite(capped).all()
    # a flow-space weight has no finite value as an epsilon weight at sigma = 1
    with pytest.raises(
        ValueError, match=r"no finite value as a weight on the epsilon target.*max_weight"
    ):
        weight_table(flow, "cosmap", "epsilon")
    with pytest.raises(ValueError, match="no finite value"):
        weight_table(flow, "none", "epsilon", max_weight=10.0)
    # a table holding inf, or p2 with k = 0 (growing like 1/snr^gamma) past its limit
    table = torch.ones(1000, dtype=torch.float64)
    table[0] = math.inf
    with pytest.raises(ValueError, match="max_weight"):
        weight_table(flow, table)
    with pytest.raises(ValueError, match="max_weight"):
        weight_table(flow, "p2", k=0.0, gamma=2.0)
    torch.testing.assert_close(weight_table(flow, "p2", k=0.0, gamma=1.0)[0].item(), 1.0)
    # a weighting or target of another family
    for schedule in (ddpm, edm):
        with pytest.raises(ValueError, match="defined on flow schedules"):
            weight_table(schedule, "sigma_sqrt")
    for schedule in (ddpm, flow):
        with pytest.raises(ValueError, match="defined on edm schedules"):
            weight_table(schedule, "edm", "sample")
        with pytest.raises(ValueError, match="prediction 'raw' exists on edm schedules only"):
            weight_table(schedule, "debias", "raw")


def test_loss_weight_on_float_timesteps():
    flow = NoiseSchedule.flow_matching(1000, shift=3.0)
    t = flow.timesteps[torch.tensor([0, 999, 3])]
    w = debias.loss_weight(t, flow, "cosmap")
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, weight_table(flow, "cosmap")[[0, 999, 3]].float())
    with pytest.raises(ValueError, match="t must hold timesteps"):
        debias.loss_weight(torch.tensor([0.5]), flow)
    with pytest.raises(TypeError, match="t must be a float tensor"):
        debias.loss_weight(torch.tensor([3]), flow)


def test_cached_tables():
    """The ops' cached tables take a resolved prediction (the ops resolve it at their door)
    and check the weighting's options, their cache key."""
    from debias.weighting import cached_loss_table, cached_weight_table

    s = NoiseSchedule.flow_matching(1000)
    table = cached_loss_table(s, "debias", "flow", torch.bfloat16, torch.float32, "cpu", {})
    assert table.dtype == torch.float32 and table.shape == (3, 1000)
    torch.testing.assert_close(
        table, debias.weighting.loss_table(s, "debias", "flow", torch.bfloat16, {}).float()
    )
    assert cached_loss_table(s, "debias", "flow", torch.bfloat16, torch.float32, "cpu", {}) is table
    other = cached_loss_table(
        s, "debias", "flow", torch.bfloat16, torch.float32, "cpu", {"max_weight": 0.1}
    )
    assert other is not table and other[0].max() <= 0.1
    w64 = cached_weight_table(s, "cosmap", "flow", torch.float64, "cpu", {})
    assert (
        w64.dtype == torch.float64
        and cached_weight_table(s, "cosmap", "flow", torch.float64, "cpu", {}) is w64
    )
    # a bad option is refused by name, not by the cache's hash
    with pytest.raises(TypeError, match="max_weight"):
        cached_loss_table(
            s, "debias", "flow", torch.float32, torch.float32, "cpu", {"max_weight": [1.0]}
        )
    with pytest.raises(TypeError, match="unknown option"):
        cached_weight_table(s, "debias", "flow", torch.float32, "cpu", {"cap": 1.0})


def test_module_surface():
    from debias.weighting import check_timesteps

    check_timesteps(torch.tensor([0, 1]), 2)
    with pytest.raises(TypeError, match="t must be an integer"):
        check_timesteps(torch.tensor([0.0]), 2)
    assert FAMILY_WEIGHTINGS["ddpm"] == ("constant", "debias", "p2", "min_snr")
    assert "cosmap" in FAMILY_WEIGHTINGS["flow"] and "edm" in FAMILY_WEIGHTINGS["edm"]
    assert debias.schedules.PREDICTION_TYPES == ("epsilon", "v_prediction", "sample", "flow", "raw")
    assert debias.weighting.resolve_prediction(NoiseSchedule.edm(), "denoised") == "sample"
    assert debias.weighting.resolve_prediction(NoiseSchedule.flow_matching(), None) == "flow"
