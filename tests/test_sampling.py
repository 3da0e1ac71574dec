"""Samplers against hand-computed respacing, a guided-diffusion-style re-implementation with the
documented noise order, and an analytic oracle: for Gaussian data the exact denoiser is known,
and every sampler step is affine in x_t, so the output distribution can be computed exactly."""

import math

import pytest
import torch

from debias import NoiseSchedule
from debias.pipeline.sampling import (
    DDPM_METHODS,
    DEFAULT_METHOD,
    FLOW_METHODS,
    METHODS,
    _step_coefficients,
    flow_sigmas,
    respace,
    sample,
    space_timesteps,
)

MU, S = 0.2, 0.3  # data N(MU, S^2) per pixel: far from the [-1, 1] clip
BIG = (16, 1, 32, 32)  # 16384 independent pixels for the moment checks


# ---- space_timesteps -----------------------------------------------------------------------


def _sections_by_formula(T, counts):
    """guided-diffusion's rule written out: equal sections, the first T % len one longer."""
    out, start = [], 0
    for i, count in enumerate(counts):
        size = T // len(counts) + (1 if i < T % len(counts) else 0)
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        # Upstream accumulates the float stride: 7 * (99 / 14) sums to 49.4999.., not 49.5.
        cur = 0.0
        for _ in range(count):
            out.append(start + round(cur))
            cur += stride
        start += size
    return out


def test_space_timesteps_documented_example():
    got = space_timesteps(300, [10, 15, 20])
    assert got == _sections_by_formula(300, [10, 15, 20])
    assert len([t for t in got if t < 100]) == 10
    assert len([t for t in got if 100 <= t < 200]) == 15
    assert len([t for t in got if t >= 200]) == 20
    assert got[:10] == list(range(0, 100, 11))  # stride 99 / 9 = 11 exactly
    assert got[10:13] == [100, 107, 114] and got[25:29] == [200, 205, 210, 216]
    assert got[17] == 149  # round(49.4999..) from the accumulated stride; j * stride gives 150
    assert got[-1] == 299
    assert space_timesteps(300, "10,15,20") == got
    assert space_timesteps(300, " 10, 15 ,20") == got


@pytest.mark.parametrize(
    "T, counts, expected",
    [
        pytest.param(10, [3, 2, 2], [0, 2, 3, 4, 6, 7, 9], id="uneven-sections"),
        pytest.param(6, 3, [0, 2, 5], id="round-half-even"),  # round(2.5) == 2
        pytest.param(10, 10, list(range(10)), id="all"),
        pytest.param(1000, 1, [0], id="one-step"),
        pytest.param(7, "1,1", [0, 4], id="str-sections"),
    ],
)
def test_space_timesteps_literal(T, counts, expected):
    assert space_timesteps(T, counts) == expected


@pytest.mark.parametrize("T, n", [(1000, 50), (1000, 7), (123, 33), (33, 2)])
def test_space_timesteps_int_is_one_even_section(T, n):
    got = space_timesteps(T, n)
    assert got == _sections_by_formula(T, [n]) == space_timesteps(T, [n])
    assert len(got) == n and got[0] == 0 and (n == 1 or got[-1] == T - 1)


def test_space_timesteps_ddim():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim7") == list(range(0, 1000, 143))  # smallest stride
    assert space_timesteps(10, "ddim3") == [0, 4, 8]
    assert space_timesteps(10, "ddim10") == list(range(10))
    with pytest.raises(ValueError, match=r"section_counts='ddim7'.*exactly 7"):
        space_timesteps(10, "ddim7")


@pytest.mark.parametrize(
    "T, counts, match",
    [
        (10, [6, 5], r"section_counts\[0\]=6.*section of 5"),
        (10, [3, 0], r"section_counts\[1\]=0"),
        (10, "abc", "section_counts='abc'"),
        (10, "ddimx", "section_counts='ddimx'"),
        (10, "3,,4", "section_counts='3,,4'"),
        (10, "ddim0", "section_counts='ddim0'"),
        (10, [], "at least one"),
        (3, [1, 1, 1, 1], "4 sections"),
    ],
)
def test_space_timesteps_errors(T, counts, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(T, counts)


def test_space_timesteps_type_errors():
    with pytest.raises(ValueError, match="num_timesteps"):
        space_timesteps(0, 1)
    with pytest.raises(TypeError, match="section_counts"):
        space_timesteps(10, True)
    with pytest.raises(TypeError, match="section_counts"):
        space_timesteps(10, [1.5])


# ---- respace ---------------------------------------------------------------------------------


def test_respace_odd_subset_against_original_betas():
    T = 100
    betas = torch.linspace(1e-4 * 10, 0.02 * 10, T, dtype=torch.float64)
    schedule = NoiseSchedule.linear(T, prediction_type="v_prediction")
    kept = [0, 3, 4, 17, 58, 99]
    spaced, tmap = respace(schedule, kept)

    assert tmap.dtype == torch.int64 and tmap.tolist() == kept
    assert spaced.prediction_type == "v_prediction" and spaced.num_timesteps == len(kept)
    # By hand from the original betas: a respaced step spans the original steps since the
    # previous kept one, so 1 - beta_new = prod(1 - beta_j) over that gap.
    new_betas, prev = [], -1
    for t in kept:
        new_betas.append(1 - torch.prod(1 - betas[prev + 1 : t + 1]).item())
        prev = t
    new_betas = torch.tensor(new_betas, dtype=torch.float64)
    abar_hand = torch.cumprod(1 - new_betas, 0)
    torch.testing.assert_close(spaced.alphas_cumprod, abar_hand, rtol=1e-12, atol=0)
    abar = spaced.alphas_cumprod
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    torch.testing.assert_close(1 - abar / abar_prev, new_betas, rtol=1e-9, atol=1e-15)
    # The sampler's DDPM posterior variance ("fixed small") against the hand betas.
    var_hand = new_betas * (1 - torch.cat([torch.ones(1, dtype=torch.float64), abar_hand[:-1]]))
    var_hand = var_hand / (1 - abar_hand)
    coefs = _step_coefficients(abar, "ddpm", 0.0)
    var_sampler = torch.tensor([c["std"] ** 2 for c in coefs], dtype=torch.float64)
    torch.testing.assert_close(var_sampler[1:], var_hand[1:], rtol=1e-9, atol=0)
    assert var_sampler[0] == 0  # no noise at the last step


def test_respace_all_steps_is_identity():
    schedule = NoiseSchedule.cosine(37)
    spaced, tmap = respace(schedule, range(37))
    assert torch.equal(spaced.alphas_cumprod, schedule.alphas_cumprod)
    assert torch.equal(tmap, torch.arange(37))
    spaced_set, _ = respace(schedule, {5, 1, 9})
    assert torch.equal(spaced_set.alphas_cumprod, schedule.alphas_cumprod[[1, 5, 9]])


@pytest.mark.parametrize(
    "use, match",
    [
        ([3, 1], "strictly increasing"),
        ([1, 1, 2], "strictly increasing"),
        ([0, 10], r"\[0, 10\)"),
        ([-1, 2], r"\[0, 10\)"),
        ([], "at least one"),
    ],
)
def test_respace_errors(use, match):
    with pytest.raises(ValueError, match=f"use_timesteps.*{match}|{match}"):
        respace(NoiseSchedule.cosine(10), use)


def test_respace_type_errors():
    with pytest.raises(TypeError, match="use_timesteps"):
        respace(NoiseSchedule.cosine(10), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="use_timesteps"):
        respace(NoiseSchedule.cosine(10), [0, 1.0])


# ---- the Gaussian oracle ---------------------------------------------------------------------


def oracle(schedule, kind="epsilon", mu=MU, s=S):
    """The exact denoiser for x0 ~ N(mu, s^2) per pixel. With a = abar_t, x_t = sqrt(a) x0 +
    sqrt(1-a) eps is Gaussian with variance d = a s^2 + 1 - a, so
    E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / d,  E[x0 | x_t] = mu + sqrt(a) s^2 (x_t -
    sqrt(a) mu) / d, and E[v | x_t] = sqrt(a) E[eps | x_t] - sqrt(1-a) E[x0 | x_t]."""
    table = schedule.alphas_cumprod

    def model(x, t):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        a = table[t].view(-1, 1, 1, 1)
        xd = x.double()
        d = a * s * s + 1 - a
        eps = (1 - a).sqrt() * (xd - a.sqrt() * mu) / d
        x0 = mu + a.sqrt() * s * s * (xd - a.sqrt() * mu) / d
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}
        return out[kind].to(x.dtype)

    return model


