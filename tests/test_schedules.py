"""The flow-matching and EDM families against diffusers' schedulers and training scripts:
tables, timestep lookup, noising coefficients and timestep sampling. Weightings on these
families are in test_weighting.py."""

import copy

import pytest
import torch
from conftest import get_sigmas, step_indices

import debias
from debias import NoiseSchedule, sample_timesteps
from debias.schedules import as_schedule

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDPMScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.training_utils import compute_density_for_timestep_sampling  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _schedulers():
    """(id, diffusers scheduler, the equal debias schedule)."""
    return [
        ("flow-shift1", FlowMatchEulerDiscreteScheduler(1000), NoiseSchedule.flow_matching()),
        (
            "flow-shift3",
            FlowMatchEulerDiscreteScheduler(1000, shift=3.0),
            NoiseSchedule.flow_matching(1000, shift=3.0),
        ),
        ("edm", EDMEulerScheduler(num_train_timesteps=1000), NoiseSchedule.edm()),
    ]


SCHEDULERS = _schedulers()
IDS = [case[0] for case in SCHEDULERS]


# ---- tables -------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 7])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_tables_equal_diffusers(T, shift):
    ours = NoiseSchedule.flow_matching(T, shift=shift)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    assert theirs.sigmas.numel() == T  # no appended zero at construction
    assert ours.timesteps.dtype == ours.sigmas.dtype == torch.float32
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert ours.family == "flow" and ours.prediction_type == "flow" and len(ours) == T
    sigma = theirs.sigmas.double()
    assert torch.equal(ours.sigma, sigma) and torch.equal(ours.alpha, 1 - sigma)
    torch.testing.assert_close(ours.snr, ((1 - sigma) / sigma) ** 2, rtol=0, atol=0)
    vp = (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)
    torch.testing.assert_close(ours.alphas_cumprod, vp, rtol=0, atol=0)
    adopted = NoiseSchedule.from_diffusers(theirs)
    assert adopted.family == "flow" and adopted.prediction_type == "flow"
    assert torch.equal(adopted.sigmas, ours.sigmas)
    assert torch.equal(adopted.timesteps, ours.timesteps)


def test_flow_dynamic_shifting_trains_on_the_unshifted_tables():
    """Flux's scheduler shifts at inference only: its constructed tables are shift 1."""
    theirs = FlowMatchEulerDiscreteScheduler(1000, shift=3.0, use_dynamic_shifting=True)
    adopted = NoiseSchedule.from_diffusers(theirs)
    assert torch.equal(adopted.timesteps, NoiseSchedule.flow_matching(1000, 1.0).timesteps)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_train_timesteps": 7},
        {
            "sigma_min": 0.01,
            "sigma_max": 50.0,
            "rho": 5.0,
            "sigma_data": 1.0,
            "num_train_timesteps": 33,
        },
    ],
    ids=["default", "T7", "custom"],
)
def test_edm_tables_equal_diffusers(kwargs):
    theirs = EDMEulerScheduler(**kwargs)
    T = theirs.config.num_train_timesteps
    mine = {"num_train_timesteps": "num_timesteps"}
    ours = NoiseSchedule.edm(**{mine.get(k, k): v for k, v in kwargs.items()})
    # EDMEuler keeps T + 1 timesteps and T + 2 sigmas (a final 0); the script draws from T
    assert theirs.timesteps.numel() == T + 1 and theirs.sigmas.numel() == T + 2
    assert torch.equal(ours.sigmas, theirs.sigmas[:T])
    assert torch.equal(ours.timesteps, theirs.timesteps[:T])
    assert torch.equal(ours.timesteps, theirs.precondition_noise(theirs.sigmas[:T]))
    assert ours.family == "edm" and ours.prediction_type == "raw"
    assert ours.sigma_data == theirs.config.sigma_data
    assert torch.equal(ours.alpha, torch.ones(T, dtype=torch.float64))
    torch.testing.assert_close(ours.snr, ours.sigma**-2, rtol=1e-15, atol=0)
    adopted = NoiseSchedule.from_diffusers(theirs)
    assert adopted.family == "edm" and adopted.sigma_data == theirs.config.sigma_data
    assert torch.equal(adopted.timesteps, ours.timesteps)
    assert torch.equal(adopted.sigmas, ours.sigmas)


