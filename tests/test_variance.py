"""Learned variance against a float64 re-implementation of guided-diffusion's formulas
(``gaussian_diffusion.py``: LEARNED_RANGE, ``p_mean_variance``, ``_vb_terms_bpd``,
``normal_kl``, ``discretized_gaussian_log_likelihood``), closed-form Gaussian KLs, and the
gradient and error contracts."""

import math

import pytest
import torch

from debias import NoiseSchedule
from debias.pipeline.sampling import respace
from debias.pipeline.variance import (
    discretized_gaussian_log_likelihood,
    model_log_variance,
    normal_kl,
    posterior_tables,
    vb_loss,
)

PREDICTIONS = ("epsilon", "v_prediction", "sample")


# ---- the float64 re-implementation ---------------------------------------------------------


class GaussianDiffusion64:
    """guided-diffusion's tables and vb term from the betas, in float64, written as upstream
    writes them (plain ``exp(d) - 1`` in the KL, x_t and x0 in the mean)."""

    def __init__(self, betas):
        b = betas.double()
        self.betas = b
        ac = torch.cumprod(1 - b, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.ac = ac
        self.post_var = b * (1 - ac_prev) / (1 - ac)
        self.post_lvc = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))
        self.coef1 = b * ac_prev.sqrt() / (1 - ac)
        self.coef2 = (1 - ac_prev) * (1 - b).sqrt() / (1 - ac)

    def _x(self, table, t, ndim):
        return table[t].view(-1, *([1] * (ndim - 1)))

    def vb_bpd(self, model_output, x0, x_t, t, prediction):
        C = x0.shape[1]
        out, var_values = model_output[:, :C].double(), model_output[:, C:].double()
        x0, x_t = x0.double(), x_t.double()
        n = x0.dim()
        a = self._x(self.ac, t, n)
        # p_mean_variance, LEARNED_RANGE
        min_log = self._x(self.post_lvc, t, n)
        max_log = self._x(torch.log(self.betas), t, n)
        frac = (var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        if prediction == "epsilon":
            pred_x0 = (1 / a).sqrt() * x_t - (1 / a - 1).sqrt() * out
        elif prediction == "v_prediction":
            pred_x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
        else:
            pred_x0 = out
        c1, c2 = self._x(self.coef1, t, n), self._x(self.coef2, t, n)
        model_mean = c1 * pred_x0 + c2 * x_t
        true_mean = c1 * x0 + c2 * x_t
        true_lvc = min_log
        kl = 0.5 * (
            -1.0
            + model_log_variance
            - true_lvc
            + torch.exp(true_lvc - model_log_variance)
            + (true_mean - model_mean) ** 2 * torch.exp(-model_log_variance)
        )
        dims = tuple(range(1, n))
        kl = kl.mean(dims) / math.log(2.0)
        nll = -self.discretized_ll(x0, model_mean, 0.5 * model_log_variance)
        nll = nll.mean(dims) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    @staticmethod
    def discretized_ll(x, means, log_scales):
        def cdf(v):
            return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

        centered = x - means
        inv = torch.exp(-log_scales)
        cdf_plus = cdf(inv * (centered + 1.0 / 255.0))
        cdf_min = cdf(inv * (centered - 1.0 / 255.0))
        log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
        log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
        cdf_delta = cdf_plus - cdf_min
        return torch.where(
            x < -0.999,
            log_cdf_plus,
            torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
        )


def _batch(T, shape, t_list, seed, data_on_grid=True):
    g = torch.Generator().manual_seed(seed)
    B = len(t_list)
    if data_on_grid:
        # 8-bit data rescaled to [-1, 1], the edges -1 and 1 included.
        x0 = torch.randint(0, 256, (B, *shape), generator=g).float() / 127.5 - 1
    else:
        x0 = torch.rand((B, *shape), generator=g) * 2 - 1
    eps = torch.randn((B, *shape), generator=g)
    t = torch.tensor(t_list, dtype=torch.int64)
    return x0, eps, t, g


def _noisy(schedule, x0, eps, t):
    a = schedule.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
    return (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).float()


CASES = [
    pytest.param(50, (3, 7, 5), [0, 1, 49, 0, 17, 48, 1], id="T50-C3-H7-W5"),
    pytest.param(1000, (1, 33, 1), [0, 1, 999, 500, 2], id="T1000-C1-H33-W1"),
    pytest.param(7, (2, 3), [0, 6, 3], id="T7-C2-L3"),
]


@pytest.mark.parametrize("T, shape, t_list", CASES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vb_loss_matches_guided_diffusion(T, shape, t_list, prediction):
    scale = min(1000 / T, 40)  # guided-diffusion's linear betas, kept below 1 for small T
    betas = torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)
    schedule = NoiseSchedule.from_betas(betas, prediction_type=prediction)
    x0, eps, t, g = _batch(T, shape, t_list, seed=T)
    x_t = _noisy(schedule, x0, eps, t)
    B = x0.shape[0]
    # A model output that is neither exact nor absurd: the truth plus noise, v in [-1.3, 1.3].
    truth = {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": _noisy(schedule, eps, -x0, t),  # sqrt(a) eps - sqrt(1-a) x0
    }[prediction]
    mean_out = truth + 0.3 * torch.randn(truth.shape, generator=g)
    var_values = 1.3 * (2 * torch.rand(truth.shape, generator=g) - 1)
    got = vb_loss(var_values, mean_out, x0, x_t, t, schedule, prediction)
    model_output = torch.cat([mean_out, var_values], 1)
    want = GaussianDiffusion64(betas).vb_bpd(model_output, x0, x_t, t, prediction)
    assert got.dtype == torch.float32 and got.shape == (B,)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-6)
    # The schedule's default prediction is used when none is given.
    torch.testing.assert_close(vb_loss(var_values, mean_out, x0, x_t, t, schedule), got)