@pytest.mark.parametrize("a", [0.999, 0.5, 0.02])
def test_oracle_is_the_conditional_mean(a):
    g = torch.Generator().manual_seed(1)
    n = 100_000
    x0 = MU + S * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    schedule = NoiseSchedule(torch.tensor([a], dtype=torch.float64))
    t = torch.zeros(n, dtype=torch.int64)
    view = xt.view(n, 1, 1, 1)
    eps_hat = oracle(schedule, "epsilon")(view, t).flatten()
    x0_hat = oracle(schedule, "sample")(view, t).flatten()
    v_hat = oracle(schedule, "v_prediction")(view, t).flatten()
    # Jointly Gaussian: the conditional mean is the affine predictor whose residual is
    # orthogonal to 1 and x_t; 6 standard errors of each sample moment.
    for target, hat in ((eps, eps_hat), (x0, x0_hat)):
        r = target - hat
        assert abs(r.mean()) < 6 * r.std() / math.sqrt(n)
        assert abs((r * xt).mean()) < 6 * (r * xt).std() / math.sqrt(n)
    torch.testing.assert_close(math.sqrt(a) * x0_hat + math.sqrt(1 - a) * eps_hat, xt)
    torch.testing.assert_close(v_hat, math.sqrt(a) * eps_hat - math.sqrt(1 - a) * x0_hat)


def affine_map(abar, method, eta, mu=MU, s=S):
    """With the oracle and clip=False a step is x' = A x + B + std z; returns the per-step
    (A, B, std) list in sampling order, derived independently of the sampler."""
    out = []
    for i in reversed(range(len(abar))):
        a, ap = abar[i], (abar[i - 1] if i > 0 else 1.0)
        g = math.sqrt(1 - a) / (a * s * s + 1 - a)
        e_a, e_b = g, -g * math.sqrt(a) * mu  # eps_hat = e_a x + e_b
        x_a, x_b = (
            (1 - math.sqrt(1 - a) * e_a) / math.sqrt(a),
            -math.sqrt(1 - a) * e_b / math.sqrt(a),
        )
        if method == "ddpm":
            beta = 1 - a / ap
            c1, c2 = beta * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - beta) / (1 - a)
            std = math.sqrt(beta * (1 - ap) / (1 - a)) if i > 0 else 0.0
            out.append((c1 * x_a + c2, c1 * x_b, std))
        else:
            sig = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
            d = math.sqrt(1 - ap - sig**2)
            out.append((math.sqrt(ap) * x_a + d * e_a, math.sqrt(ap) * x_b + d * e_b, sig))
    return out


def predicted_moments(abar, method, eta):
    """Exact mean and std of the sampler's output for x_T ~ N(0, 1)."""
    m, v = 0.0, 1.0
    for A, B, std in affine_map(abar, method, eta):
        m, v = A * m + B, A * A * v + std * std
    return m, math.sqrt(v)


def kept_abar(schedule, steps, method):
    if steps is None:
        kept = list(range(schedule.num_timesteps))
    elif method == "ddim":
        kept = space_timesteps(schedule.num_timesteps, f"ddim{steps}")
    else:
        kept = space_timesteps(schedule.num_timesteps, steps)
    return schedule.alphas_cumprod[kept].tolist()


@pytest.mark.parametrize(
    "method, eta, steps",
    [
        pytest.param("ddpm", 0.0, None, id="ddpm-1000"),
        pytest.param("ddpm", 0.0, 100, id="ddpm-100"),
        pytest.param("ddpm", 0.0, 50, id="ddpm-50"),
        pytest.param("ddim", 1.0, 100, id="ddim-eta1-100"),
        pytest.param("ddim", 0.0, None, id="ddim-eta0-1000"),
    ],
)
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_oracle_samples_have_the_data_moments(method, eta, steps, kind):
    schedule = NoiseSchedule.linear(1000)
    x = sample(
        oracle(schedule, kind),
        schedule,
        BIG,
        steps=steps,
        method=method,
        eta=eta,
        prediction=kind,
        generator=0,
        clip=False,
    )
    assert x.dtype == torch.float32 and x.shape == BIG and x.device.type == "cpu"
    m, sd = predicted_moments(kept_abar(schedule, steps, method), method, eta)
    n = x.numel()
    # 6 standard errors of the sample mean and of the sample std.
    assert abs(x.mean().item() - m) < 6 * sd / math.sqrt(n)
    assert abs(x.std().item() - sd) < 6 * sd / math.sqrt(2 * n)
    # The exact moments themselves are those of the data, up to the discretisation: "fixed
    # small" variance loses spread with few steps (sd 0.252 at 50 steps).
    assert abs(m - MU) < 1e-3
    assert abs(sd - S) < {None: 0.02, 100: 0.1, 50: 0.17}[steps] * S


