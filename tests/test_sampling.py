"""Samplers against hand-computed respacing, a guided-diffusion-style re-implementation with the
documented noise order, and an analytic oracle: for Gaussian data the exact denoiser is known,
and every sampler step is affine in x_t, so the output distribution can be computed exactly."""

import math

import pytest
import torch

from debias import NoiseSchedule
from debias.pipeline.sampling import _step_coefficients, respace, sample, space_timesteps

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
