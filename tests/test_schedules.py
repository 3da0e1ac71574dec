"""The flow-matching and EDM families against diffusers' schedulers and training scripts."""

import math

import pytest
import torch

import debias
from debias import NoiseSchedule, sample_timesteps

diffusers = pytest.importorskip("diffusers")
from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.training_utils import compute_density_for_timestep_sampling  # noqa: E402


def _get_sigmas(scheduler, timesteps, n_dim, dtype):
    """get_sigmas of diffusers' train_dreambooth_lora_sd3.py / _flux.py, on the CPU."""
    sigmas = scheduler.sigmas.to(dtype=dtype)
    schedule_timesteps = scheduler.timesteps
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


@pytest.mark.parametrize("T", [1000, 7])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_tables_equal_diffusers(T, shift):
    ours = NoiseSchedule.flow_matching(T, shift=shift)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    assert torch.equal(ours.timesteps, theirs.timesteps[:T])
    assert torch.equal(ours.sigmas, theirs.sigmas[:T])
    adopted = debias.schedules.as_schedule(theirs)
    assert adopted.family == "flow" and adopted.prediction_type == "flow"
    assert torch.equal(adopted.sigmas, ours.sigmas)
    torch.testing.assert_close(ours.alpha, 1 - ours.sigma, rtol=0, atol=0)
    torch.testing.assert_close(ours.snr, ((1 - ours.sigma) / ours.sigma) ** 2, rtol=0, atol=0)


def test_edm_tables_equal_diffusers():
    ours = NoiseSchedule.edm(1000)
    theirs = EDMEulerScheduler(num_train_timesteps=1000)
    assert torch.equal(ours.sigmas, theirs.sigmas[:1000])
    assert torch.equal(ours.timesteps, theirs.timesteps[:1000])
    adopted = debias.schedules.as_schedule(theirs)
    assert adopted.family == "edm" and adopted.sigma_data == 0.5
    assert torch.equal(adopted.timesteps, ours.timesteps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_index_and_noising_follow_the_scripts(shift, dtype):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 6, 7, generator=g).to(dtype), torch.randn(5, 4, 6, 7).to(dtype)
    timesteps = scheduler.timesteps[torch.tensor([0, 999, 17, 500, 17])]
    sigmas = _get_sigmas(scheduler, timesteps, x0.ndim, x0.dtype)
    expected = (1.0 - sigmas) * x0 + sigmas * noise
    for backend in ("torch", "cpu"):
        x_t, _ = debias.add_noise(x0, timesteps, scheduler, noise=noise, backend=backend)
        assert torch.equal(x_t, expected), backend
    schedule = debias.schedules.as_schedule(scheduler)
    index = schedule.index(timesteps)
    assert index.tolist() == [0, 999, 17, 500, 17]


def test_edm_noising_follows_the_scheduler():
    scheduler = EDMEulerScheduler(num_train_timesteps=1000)
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    timesteps = scheduler.timesteps[torch.tensor([0, 999, 3, 400])]
    expected = scheduler.add_noise(x0, noise, timesteps)
    for backend in ("torch", "cpu"):
        x_t, _ = debias.add_noise(x0, timesteps, scheduler, noise=noise, backend=backend)
        assert torch.equal(x_t, expected), backend


@pytest.mark.parametrize(
    "t, err, match",
    [
        (torch.tensor([0.5, 1000.0]), ValueError, r"t must hold timesteps"),
        (torch.tensor([float("nan"), 1000.0]), ValueError, r"t must hold timesteps"),
        (torch.tensor([1000, 999]), TypeError, r"t must be a float tensor"),
        ([1000.0, 999.0], TypeError, r"t must be a float torch.Tensor"),
        (torch.tensor([[1000.0], [999.0]]), ValueError, r"t must have shape"),
    ],
    ids=["not-in-table", "nan", "integer", "list", "2d"],
)
def test_flow_bad_timesteps_name_t(t, err, match):
    schedule = NoiseSchedule.flow_matching(1000)
    with pytest.raises(err, match=match):
        debias.add_noise(torch.zeros(2, 3), t, schedule)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sample_timesteps_equal_the_scripts(scheme, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    g = torch.Generator().manual_seed(7)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme, batch_size=64, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
        generator=g,
    )  # fmt: skip
    expected = scheduler.timesteps[(u * 1000).long()]
    g.manual_seed(7)
    ours = sample_timesteps(64, scheduler, scheme, generator=g)
    assert torch.equal(ours, expected)