def test_ddim_eta0_is_the_deterministic_affine_map():
    schedule = NoiseSchedule.linear(1000)
    x_T = torch.randn(BIG, generator=torch.Generator().manual_seed(3))
    model = oracle(schedule)
    a = sample(model, schedule, x_T, steps=100, method="ddim", clip=False, generator=1)
    b = sample(model, schedule, x_T, steps=100, method="ddim", clip=False, generator=2)
    assert torch.equal(a, b)  # eta=0: the reverse noise is drawn but never used
    A, B = 1.0, 0.0
    for Ai, Bi, std in affine_map(kept_abar(schedule, 100, "ddim"), "ddim", 0.0):
        assert std == 0.0
        A, B = Ai * A, Ai * B + Bi
    torch.testing.assert_close(a, (A * x_T.double() + B).float(), rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "method, eta, clip",
    [("ddpm", 0.0, True), ("ddpm", 0.0, False), ("ddim", 0.5, True), ("ddim", 0.0, False)],
)
def test_prediction_types_agree(method, eta, clip):
    schedule = NoiseSchedule.linear(200)
    shape = (5, 2, 7, 3)
    # mu, s large enough that clip=True actually clamps some x0_hat
    out = {
        kind: sample(
            oracle(schedule, kind, mu=0.5, s=0.6),
            schedule,
            shape,
            steps=20,
            method=method,
            eta=eta,
            prediction=kind,
            generator=11,
            clip=clip,
        )
        for kind in ("epsilon", "v_prediction", "sample")
    }
    torch.testing.assert_close(out["v_prediction"], out["epsilon"], rtol=0, atol=2e-5)
    torch.testing.assert_close(out["sample"], out["epsilon"], rtol=0, atol=2e-5)


def test_zero_terminal_snr():
    schedule = NoiseSchedule.linear(100).rescale_zero_terminal_snr()
    assert schedule.alphas_cumprod[-1] == 0
    with pytest.raises(ValueError, match="abar == 0"):
        sample(oracle(schedule), schedule, (2, 1, 4, 4), steps=10, generator=0)
    for method in ("ddpm", "ddim"):
        x = sample(
            oracle(schedule, "v_prediction"),
            schedule,
            BIG,
            steps=50,
            method=method,
            prediction="v_prediction",
            generator=0,
            clip=False,
        )
        assert torch.isfinite(x).all()
        assert abs(x.mean().item() - MU) < 0.01


# ---- noise order: a guided-diffusion-style re-implementation -------------------------------


def reference_sample(model, betas, kept, shape, seed, method, eta, clip):
    """guided-diffusion's SpacedDiffusion + p_sample_loop / ddim_sample_loop in float64, with
    the documented draws: x_T, then one tensor per step before the model call."""
    abar_orig = torch.cumprod(1 - betas, 0)
    new_betas, last = [], 1.0
    for i, ac in enumerate(abar_orig.tolist()):
        if i in kept:
            new_betas.append(1 - ac / last)
            last = ac
    b = torch.tensor(new_betas, dtype=torch.float64)
    ac = torch.cumprod(1 - b, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = b * (1 - ac_prev) / (1 - ac)
    log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = b * ac_prev.sqrt() / (1 - ac)
    coef2 = (1 - ac_prev) * (1 - b).sqrt() / (1 - ac)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).double()
    for i in reversed(range(len(kept))):
        z = torch.randn(shape, generator=g).double()
        t = torch.full((shape[0],), kept[i], dtype=torch.int64)
        eps = model(x.float(), t).double()
        x0 = (1 / ac[i]).sqrt() * x - (1 / ac[i] - 1).sqrt() * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        nonzero = float(i != 0)
        if method == "ddpm":
            x = coef1[i] * x0 + coef2[i] * x + nonzero * (0.5 * log_var[i]).exp() * z
        else:
            eps = ((1 / ac[i]).sqrt() * x - x0) / (1 / ac[i] - 1).sqrt()
            sig = eta * ((1 - ac_prev[i]) / (1 - ac[i]) * (1 - ac[i] / ac_prev[i])).sqrt()
            x = x0 * ac_prev[i].sqrt() + (1 - ac_prev[i] - sig**2).sqrt() * eps + nonzero * sig * z
    return x.float()


MODELS = {
    "zeros": lambda x, t: torch.zeros_like(x),
    "const": lambda x, t: torch.full_like(x, 0.4),
    "tanh": lambda x, t: 0.5 * torch.tanh(x * (1 + t.view(-1, 1, 1, 1) / 50)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "method, eta, clip", [("ddpm", 0.0, True), ("ddpm", 0.0, False), ("ddim", 0.7, True)]
)
def test_matches_reference_with_documented_noise_order(name, method, eta, clip):
    T = 50
    schedule = NoiseSchedule.linear(T)
    betas = torch.linspace(1e-4 * 20, 0.02 * 20, T, dtype=torch.float64)
    shape = (3, 2, 5, 7)
    kept = space_timesteps(T, 3)
    assert kept == [0, 24, 49]
    got = sample(
        MODELS[name], schedule, shape, steps="3", method=method, eta=eta, generator=7, clip=clip
    )
    want = reference_sample(MODELS[name], betas, kept, shape, 7, method, eta, clip)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_two_models_see_the_same_noise():
    schedule = NoiseSchedule.linear(50)
    seen = {}

    def recorder(name, fn):
        def model(x, t):
            seen.setdefault(name, []).append(x.clone())
            return fn(x, t)

        return model

    shape = (4, 1, 6, 6)
    sample(recorder("oracle", oracle(schedule)), schedule, shape, steps=5, generator=3)
    sample(recorder("zeros", MODELS["zeros"]), schedule, shape, steps=5, generator=3)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seen["oracle"][0], x_T) and torch.equal(seen["zeros"][0], x_T)
    assert not torch.equal(seen["oracle"][1], seen["zeros"][1])


