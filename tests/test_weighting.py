"""Schedules and weightings against their published definitions."""

import math

import pytest
import torch

import debias
from debias import NoiseSchedule, weight_table

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
    torch.testing.assert_close(weight_table(s, "min_snr", "v_prediction"), expected, rtol=1e-14,
                               atol=0)  # fmt: skip


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