def test_vb_loss_bf16_inputs_and_int32_t():
    T = 30
    schedule = NoiseSchedule.linear(T)
    x0, eps, t, g = _batch(T, (3, 4, 4), [0, 5, 29], seed=1)
    x_t = _noisy(schedule, x0, eps, t)
    v = torch.rand(x0.shape, generator=g) * 2 - 1
    want = vb_loss(v, eps, x0, x_t, t, schedule)
    got = vb_loss(v.bfloat16(), eps.bfloat16(), x0.bfloat16(), x_t.bfloat16(), t.int(), schedule)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=1e-3)


# ---- closed forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_exact_mean_and_posterior_variance_give_zero_kl(prediction):
    T = 100
    schedule = NoiseSchedule.cosine(T)
    x0, eps, t, _ = _batch(T, (3, 5, 7), [1, 2, 50, 99], seed=2, data_on_grid=False)
    x_t = _noisy(schedule, x0, eps, t)
    truth = {"epsilon": eps, "sample": x0, "v_prediction": _noisy(schedule, eps, -x0, t)}
    v = torch.full_like(x0, -1.0)  # frac = 0: log var = log beta_tilde (clipped), the true one
    got = vb_loss(v, truth[prediction], x0, x_t, t, schedule, prediction)
    # The mean is exact up to float32 rounding of x0_hat (large for epsilon at t = T-1, where
    # x0_hat = (x_t - sqrt(1-a) eps) / sqrt(a) amplifies it).
    assert got.abs().max() < 1e-5