def test_generator_advances_by_one_draw_per_step():
    schedule = NoiseSchedule.linear(40)
    shape = (3, 1, 4, 5)
    for method, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)):
        g = torch.Generator().manual_seed(8)
        sample(MODELS["tanh"], schedule, shape, steps=6, method=method, eta=eta, generator=g)
        fresh = torch.Generator().manual_seed(8)
        for _ in range(1 + 6):  # x_T, then one per step including the unused last one
            torch.randn(shape, generator=fresh)
        assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=fresh))


def test_given_x_T_continues_the_stream():
    schedule = NoiseSchedule.linear(40)
    model = MODELS["tanh"]
    shape = (3, 1, 4, 5)
    from_shape = sample(model, schedule, shape, steps=6, generator=5)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(shape, generator=g)
    assert torch.equal(sample(model, schedule, x_T, steps=6, generator=g), from_shape)


# ---- seeds, batching, model handling ---------------------------------------------------------


def test_seeds():
    schedule = NoiseSchedule.linear(30)
    model = MODELS["tanh"]
    shape = (2, 3, 4, 4)
    a = sample(model, schedule, shape, generator=1)
    assert torch.equal(a, sample(model, schedule, shape, generator=1))
    assert torch.equal(
        a, sample(model, schedule, shape, generator=torch.Generator().manual_seed(1))
    )
    assert not torch.allclose(a, sample(model, schedule, shape, generator=2))
    torch.manual_seed(9)
    b = sample(model, schedule, shape)
    torch.manual_seed(9)
    assert torch.equal(b, sample(model, schedule, shape))


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1) / 100)


@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 0.3)])
def test_batch_size_does_not_change_results(method, eta):
    schedule = NoiseSchedule.linear(60)
    shape = (10, 2, 5, 5)
    calls = []

    def model(x, t):
        calls.append(x.shape[0])
        return oracle(schedule)(x, t)

    full = sample(model, schedule, shape, steps=12, method=method, eta=eta, generator=4)
    assert set(calls) == {10}
    calls.clear()
    for bs in (3, 7, 10, 64):
        got = sample(
            model, schedule, shape, steps=12, method=method, eta=eta, generator=4, batch_size=bs
        )
        assert max(calls) == min(bs, 10)
        calls.clear()
        assert torch.equal(got, full), bs

    conv = _ConvNet()
    a = sample(conv, schedule, shape, steps=5, generator=4)
    b = sample(conv, schedule, shape, steps=5, generator=4, batch_size=3)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_model_gets_original_timesteps():
    schedule = NoiseSchedule.linear(1000)
    ts = []

    def model(x, t):
        ts.append(t)
        return torch.zeros_like(x)

    sample(model, schedule, (2, 1, 2, 2), steps=50, method="ddim", generator=0)
    assert [t[0].item() for t in ts] == list(range(980, -1, -20))
    assert all(t.dtype == torch.int64 and t.shape == (2,) and (t == t[0]).all() for t in ts)
    ts.clear()
    sample(model, NoiseSchedule.cosine(10), (1, 1, 2, 2), steps=7, method="ddim", generator=0)
    assert [t.item() for t in ts][::-1] == space_timesteps(10, 7)  # no ddim7 for T=10
    ts.clear()
    sample(model, schedule, (1, 1, 2, 2), steps="2,3", generator=0)
    assert [t.item() for t in ts][::-1] == space_timesteps(1000, [2, 3])


def test_nan_output_names_the_step():
    schedule = NoiseSchedule.linear(100)
    bad_t = space_timesteps(100, 10)[-4]  # the 4th step sampled

    def model(x, t):
        return torch.full_like(x, math.nan) if t[0] == bad_t else torch.zeros_like(x)

    with pytest.raises(ValueError, match=rf"step 3 of 10 \(timestep t={bad_t}"):
        sample(model, schedule, (2, 1, 3, 3), steps=10, generator=0)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 1, 1)
        self.b = torch.nn.Dropout(0.5)
        self.modes = []

    def forward(self, x, t):
        self.modes.append((self.training, self.a.training, self.b.training))
        return self.b(self.a(x)).double()  # a float64 output is returned as float32


def test_eval_mode_and_training_flags_restored():
    net = _Net()
    net.train()
    net.a.eval()
    schedule = NoiseSchedule.cosine(20)
    x = sample(net, schedule, (2, 1, 4, 4), steps=4, generator=0)
    assert x.dtype == torch.float32
    assert set(net.modes) == {(False, False, False)}
    assert (net.training, net.a.training, net.b.training) == (True, False, True)
    assert all(p.grad is None for p in net.parameters())

    def broken(x, t):
        raise RuntimeError("boom")

    net.forward = broken
    with pytest.raises(RuntimeError, match="boom"):
        sample(net, schedule, (2, 1, 4, 4), steps=4, generator=0)
    assert (net.training, net.a.training, net.b.training) == (True, False, True)