def test_edm_dpmsolver_and_v_prediction_schedulers():
    dpm = EDMDPMSolverMultistepScheduler(num_train_timesteps=7)
    adopted = NoiseSchedule.from_diffusers(dpm)
    assert torch.equal(adopted.timesteps, dpm.timesteps) and len(adopted) == 7
    # diffusers' "v_prediction" EDM negates c_out in precondition_outputs: the raw target
    # follows it (with sigma_data = 1 it is then the variance-preserving v)
    v = NoiseSchedule.from_diffusers(
        EDMEulerScheduler(sigma_data=1.0, prediction_type="v_prediction")
    )
    assert v.c_out_sign == -1.0 and v.prediction_type == "raw"
    raw = debias.weighting.target_table(v, "raw", torch.float32)
    vp = debias.weighting.target_table(v, "v_prediction", torch.float32)
    torch.testing.assert_close(raw, vp, rtol=1e-12, atol=1e-15)


def test_as_schedule_caches_and_follows_the_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(1000, shift=3.0)
    first = as_schedule(scheduler)
    assert as_schedule(scheduler) is first
    copied = copy.deepcopy(scheduler)
    assert as_schedule(copied) is not first
    ddpm = DDPMScheduler(num_train_timesteps=100)
    assert as_schedule(ddpm) is as_schedule(ddpm) and as_schedule(ddpm).family == "ddpm"
    # set for inference, the scheduler's tables are no longer the training ones
    scheduler.set_timesteps(28)
    with pytest.raises(ValueError, match="set_timesteps"):
        as_schedule(scheduler)
    edm = EDMEulerScheduler(num_train_timesteps=7)
    edm.set_timesteps(7)
    with pytest.raises(ValueError, match="noise_scheduler_copy"):
        NoiseSchedule.from_diffusers(edm)


def test_scheduler_after_set_timesteps_is_refused():
    for scheduler in (FlowMatchEulerDiscreteScheduler(), EDMEulerScheduler()):
        scheduler.set_timesteps(20)
        with pytest.raises(ValueError, match=r"schedule: .*noise_scheduler_copy"):
            NoiseSchedule.from_diffusers(scheduler)


def test_ddpm_schedules_keep_their_shape():
    s = NoiseSchedule.linear(100)
    assert s.family == "ddpm" and s.timesteps is None and s.sigmas is None
    assert torch.equal(s.alpha, s.alphas_cumprod.sqrt())
    assert torch.equal(s.sigma, (1 - s.alphas_cumprod).sqrt())
    assert NoiseSchedule.linear(100, prediction_type="denoised").prediction_type == "sample"


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: NoiseSchedule.flow_matching(1000, shift=0.0), ValueError, "shift"),
        (lambda: NoiseSchedule.flow_matching(1000, shift="3"), TypeError, "shift"),
        (lambda: NoiseSchedule.flow_matching(0), ValueError, "num_timesteps"),
        (lambda: NoiseSchedule.flow_matching(prediction_type="raw"), ValueError,
         "prediction_type 'raw'"),
        (lambda: NoiseSchedule.linear(prediction_type="raw"), ValueError, "prediction_type"),
        (lambda: NoiseSchedule.edm(sigma_min=80.0, sigma_max=1.0), ValueError, "sigma_min"),
        (lambda: NoiseSchedule.edm(sigma_data=-1.0), ValueError, "sigma_data"),
        (lambda: NoiseSchedule.edm(rho=0), ValueError, "rho"),
        (lambda: NoiseSchedule.edm(prediction_type="x0"), ValueError, "prediction_type"),
        (lambda: NoiseSchedule.from_diffusers(object()), TypeError, "schedule"),
        (lambda: NoiseSchedule.flow_matching().rescale_zero_terminal_snr(), ValueError, "ddpm"),
    ],
    ids=["shift0", "shift-str", "T0", "flow-raw", "ddpm-raw", "edm-range", "sigma_data",
         "rho", "edm-x0", "not-a-scheduler", "rescale-flow"],
)  # fmt: skip
def test_bad_constructor_arguments(make, err, match):
    with pytest.raises(err, match=match):
        make()