def test_sample_timesteps_other_families_and_bad_arguments():
    g = torch.Generator().manual_seed(1)
    ddpm = sample_timesteps(8, NoiseSchedule.linear(1000), generator=g)
    assert ddpm.dtype == torch.int64 and ((ddpm >= 0) & (ddpm < 1000)).all()
    edm = NoiseSchedule.edm(1000)
    t = sample_timesteps(4000, edm, "lognormal", logit_mean=-1.2, logit_std=1.2, generator=g)
    ln_sigma = edm.sigma[edm.index(t)].log()
    # EDM's log-normal: ln sigma ~ N(-1.2, 1.2), up to the table's spacing
    assert abs(ln_sigma.mean().item() + 1.2) < 0.1 and abs(ln_sigma.std().item() - 1.2) < 0.1
    with pytest.raises(ValueError, match="scheme"):
        sample_timesteps(4, NoiseSchedule.linear(), "logit_normal")
    with pytest.raises(ValueError, match="batch_size"):
        sample_timesteps(0, edm)
    with pytest.raises(TypeError, match="logit_std"):
        sample_timesteps(4, edm, "lognormal", logit_std="1")


def test_family_weightings_on_their_own_schedules():
    flow = NoiseSchedule.flow_matching(1000, shift=3.0)
    sigma = flow.sigma
    w = debias.weight_table
    torch.testing.assert_close(w(flow, "sigma_sqrt"), sigma**-2.0, rtol=1e-15, atol=0)
    cosmap = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    torch.testing.assert_close(w(flow, "cosmap"), cosmap, rtol=1e-15, atol=0)
    for name in ("none", "logit_normal", "mode"):
        assert torch.equal(w(flow, name), torch.ones_like(sigma))
    torch.testing.assert_close(w(flow, "constant"), (1 - sigma) ** 2, rtol=1e-15, atol=0)
    torch.testing.assert_close(w(flow, "debias"), sigma * (1 - sigma), rtol=1e-12, atol=0)
    edm = NoiseSchedule.edm(1000)
    s, sd = edm.sigma, 0.5
    lam = (s**2 + sd**2) / (s * sd) ** 2
    torch.testing.assert_close(w(edm, "edm", "sample"), lam, rtol=1e-15, atol=0)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    torch.testing.assert_close(w(edm, "edm", "raw"), lam * c_out**2, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="flow schedules"):
        w(NoiseSchedule.linear(), "cosmap")
    with pytest.raises(ValueError, match="edm schedules"):
        w(flow, "edm")
    with pytest.raises(ValueError, match="raw"):
        w(flow, "debias", "raw")


@pytest.mark.parametrize("family", ["ddpm", "flow", "edm"])
def test_every_target_weighs_the_same_objective(family):
    """The real test of the conversion: for random x0, eps and a network's eps_hat at fixed
    x_t, the weighted squared error in every target's space is one number."""
    schedule = {"ddpm": NoiseSchedule.linear(1000), "flow": NoiseSchedule.flow_matching(1000, 3.0),
                "edm": NoiseSchedule.edm(1000)}[family]  # fmt: skip
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(1, 999, (64,), generator=g)  # away from snr = 0 where x0 is undefined
    a, s = schedule.alpha[idx][:, None], schedule.sigma[idx][:, None]
    x0, eps, eps_hat = (torch.randn(64, 10, dtype=torch.float64, generator=g) for _ in range(3))
    x_t = a * x0 + s * eps
    x0_hat = (x_t - s * eps_hat) / a
    targets = ["epsilon", "v_prediction", "sample", "flow"] + (["raw"] if family == "edm" else [])
    errors = {}
    for prediction in targets:
        p, q = debias.weighting.target_table(schedule, prediction, torch.float64)[:, idx, None]
        err = ((p * eps + q * x0) - (p * eps_hat + q * x0_hat)).square().sum(1)
        errors[prediction] = debias.weight_table(schedule, "min_snr", prediction)[idx] * err
    for prediction in targets[1:]:
        torch.testing.assert_close(errors[prediction], errors["epsilon"], rtol=1e-9, atol=0)


def test_scheduler_after_set_timesteps_is_refused():
    for scheduler in (FlowMatchEulerDiscreteScheduler(), EDMEulerScheduler()):
        scheduler.set_timesteps(20)
        with pytest.raises(ValueError, match="noise_scheduler_copy"):
            NoiseSchedule.from_diffusers(scheduler)