def test_progress_bar_runs(capsys):
    schedule = NoiseSchedule.cosine(20)
    sample(MODELS["zeros"], schedule, (1, 1, 2, 2), steps=3, generator=0, progress=True)
    assert "sampling" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "euler"}, "method must be one of"),
        ({"eta": -0.1, "method": "ddim"}, "eta must be"),
        ({"eta": 0.5}, "eta=0.5 only applies"),
        ({"eta": 3.0, "method": "ddim"}, "eta=3.0 is too large"),
        ({"steps": 0}, r"steps must lie in \[1, 20\]"),
        ({"steps": 21}, r"steps must lie in \[1, 20\]"),
        ({"steps": "abc"}, "steps='abc'"),
        ({"steps": "30"}, "steps='30'"),
        ({"steps": "ddim8"}, "steps='ddim8'"),
        ({"prediction": "x0"}, "prediction must be one of"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"shape_or_noise": (2, 4, 4)}, "shape_or_noise must be 4 positive ints"),
        ({"shape_or_noise": (2, 1, 0, 4)}, "shape_or_noise must be 4 positive ints"),
        ({"shape_or_noise": torch.zeros(2, 4, 4)}, r"x_T \[N, C, H, W\]"),
        ({"shape_or_noise": torch.full((1, 1, 2, 2), math.nan)}, "non-finite"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    kwargs = {"shape_or_noise": (2, 1, 4, 4), "generator": 0, **kwargs}
    shape = kwargs.pop("shape_or_noise")
    with pytest.raises(ValueError, match=match):
        sample(MODELS["zeros"], NoiseSchedule.cosine(20), shape, **kwargs)


def test_type_errors_and_bad_outputs():
    schedule = NoiseSchedule.cosine(20)
    with pytest.raises(TypeError, match="generator"):
        sample(MODELS["zeros"], schedule, (1, 1, 2, 2), generator="seed")
    with pytest.raises(TypeError, match="steps"):
        sample(MODELS["zeros"], schedule, (1, 1, 2, 2), steps=2.5)
    with pytest.raises(TypeError, match="model must be callable"):
        sample("unet", schedule, (1, 1, 2, 2))
    # 2C channels are a learned variance (see the learned-variance tests); 3C is refused.
    with pytest.raises(ValueError, match=r"model output has shape \(1, 3, 2, 2\)"):
        sample(lambda x, t: torch.cat([x, x, x], 1), schedule, (1, 1, 2, 2), generator=0)


# ---- learned variance ------------------------------------------------------------------------


def with_variance(model, v):
    """A 2C model: ``model``'s prediction, then the variance channels ``v(x, t)``."""

    def fn(x, t):
        return torch.cat([model(x, t), v(x, t)], 1)

    return fn


def reference_learned_sample(model, betas, kept, shape, seed, clip):
    """guided-diffusion's p_sample_loop with LEARNED_RANGE on the respaced schedule, in
    float64, with the documented draws."""
    abar_orig = torch.cumprod(1 - betas, 0)
    new_betas, last = [], 1.0
    for i, ac in enumerate(abar_orig.tolist()):
        if i in kept:
            new_betas.append(1 - ac / last)
            last = ac
    b = torch.tensor(new_betas, dtype=torch.float64)
    ac = torch.cumprod(1 - b, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = b * (1 - ac_prev) / (1 - ac)
    min_log = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    max_log = torch.log(b)
    coef1 = b * ac_prev.sqrt() / (1 - ac)
    coef2 = (1 - ac_prev) * (1 - b).sqrt() / (1 - ac)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).double()
    C = shape[1]
    for i in reversed(range(len(kept))):
        z = torch.randn(shape, generator=g).double()
        t = torch.full((shape[0],), kept[i], dtype=torch.int64)
        out = model(x.float(), t).double()
        eps, v = out[:, :C], out[:, C:]
        x0 = (1 / ac[i]).sqrt() * x - (1 / ac[i] - 1).sqrt() * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        frac = (v + 1) / 2
        log_var = frac * max_log[i] + (1 - frac) * min_log[i]
        x = coef1[i] * x0 + coef2[i] * x + float(i != 0) * (0.5 * log_var).exp() * z
    return x.float()


@pytest.mark.parametrize(
    "name, v",
    [
        pytest.param("small", lambda x, t: torch.full_like(x, -1.0), id="v=-1"),
        pytest.param("large", lambda x, t: torch.full_like(x, 1.0), id="v=+1"),
        pytest.param("learned", lambda x, t: 1.2 * torch.tanh(2 * x), id="v=1.2tanh(2x)"),
    ],
)
@pytest.mark.parametrize("clip", [True, False])
def test_learned_variance_matches_guided_diffusion(name, v, clip):
    T = 50
    schedule = NoiseSchedule.linear(T)
    betas = torch.linspace(1e-4 * 20, 0.02 * 20, T, dtype=torch.float64)
    shape = (3, 2, 5, 7)
    model = with_variance(MODELS["tanh"], v)
    got = sample(model, schedule, shape, steps="5", generator=7, clip=clip)
    kept = space_timesteps(T, 5)
    want = reference_learned_sample(model, betas, kept, shape, 7, clip)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if name == "small":
        # frac = 0 is the fixed-small sampler: log(beta_tilde clipped) = log(beta_tilde) at
        # every step that adds noise.
        fixed = sample(MODELS["tanh"], schedule, shape, steps="5", generator=7, clip=clip)
        torch.testing.assert_close(got, fixed, rtol=1e-5, atol=1e-5)


def test_learned_variance_widens_the_oracle_samples():
    """v = +1 (beta, "fixed large") on the Gaussian oracle: more spread than fixed small with
    few steps, and the exact moments of the affine chain."""
    schedule = NoiseSchedule.linear(1000)
    kept = space_timesteps(1000, 50)
    abar = schedule.alphas_cumprod[kept].tolist()
    model = with_variance(oracle(schedule), lambda x, t: torch.ones_like(x))
    x = sample(model, schedule, BIG, steps=50, generator=0, clip=False)
    m, var = 0.0, 1.0
    for i in reversed(range(len(abar))):
        a, ap = abar[i], abar[i - 1] if i > 0 else 1.0
        d = a * S * S + 1 - a
        beta = 1 - a / ap
        c1, c2 = beta * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - beta) / (1 - a)
        # x0_hat = mu + sqrt(a) s^2 (x - sqrt(a) mu) / d is affine in x
        A = c1 * math.sqrt(a) * S * S / d + c2
        B = c1 * (MU - a * S * S * MU / d)
        m, var = A * m + B, A * A * var + (beta if i > 0 else 0.0)
    n = x.numel()
    assert abs(x.mean().item() - m) < 6 * math.sqrt(var / n)
    assert abs(x.std().item() - math.sqrt(var)) < 6 * math.sqrt(var / (2 * n))
    fixed = sample(oracle(schedule), schedule, BIG, steps=50, generator=0, clip=False)
    assert x.std() > fixed.std() * 1.1


@pytest.mark.parametrize("method", ["ddim", "dpm++2m", "unipc"])
def test_other_methods_ignore_the_variance_channels(method):
    schedule = NoiseSchedule.linear(60)
    shape = (2, 3, 4, 5)
    model = with_variance(MODELS["tanh"], lambda x, t: torch.tanh(x))
    got = sample(model, schedule, shape, steps=6, method=method, generator=1)
    want = sample(MODELS["tanh"], schedule, shape, steps=6, method=method, generator=1)
    assert torch.equal(got, want)


# ---- DPM-Solver++(2M) and UniPC against float64 re-derivations -------------------------------


def _points(schedule, kept):
    """alpha, sigma, lambda at the kept steps from the noisiest down, then the clean end."""
    abar = schedule.alphas_cumprod[list(reversed(kept))].tolist()
    alpha = [math.sqrt(a) for a in abar] + [1.0]
    sigma = [math.sqrt(1 - a) for a in abar] + [0.0]
    lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1], strict=True)] + [math.inf]
    return alpha, sigma, lam