# ---- index --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SCHEDULERS, ids=IDS)
def test_index_is_get_sigmas_lookup(case):
    _, scheduler, ours = case
    g = torch.Generator().manual_seed(3)
    idx = torch.cat((torch.tensor([0, 999, 17, 17]), torch.randint(0, 1000, (60,), generator=g)))
    timesteps = scheduler.timesteps[idx]
    indices = step_indices(scheduler, timesteps)
    for schedule in (ours, as_schedule(scheduler)):
        index = schedule.index(timesteps)
        assert index.dtype == torch.int64 and index.tolist() == indices == idx.tolist()
        # any float dtype holding the same values: compared in float32, as get_sigmas does
        assert torch.equal(schedule.index(timesteps.double()), index)
    assert ours.index(timesteps[:0]).shape == (0,)


BAD_TIMESTEPS = {
    "between-entries": (lambda ts: torch.stack((ts[0], (ts[1] + ts[2]) / 2)), ValueError,
                        r"t must hold timesteps .*got values not in it: \[\d"),
    "nan": (lambda ts: torch.stack((ts[0], torch.tensor(float("nan")))), ValueError,
            r"t must hold timesteps .*nan"),
    "above": (lambda ts: torch.tensor([1e9]), ValueError, r"t must hold timesteps"),
    "integer": (lambda ts: torch.tensor([1, 2]), TypeError, r"t must be a float tensor"),
    "bool": (lambda ts: torch.tensor([True]), TypeError, r"t must be a float tensor"),
    "list": (lambda ts: ts[:2].tolist(), TypeError, r"t must be a float torch.Tensor"),
    "2d": (lambda ts: ts[:2, None], ValueError, r"t must have shape \[B\]"),
}  # fmt: skip


@pytest.mark.parametrize("family", ["flow", "edm"])
@pytest.mark.parametrize("case", BAD_TIMESTEPS.values(), ids=BAD_TIMESTEPS.keys())
def test_bad_timesteps_name_t(family, case):
    make, err, match = case
    schedule = NoiseSchedule.flow_matching() if family == "flow" else NoiseSchedule.edm()
    with pytest.raises(err, match=match):
        schedule.index(make(schedule.timesteps))