def test_closed_form_kl_for_given_means_and_variances():
    T = 40
    schedule = NoiseSchedule.linear(T)
    tables = posterior_tables(schedule.alphas_cumprod)
    t_list = [1, 7, 39]
    x0, eps, t, _ = _batch(T, (2, 3, 3), t_list, seed=3, data_on_grid=False)
    x_t = _noisy(schedule, x0, eps, t)
    delta = 0.05
    v = torch.ones_like(x0)  # frac = 1: the model variance is beta_t ("fixed large")
    got = vb_loss(v, x0 + delta, x0, x_t, t, schedule, "sample")
    for b, tb in enumerate(t_list):
        beta = tables["betas"][tb].item()
        bt = tables["posterior_variance"][tb].item()
        shift = tables["posterior_mean_coef1"][tb].item() * delta
        # KL(N(m, bt) || N(m + shift, beta)) per element, in bits.
        kl = 0.5 * (math.log(beta / bt) + bt / beta - 1 + shift**2 / beta) / math.log(2)
        assert got[b].item() == pytest.approx(kl, rel=1e-4, abs=1e-7), tb


def test_decoder_nll_at_t0_closed_form():
    T = 30
    schedule = NoiseSchedule.linear(T)
    tables = posterior_tables(schedule.alphas_cumprod)
    x0 = torch.tensor([-1.0, -1 + 2 / 255, 0.0, 1 - 2 / 255, 1.0]).view(1, 1, 5)
    t = torch.zeros(1, dtype=torch.int64)
    x_t = x0 * math.sqrt(schedule.alphas_cumprod[0].item())
    v = torch.full_like(x0, 0.25)
    got = vb_loss(v, x0, x0, x_t, t, schedule, "sample").item()
    # Exact mean: mean_p = coef1 x0 + coef2 x_t; the likelihood by hand with the same CDF.
    c1, c2 = tables["posterior_mean_coef1"][0].item(), tables["posterior_mean_coef2"][0].item()
    frac = 0.625
    log_var = frac * tables["log_betas"][0].item()
    log_var += (1 - frac) * tables["posterior_log_variance_clipped"][0].item()
    sd = math.exp(0.5 * log_var)

    def cdf(v):
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    nll = 0.0
    for x in x0.flatten().tolist():
        m = c1 * x + c2 * x * math.sqrt(schedule.alphas_cumprod[0].item())
        hi, lo = cdf((x - m + 1 / 255) / sd), cdf((x - m - 1 / 255) / sd)
        p = hi if x < -0.999 else (1 - lo if x > 0.999 else hi - lo)
        nll -= math.log(max(p, 1e-12))
    assert got == pytest.approx(nll / 5 / math.log(2), rel=1e-4)


def test_helpers():
    lv = model_log_variance(torch.tensor([-1.0, 0.0, 1.0]), -2.0, -6.0)
    torch.testing.assert_close(lv, torch.tensor([-6.0, -4.0, -2.0]))
    m = torch.zeros(1)
    logvar1 = torch.tensor([1e-2])
    got = normal_kl(m, logvar1, m + 0.1, torch.zeros(1)).item()
    d = logvar1.item()
    assert got == pytest.approx(0.5 * (math.expm1(d) - d + 0.01), rel=1e-5)
    # A wide Gaussian at x = 0: bin mass ~ pdf(0) * 2/255.
    ll = discretized_gaussian_log_likelihood(torch.zeros(1), torch.zeros(1), torch.zeros(1))
    assert ll.item() == pytest.approx(math.log(2 / 255 / math.sqrt(2 * math.pi)), rel=1e-3)


def test_posterior_tables_respaced_and_short():
    schedule = NoiseSchedule.linear(100)
    spaced, _ = respace(schedule, [0, 10, 50, 99])
    tab = posterior_tables(spaced.alphas_cumprod)
    abar = schedule.alphas_cumprod[[0, 10, 50, 99]]
    torch.testing.assert_close(tab["betas"][1:], 1 - abar[1:] / abar[:-1], rtol=1e-12, atol=0)
    assert tab["posterior_log_variance_clipped"][0] == tab["posterior_log_variance_clipped"][1]
    assert torch.isfinite(torch.stack(list(tab.values()))).all()
    one = posterior_tables(schedule.alphas_cumprod[:1])
    assert one["posterior_log_variance_clipped"].item() == one["log_betas"].item()
    zt = posterior_tables(NoiseSchedule.cosine(10).rescale_zero_terminal_snr().alphas_cumprod)
    assert zt["betas"][-1] == 1 and zt["sqrt_recip_alphas_cumprod"][-1] == math.inf
    with pytest.raises(ValueError, match="strictly decreasing"):
        posterior_tables(torch.tensor([0.9, 0.9, 0.5], dtype=torch.float64))