def _x0(model, x, t, a, prediction, clip):
    out = model(x.float(), torch.full((x.shape[0],), t, dtype=torch.int64)).double()
    if prediction == "epsilon":
        x0 = (x - math.sqrt(1 - a) * out) / math.sqrt(a)
    elif prediction == "v_prediction":
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * out
    else:
        x0 = out
    return x0.clamp(-1, 1) if clip else x0


def reference_dpmpp_2m(model, schedule, kept, x_T, prediction, clip):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in float64, step by step: x_i =
    (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i with D_i = (1 + 1/(2 r_i))
    m_{i-1} - m_{i-2} / (2 r_i), r_i = h_{i-1} / h_i; D_i = m_{i-1} at the first step, into the
    kept step 0 and from it (where sigma = 0 and x = m)."""
    alpha, sigma, lam = _points(schedule, kept)
    S = len(kept)
    x, prev = x_T.double(), None
    for k in range(S):
        t = kept[S - 1 - k]
        m = _x0(model, x, t, alpha[k] ** 2, prediction, clip)
        if k == S - 1:
            x = m
            break
        h = lam[k + 1] - lam[k]
        if k == 0 or k >= S - 2:
            D = m
        else:
            r = (lam[k] - lam[k - 1]) / h
            D = (1 + 1 / (2 * r)) * m - prev / (2 * r)
        x = sigma[k + 1] / sigma[k] * x - alpha[k + 1] * math.expm1(-h) * D
        prev = m
    return x.float()


def reference_unipc(model, schedule, kept, x_T, prediction, clip):
    """diffusers' UniPCMultistepScheduler.step (bh2, solver_order=2, predict_x0) ported to
    float64 with its R-matrix solve, over the same points; the one difference is the order
    rule: first order at the first step, into the kept step 0 and from it (module docstring)."""
    alpha, sigma, lam = _points(schedule, kept)
    S = len(kept)
    x = x_T.double()
    outputs, last_sample, this_order = [], None, 1
    for k in range(S):
        m = _x0(model, x, kept[S - 1 - k], alpha[k] ** 2, prediction, clip)
        if k > 0:  # UniC on x with the new output
            h = lam[k] - lam[k - 1]
            m0 = outputs[-1]
            rks, D1s = [], []
            for i in range(1, this_order):
                rk = (lam[k - 1 - i] - lam[k - 1]) / h
                rks.append(rk)
                D1s.append((outputs[-(i + 1)] - m0) / rk)
            rks.append(1.0)
            hh = -h
            h_phi_1 = math.expm1(hh)
            h_phi_k = h_phi_1 / hh - 1
            B_h = math.expm1(hh)
            R, b, factorial_i = [], [], 1
            for i in range(1, this_order + 1):
                R.append([r ** (i - 1) for r in rks])
                b.append(h_phi_k * factorial_i / B_h)
                factorial_i *= i + 1
                h_phi_k = h_phi_k / hh - 1 / factorial_i
            if this_order == 1:
                rhos_c = [0.5]
            else:
                rhos_c = torch.linalg.solve(
                    torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
                ).tolist()
            corr = sum(rho * d for rho, d in zip(rhos_c[:-1], D1s, strict=True))
            x = (sigma[k] / sigma[k - 1]) * last_sample - alpha[k] * h_phi_1 * m0
            x = x - alpha[k] * B_h * (corr + rhos_c[-1] * (m - m0))
        outputs.append(m)
        this_order = 1 if k == 0 or k >= S - 2 else 2
        last_sample = x
        if k == S - 1:
            x = m  # sigma = 0: the predictor returns the data prediction
            break
        h = lam[k + 1] - lam[k]
        hh = -h
        h_phi_1 = math.expm1(hh)
        B_h = math.expm1(hh)
        x_new = sigma[k + 1] / sigma[k] * x - alpha[k + 1] * h_phi_1 * m
        if this_order == 2:
            rk = (lam[k - 1] - lam[k]) / h
            x_new = x_new - alpha[k + 1] * B_h * 0.5 * (outputs[-2] - m) / rk
        x = x_new
    return x.float()


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize(
    "kind, clip", [("epsilon", False), ("epsilon", True), ("v_prediction", False)]
)
@pytest.mark.parametrize("method", ["dpm++2m", "unipc"])
def test_multistep_matches_reference(method, kind, clip, steps):
    T = 50
    schedule = NoiseSchedule.linear(T)
    shape = (3, 2, 5, 7)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(steps))
    model = MODELS["tanh"]
    got = sample(
        model, schedule, x_T, steps=steps, method=method, prediction=kind, clip=clip, generator=0
    )
    ref = reference_dpmpp_2m if method == "dpm++2m" else reference_unipc
    want = ref(model, schedule, space_timesteps(T, steps), x_T, kind, clip)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_unipc_corrects_dpmpp_and_one_step_is_ddim():
    schedule = NoiseSchedule.cosine(100)
    shape = (2, 1, 4, 4)
    model = MODELS["tanh"]
    a = sample(model, schedule, shape, steps=12, method="dpm++2m", generator=2)
    b = sample(model, schedule, shape, steps=12, method="unipc", generator=2)
    assert not torch.allclose(a, b, atol=1e-4)
    # With 1 or 2 steps every update is first order: DPM-Solver-1 is DDIM with eta = 0.
    for steps in (1, 2):
        want = sample(model, schedule, shape, steps=str(steps), method="ddim", generator=2)
        for method in ("dpm++2m", "unipc"):
            got = sample(model, schedule, shape, steps=steps, method=method, generator=2)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- order of convergence on Gaussian data ---------------------------------------------------
#
# For x0 ~ N(mu, s^2) per pixel the marginal of x_t = alpha x0 + sigma eps is
# N(alpha mu, d), d = alpha^2 s^2 + sigma^2, and the probability-flow ODE, whose velocity is
# affine in x, moves every x along its standardised value: (x - alpha mu) / sqrt(d) is constant
# (in 1-D the flow map is increasing and pushes one Gaussian onto the next, which leaves only
# this map). From x_T at the noisiest step to the clean end that is
# x_0 = mu + s (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2).
# The DDPM samplers stop at the kept step 0 (abar < 1) and return x0_hat there, so their exact
# target is the ODE map to step 0 followed by that denoiser; flow samplers end at sigma = 0.

ORDER_STEPS = (20, 28, 40, 57, 80)
# abar with lambda = log(alpha / sigma) linear in t (from 5 to -5): even t spacing is even in
# lambda, where a solver's order shows from few steps on.
LAMBDA_UNIFORM = NoiseSchedule(torch.sigmoid(2 * torch.linspace(5, -5, 1000, dtype=torch.float64)))
X_T_GRID = torch.linspace(-2.5, 2.5, 11).view(1, 1, 1, 11)


def ddpm_ode_target(schedule, x_T, mu=MU, s=S):
    abar = schedule.alphas_cumprod
    aT, a0 = abar[-1].item(), abar[0].item()
    dT, d0 = aT * s * s + 1 - aT, a0 * s * s + 1 - a0
    x_step0 = math.sqrt(a0) * mu + math.sqrt(d0 / dT) * (x_T.double() - math.sqrt(aT) * mu)
    return mu + math.sqrt(a0) * s * s * (x_step0 - math.sqrt(a0) * mu) / d0


def flow_oracle(T, mu=MU, s=S):
    """The exact u = E[eps - x0 | x_t] for x0 ~ N(mu, s^2), x_t = (1 - sig) x0 + sig eps, from
    the float timestep sig * T."""

    def model(x, t):
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        sig = (t.double() / T).view(-1, 1, 1, 1)
        a, xd = 1 - sig, x.double()
        d = a * a * s * s + sig * sig
        x0 = mu + a * s * s * (xd - a * mu) / d
        eps = sig * (xd - a * mu) / d
        return (eps - x0).to(x.dtype)

    return model


def fitted_order(errors, steps=ORDER_STEPS):
    """-slope of log(error) against log(steps), least squares."""
    lx = [math.log(n) for n in steps]
    ly = [math.log(e) for e in errors]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    return -num / sum((a - mx) ** 2 for a in lx)


def ddpm_errors(method, schedule, steps=ORDER_STEPS):
    target = ddpm_ode_target(schedule, X_T_GRID)
    errors = []
    for n in steps:
        # str(n): the even spacing with steps 0 and T-1 for every method (ddim included).
        x = sample(
            oracle(schedule),
            schedule,
            X_T_GRID,
            steps=str(n),
            method=method,
            clip=False,
            generator=0,
        )
        errors.append((x.double() - target).abs().max().item())
    return errors


# Measured on LAMBDA_UNIFORM over ORDER_STEPS: ddim 0.99, dpm++2m 1.96, unipc 3.00 (UniC
# raises UniP-2's order by one).
@pytest.mark.parametrize(
    "method, low, high", [("ddim", 0.9, 1.1), ("dpm++2m", 1.8, 2.3), ("unipc", 1.8, 3.4)]
)
def test_ddpm_solvers_converge_at_their_order(method, low, high):
    errors = ddpm_errors(method, LAMBDA_UNIFORM)
    order = fitted_order(errors)
    assert low < order < high, (order, errors)
    assert errors[-1] < {"ddim": 0.03, "dpm++2m": 1e-3, "unipc": 3e-4}[method], errors


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_second_order_solvers_beat_ddim_on_the_usual_schedules(name):
    schedule = getattr(NoiseSchedule, name)(1000)
    (ddim,) = ddpm_errors("ddim", schedule, [40])
    for method in ("dpm++2m", "unipc"):
        (err,) = ddpm_errors(method, schedule, [40])
        assert err < ddim / 3, (method, err, ddim)


# Measured: euler 1.01, heun 1.97 at shift 1; euler 0.97, heun 2.26 at shift 3, where the
# last sigma before 0 stays at shift(sigma_min) = 0.0089 whatever the number of steps (diffusers'
# spacing), so the last Euler step leaves an error floor of about 1e-5 that partly cancels the
# rest here: Heun's slope is looser there.
FLOW_ORDERS = [
    (1.0, "euler", 0.9, 1.1),
    (1.0, "heun", 1.85, 2.15),
    (3.0, "euler", 0.85, 1.1),
    (3.0, "heun", 1.5, 2.6),
]


@pytest.mark.parametrize("shift, method, low, high", FLOW_ORDERS)
def test_flow_solvers_converge_at_their_order(shift, method, low, high):
    T = 1000
    schedule = NoiseSchedule.flow_matching(T, shift=shift)
    target = MU + S * X_T_GRID.double()  # sigma_max = 1: x_T is pure noise
    errors = []
    for n in ORDER_STEPS:
        x = sample(
            flow_oracle(T), schedule, X_T_GRID, steps=n, method=method, clip=False, generator=0
        )
        errors.append((x.double() - target).abs().max().item())
    order = fitted_order(errors)
    assert low < order < high, (order, errors)


# ---- flow matching: diffusers' spacing and steps, the noise contract ---------------------------


@pytest.mark.parametrize("T, shift", [(1000, 1.0), (1000, 3.0), (100, 1.7)])
@pytest.mark.parametrize("steps", [1, 7, 28])
def test_flow_sigmas_match_diffusers(T, shift, steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    schedule = NoiseSchedule.flow_matching(T, shift=shift)
    scheduler.set_timesteps(steps)
    sigmas, timesteps = flow_sigmas(schedule, steps)
    assert sigmas.dtype == timesteps.dtype == torch.float32
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(timesteps, scheduler.timesteps, rtol=0, atol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_the_diffusers_loop(shift):
    diffusers = pytest.importorskip("diffusers")
    T, steps = 1000, 9
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    schedule = NoiseSchedule.flow_matching(T, shift=shift)
    model = MODELS["tanh"]
    x_T = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    got = sample(model, schedule, x_T, steps=steps, method="euler", clip=False, generator=0)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def reference_heun(model, sigmas, T, x_T):
    """Heun in float64 over the given sigmas; the last step (to 0) is Euler."""
    x = x_T.double()
    for k in range(len(sigmas) - 1):
        sig, nxt = sigmas[k], sigmas[k + 1]

        def u(x, sig):
            t = torch.full((x.shape[0],), sig, dtype=torch.float32) * T
            return model(x.float(), t).double()

        d = u(x, sig)
        x_e = x + (nxt - sig) * d
        x = x_e if nxt == 0 else x + (nxt - sig) * 0.5 * (d + u(x_e, nxt))
    return x.float()


def test_heun_matches_reference():
    T, steps = 200, 6
    schedule = NoiseSchedule.flow_matching(T, shift=2.0)
    x_T = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    model = MODELS["tanh"]
    sigmas, _ = flow_sigmas(schedule, steps)
    got = sample(model, schedule, x_T, steps=steps, method="heun", clip=False, generator=0)
    want = reference_heun(model, sigmas.tolist(), T, x_T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_flow_predictions_and_clip_agree(method):
    T = 100
    schedule = NoiseSchedule.flow_matching(T, shift=3.0)
    shape = (2, 1, 6, 5)

    def oracle_as(kind, mu=0.5, s=0.6):  # mu, s large enough that clip=True clamps some x0
        u_model = flow_oracle(T, mu, s)

        def model(x, t):
            sig = (t.double() / T).view(-1, 1, 1, 1)
            u = u_model(x, t).double()
            x0 = x.double() - sig * u
            eps = x.double() + (1 - sig) * u
            out = {"flow": u, "sample": x0, "v_prediction": (1 - sig) * eps - sig * x0}
            return out[kind].float()

        return model

    for clip in (False, True):
        out = {
            kind: sample(
                oracle_as(kind),
                schedule,
                shape,
                steps=8,
                method=method,
                prediction=kind,
                clip=clip,
                generator=3,
            )
            for kind in ("flow", "sample", "v_prediction")
        }
        torch.testing.assert_close(out["sample"], out["flow"], rtol=0, atol=2e-5)
        torch.testing.assert_close(out["v_prediction"], out["flow"], rtol=0, atol=2e-5)
        if clip:
            assert out["flow"].abs().max() <= 1
            plain = sample(
                oracle_as("flow"), schedule, shape, steps=8, method=method, clip=False, generator=3
            )
            assert plain.abs().max() > 1


def test_flow_model_gets_float_timesteps_and_default_method():
    T = 50
    schedule = NoiseSchedule.flow_matching(T, shift=3.0)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    shape = (2, 1, 3, 3)
    a = sample(model, schedule, shape, steps=5, generator=0)  # method=None: euler
    _, timesteps = flow_sigmas(schedule, 5)
    assert all(t.dtype == torch.float32 and t.shape == (2,) for t in seen)
    assert torch.equal(torch.stack([t[0] for t in seen]), timesteps)
    assert torch.equal(a, sample(model, schedule, shape, steps=5, method="euler", generator=0))
    seen.clear()
    sample(model, schedule, shape, steps=5, method="heun", generator=0)
    assert len(seen) == 2 * 5 - 1
    seen.clear()
    sample(model, schedule, shape, generator=0)  # steps=None: T steps
    assert len(seen) == T


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("euler", {}),
        ("heun", {}),
        ("dpm++2m", {}),
        ("unipc", {}),
        ("ddim", {"eta": 0.7}),
    ],
)
def test_new_methods_keep_the_noise_contract(method, kwargs):
    flow = method in ("euler", "heun")
    schedule = NoiseSchedule.flow_matching(40) if flow else NoiseSchedule.linear(40)
    shape = (3, 1, 4, 5)
    g = torch.Generator().manual_seed(8)
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return MODELS["tanh"](x, t)

    full = sample(model, schedule, shape, steps=6, method=method, generator=g, **kwargs)
    fresh = torch.Generator().manual_seed(8)
    assert torch.equal(seen[0], torch.randn(shape, generator=fresh))  # x_T first
    for _ in range(6):  # one per step, whatever the number of model calls
        torch.randn(shape, generator=fresh)
    assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=fresh))
    for bs in (1, 2):
        got = sample(
            MODELS["tanh"],
            schedule,
            shape,
            steps=6,
            method=method,
            generator=8,
            batch_size=bs,
            **kwargs,
        )
        assert torch.equal(got, full), bs


def test_flow_schedules_that_no_shift_builds_are_refused():
    schedule = NoiseSchedule._from_sigmas(
        "flow", torch.tensor([1.0, 0.9, 0.2]), torch.tensor([3.0, 2.7, 0.6]), "flow"
    )
    with pytest.raises(ValueError, match="follow no shift"):
        sample(MODELS["zeros"], schedule, (1, 1, 2, 2), generator=0)
    assert flow_sigmas(NoiseSchedule.flow_matching(1), 3)[0].tolist() == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "schedule, kwargs, match",
    [
        ("flow", {"method": "ddpm"}, r"method must be one of \('euler', 'heun'\) for a flow"),
        ("flow", {"method": "unipc"}, "for a flow schedule"),
        ("ddpm", {"method": "heun"}, "for a ddpm schedule, got 'heun'"),
        ("ddpm", {"method": "rk4"}, "method must be one of"),
        ("edm", {}, "runs ddpm and flow schedules"),
        ("ddpm", {"method": "dpm++2m", "eta": 0.5}, "eta=0.5 only applies"),
        ("flow", {"eta": 0.5}, "eta=0.5 only applies"),
        ("flow", {"prediction": "epsilon"}, "prediction must be one of"),
        ("ddpm", {"prediction": "flow"}, "prediction must be one of"),
        ("flow", {"steps": 0}, "steps must be at least 1"),
        ("flow", {"steps": "ddim5"}, "steps='ddim5'"),
        ("ddpm", {"method": "unipc", "steps": 21}, r"steps must lie in \[1, 20\]"),
        ("flow", {"model": lambda x, t: torch.cat([x, x], 1)}, r"\(2, 1, 4, 4\);"),
        ("ddpm", {"model": lambda x, t: x[:, :, :2]}, r"\(2, 1, 4, 4\) or \(2, 2, 4, 4\)"),
    ],
)
def test_new_errors_name_the_argument(schedule, kwargs, match):
    schedules = {
        "ddpm": NoiseSchedule.cosine(20),
        "flow": NoiseSchedule.flow_matching(20),
        "edm": NoiseSchedule.edm(20),
    }
    model = kwargs.pop("model", MODELS["zeros"])
    with pytest.raises(ValueError, match=match):
        sample(model, schedules[schedule], (2, 1, 4, 4), generator=0, **kwargs)
    with pytest.raises(TypeError, match="steps must be None or an int"):
        sample(model, schedules["flow"], (2, 1, 4, 4), generator=0, steps=2.5)


def test_methods_are_listed():
    assert METHODS == DDPM_METHODS + FLOW_METHODS
    assert set(DDPM_METHODS) == {"ddpm", "ddim", "dpm++2m", "unipc"}
    assert set(FLOW_METHODS) == {"euler", "heun"}
    assert DEFAULT_METHOD == {"ddpm": "ddpm", "flow": "euler"}