def test_ddpm_index_keeps_check_timesteps_semantics():
    s = NoiseSchedule.linear(1000)
    assert s.index(torch.tensor([0, 999], dtype=torch.int32)).dtype == torch.int64
    with pytest.raises(TypeError, match="t must be an integer"):
        s.index(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        s.index(torch.tensor([1000]))
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        s.index(torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.slow
def test_index_and_loss_weight_compile_fullgraph():
    flow = NoiseSchedule.flow_matching(1000, shift=3.0)
    t = flow.timesteps[torch.tensor([0, 5, 999])]
    index = torch.compile(flow.index, fullgraph=True)
    assert index(t).tolist() == [0, 5, 999]
    weight = torch.compile(lambda t: debias.loss_weight(t, flow, "min_snr"), fullgraph=True)
    torch.testing.assert_close(weight(t), debias.loss_weight(t, flow, "min_snr"))


# ---- noising coefficients -----------------------------------------------------------------


def _noised(schedule, x0, noise, t):
    """x_t = a x0 + s noise from noise_table, in torch in the data's dtype."""
    a, s = schedule.noise_table(x0.dtype)[:, schedule.index(t)].to(x0.dtype)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return a.view(shape) * x0 + s.view(shape) * noise


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SCHEDULERS, ids=IDS)
def test_noise_table_rounds_as_the_trainers(case, dtype):
    _, scheduler, ours = case
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 5, 7, generator=g).to(dtype)
    noise = torch.randn(6, 4, 5, 7, generator=g).to(dtype)
    timesteps = scheduler.timesteps[torch.tensor([0, 999, 17, 500, 17, 3])]
    if ours.family == "flow":  # the SD3 / Flux scripts' line
        sigmas = get_sigmas(scheduler, timesteps, x0.ndim, x0.dtype)
        expected = (1.0 - sigmas) * x0 + sigmas * noise
    else:
        expected = scheduler.add_noise(x0, noise, timesteps)
    table = ours.noise_table(dtype)
    assert table.dtype == torch.float32 and table.shape == (2, 1000)
    assert torch.equal(table.to(dtype).to(torch.float32), table)  # values of dtype, exactly
    assert torch.equal(_noised(ours, x0, noise, timesteps), expected)
    assert ours.noise_table(dtype) is table  # cached


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
def test_ddpm_noise_table_rounds_as_diffusers(dtype):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    schedule = NoiseSchedule.from_diffusers(scheduler)
    x0, noise = torch.randn(5, 3, 4, 4).to(dtype), torch.randn(5, 3, 4, 4).to(dtype)
    t = torch.tensor([0, 999, 10, 500, 10])
    table = schedule.noise_table(dtype, "cpu")
    assert table.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype == torch.float64:  # float64 data uses the float64 table
        torch.testing.assert_close(table, torch.stack((schedule.alpha, schedule.sigma)))
    else:
        assert torch.equal(_noised(schedule, x0, noise, t), scheduler.add_noise(x0, noise, t))


@pytest.mark.parametrize("case", SCHEDULERS, ids=IDS)
def test_add_noise_follows_the_trainers(case):
    """End to end through debias.add_noise on the CPU backends (the ops' own tests go
    further)."""
    _, scheduler, ours = case
    x0, noise = torch.randn(4, 3, 5, 5).to(torch.bfloat16), torch.randn(4, 3, 5, 5)
    noise = noise.to(torch.bfloat16)
    timesteps = scheduler.timesteps[torch.tensor([0, 999, 3, 400])]
    expected = _noised(ours, x0, noise, timesteps)
    for backend in ("torch", "cpu"):
        x_t, _ = debias.add_noise(x0, timesteps, scheduler, noise=noise, backend=backend)
        assert torch.equal(x_t, expected), backend


def test_noise_table_refuses_non_data_dtypes():
    with pytest.raises(TypeError, match="dtype"):
        NoiseSchedule.flow_matching().noise_table(torch.int64)


# ---- timestep sampling --------------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 7])
@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sample_timesteps_equal_the_scripts(scheme, shift, T):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    g = torch.Generator().manual_seed(7)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme,
        batch_size=64,
        logit_mean=0.3,
        logit_std=1.5,
        mode_scale=1.29,
        generator=g,
    )
    expected = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    g.manual_seed(7)
    ours = sample_timesteps(64, scheduler, scheme, logit_mean=0.3, logit_std=1.5, generator=g)
    assert ours.dtype == torch.float32 and torch.equal(ours, expected)


def test_ddpm_and_edm_uniform_equal_the_scripts():
    g = torch.Generator().manual_seed(1)
    expected = torch.randint(0, 1000, (32,), generator=g)
    g.manual_seed(1)
    assert torch.equal(sample_timesteps(32, NoiseSchedule.linear(), generator=g), expected)
    # train_dreambooth_lora_sdxl.py, EDM branch: indices = randint(0, T); timesteps[indices]
    scheduler = EDMEulerScheduler(num_train_timesteps=1000)
    g.manual_seed(2)
    indices = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=g)
    expected = scheduler.timesteps[indices]
    g.manual_seed(2)
    assert torch.equal(sample_timesteps(32, scheduler, generator=g), expected)