# ---- gradients and errors --------------------------------------------------------------------


def test_gradient_reaches_var_values_only():
    T = 25
    schedule = NoiseSchedule.linear(T)
    x0, eps, t, g = _batch(T, (3, 5, 5), [0, 3, 24], seed=4)
    x_t = _noisy(schedule, x0, eps, t)
    out = torch.randn(3, 6, 5, 5, generator=g, requires_grad=True)
    x0.requires_grad_(True)
    x_t.requires_grad_(True)
    loss = vb_loss(out[:, 3:], out[:, :3], x0, x_t, t, schedule, "epsilon")
    loss.sum().backward()
    assert out.grad[:, :3].abs().max() == 0  # the mean is frozen
    assert (out.grad[:, 3:].abs().flatten(1).amax(1) > 0).all()
    assert x0.grad is None and x_t.grad is None
    # And the gradient is the float64 reference's.
    var = out.detach()[:, 3:].double().requires_grad_(True)
    ref = GaussianDiffusion64(torch.linspace(1e-4 * 40, 0.02 * 40, T, dtype=torch.float64))
    model_output = torch.cat([out.detach()[:, :3].double(), var], 1)
    ref.vb_bpd(model_output, x0.detach(), x_t.detach(), t, "epsilon").sum().backward()
    torch.testing.assert_close(out.grad[:, 3:].double(), var.grad, rtol=1e-3, atol=1e-7)


def _args(**change):
    T = 10
    schedule = NoiseSchedule.cosine(T)
    x0 = torch.zeros(2, 1, 3, 3)
    args = {
        "var_values": torch.zeros_like(x0),
        "mean_output": torch.zeros_like(x0),
        "x0": x0,
        "x_t": torch.zeros_like(x0),
        "t": torch.tensor([0, 9]),
        "schedule": schedule,
        "prediction": "epsilon",
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"var_values": [0.0]}, TypeError, "var_values must be a torch.Tensor"),
        ({"x0": torch.zeros(2, 1, 3, 3, dtype=torch.int64)}, TypeError, "x0 must be a float"),
        ({"mean_output": torch.zeros(2, 2, 3, 3)}, ValueError, r"mean_output has shape \[2, 2"),
        ({"x_t": torch.zeros(2, 1, 3)}, ValueError, "x_t has shape"),
        ({"t": torch.tensor([0.0, 1.0])}, TypeError, "t must be an integer"),
        ({"t": torch.tensor([0, 10])}, ValueError, r"t must lie in \[0, 10\)"),
        ({"t": torch.tensor([0])}, ValueError, r"t must have shape \[2\]"),
        ({"prediction": "flow"}, ValueError, "prediction must be one of"),
        ({"schedule": NoiseSchedule.flow_matching(10)}, ValueError, "schedule must be a ddpm"),
        (
            {"schedule": NoiseSchedule.cosine(10).rescale_zero_terminal_snr()},
            ValueError,
            "abar == 0",
        ),
        ({"var_values": torch.full((2, 1, 3, 3), math.nan)}, ValueError, "not finite"),
        ({"var_values": torch.full((2, 1, 3, 3), -1e4)}, ValueError, "overflows"),
    ],
)
def test_errors_name_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        vb_loss(**_args(**change))


def test_zero_terminal_snr_with_v_prediction_is_finite():
    schedule = NoiseSchedule.cosine(10).rescale_zero_terminal_snr()
    out = vb_loss(**_args(schedule=schedule, prediction="v_prediction"))
    assert torch.isfinite(out).all()