def test_edm_lognormal_takes_the_nearest_noise_level():
    edm = NoiseSchedule.edm(1000)
    g = torch.Generator().manual_seed(4)
    t = sample_timesteps(4000, edm, "lognormal", generator=g)
    g.manual_seed(4)
    ln_sigma = torch.normal(mean=-1.2, std=1.2, size=(4000,), generator=g).double()
    nearest = (ln_sigma[:, None] - edm.sigma.log()[None]).abs().argmin(dim=1)
    assert torch.equal(edm.index(t), nearest)
    # EDM's training density: ln sigma ~ N(P_mean = -1.2, P_std = 1.2), up to the spacing
    drawn = edm.sigma[edm.index(t)].log()
    assert abs(drawn.mean().item() + 1.2) < 0.1 and abs(drawn.std().item() - 1.2) < 0.1
    wide = sample_timesteps(64, edm, "lognormal", p_mean=0.0, p_std=50.0, generator=g)
    assert set(edm.index(wide).tolist()) <= set(range(1000))  # beyond the table: its ends


def test_sample_timesteps_device_and_default_generator():
    torch.manual_seed(5)
    a = sample_timesteps(8, NoiseSchedule.flow_matching(), "logit_normal", device="cpu")
    torch.manual_seed(5)
    assert torch.equal(a, sample_timesteps(8, NoiseSchedule.flow_matching(), "logit_normal"))


BAD_SAMPLING = {
    "batch0": ({"batch_size": 0}, ValueError, "batch_size"),
    "batch-float": ({"batch_size": 2.0}, TypeError, "batch_size"),
    "ddpm-logit": ({"scheme": "logit_normal"}, ValueError, "scheme 'logit_normal' does not apply"),
    "flow-lognormal": ({"scheme": "lognormal", "family": "flow"}, ValueError, "scheme"),
    "edm-mode": ({"scheme": "mode", "family": "edm"}, ValueError, "scheme"),
    "scheme-int": ({"scheme": 1}, TypeError, "scheme"),
    "logit_std0": ({"logit_std": 0.0, "family": "flow"}, ValueError, "logit_std"),
    "logit_mean-nan": ({"logit_mean": float("nan")}, ValueError, "logit_mean"),
    "logit_mean-str": ({"logit_mean": "0"}, TypeError, "logit_mean"),
    "mode_scale-big": ({"mode_scale": 2.0}, ValueError, "mode_scale"),
    "mode_scale-small": ({"mode_scale": -1.5}, ValueError, "mode_scale"),
    "p_std": ({"p_std": -1.0, "family": "edm"}, ValueError, "p_std"),
    "p_mean": ({"p_mean": float("inf")}, ValueError, "p_mean"),
    "generator": ({"generator": 3}, TypeError, "generator"),
    "schedule": ({"schedule": object()}, TypeError, "schedule"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_SAMPLING.values(), ids=BAD_SAMPLING.keys())
def test_sample_timesteps_bad_arguments(case):
    kwargs, err, match = case
    kwargs = dict(kwargs)
    family = kwargs.pop("family", "ddpm")
    schedule = {
        "ddpm": NoiseSchedule.linear,
        "flow": NoiseSchedule.flow_matching,
        "edm": NoiseSchedule.edm,
    }[family]()
    with pytest.raises(err, match=match):
        sample_timesteps(**{"batch_size": 4, "schedule": schedule, **kwargs})


def test_generator_is_checked_by_the_one_check():
    """sample_timesteps and add_noise refuse what checks.check_generator refuses, naming
    generator; an int seed is a generator only where a caller asks for it (seed=True)."""
    from debias.checks import check_generator

    schedule = NoiseSchedule.linear()
    for call in (
        lambda g: sample_timesteps(2, schedule, generator=g),
        lambda g: debias.add_noise(torch.zeros(2, 3), torch.tensor([0, 1]), schedule, generator=g),
    ):
        with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None"):
            call(3)
    assert check_generator(None, "why") is None
    seeded = check_generator(5, "why", seed=True)
    want = torch.rand(3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(3, generator=seeded), want)
    with pytest.raises(TypeError, match="an int seed or None, got bool"):
        check_generator(True, "why", seed=True)
