"""debias.reference on its own: its closed forms agree with each other, with the facts in
DESIGN.md and with the package's tables for every family, prediction and weighting. Its
agreement with diffusers' functions and the trainers' lines is in test_integrations.py."""

import pytest
import torch

import debias
from debias import NoiseSchedule, reference
from debias.schedules import FAMILY_PREDICTIONS
from debias.weighting import FAMILY_WEIGHTINGS, target_table

SCHEDULES = {
    "ddpm": NoiseSchedule.linear(1000),
    "flow": NoiseSchedule.flow_matching(1000, shift=3.0),
    "edm": NoiseSchedule.edm(1000),
}


def _level(family: str) -> torch.Tensor:
    """Each timestep's noise level as reference.coefficients takes it: abar or sigma."""
    schedule = SCHEDULES[family]
    return schedule.alphas_cumprod if family == "ddpm" else schedule.sigma


CASES = [
    pytest.param(family, prediction, weighting, id=f"{family}-{prediction}-{weighting}")
    for family in SCHEDULES
    for prediction in FAMILY_PREDICTIONS[family]
    for weighting in FAMILY_WEIGHTINGS[family]
]


@pytest.mark.parametrize("family, prediction, weighting", CASES)
def test_weights_and_targets_are_the_package_tables(family, prediction, weighting):
    """reference.weight and reference.coefficients, from the papers' closed forms, give
    debias.weight_table and the target rows at every timestep where the package has a finite
    weight (it refuses the rest, naming max_weight)."""
    schedule = SCHEDULES[family]
    a, s, p, q = reference.coefficients(family, _level(family), prediction)
    torch.testing.assert_close(torch.stack((a, s)), torch.stack((schedule.alpha, schedule.sigma)))
    torch.testing.assert_close(
        torch.stack((p, q)), target_table(schedule, prediction, torch.float64)
    )
    try:
        table = debias.weight_table(schedule, weighting, prediction)
    except ValueError as err:
        assert "max_weight" in str(err) or "no finite value" in str(err)
        return
    want = reference.weight(weighting, family, _level(family), prediction)
    torch.testing.assert_close(table, want, rtol=1e-12, atol=0)


def test_design_facts():
    """DESIGN.md: the official debias weight is 0.0100 at t=0 and 157.4 at t=999 (mean 17.8);
    Min-SNR on v-prediction is min(snr, 5) / (snr + 1); debias on the flow target is
    sigma (1 - sigma), 0 at sigma = 1."""
    abar = _level("ddpm")
    w = reference.weight("debias", "ddpm", abar, "epsilon")
    assert round(w[0].item(), 4) == 0.0100 and round(w[-1].item(), 1) == 157.4
    assert round(w.mean().item(), 1) == 17.8
    snr = abar / (1 - abar)
    v = reference.weight("min_snr", "ddpm", abar, "v_prediction", gamma=5.0)
    torch.testing.assert_close(v, snr.clamp(max=5.0) / (snr + 1), rtol=1e-12, atol=0)
    sigma = _level("flow")
    flow = reference.weight("debias", "flow", sigma, "flow")
    torch.testing.assert_close(flow, sigma * (1 - sigma), rtol=1e-12, atol=1e-300)
    assert sigma[0] == 1 and flow[0] == 0


def test_targets_are_the_trainers_targets():
    """p eps + q x0 from reference.coefficients is each family's target as the trainers write
    it: get_velocity, flow_target (noise - x0), and the raw F whose EDM output D is x0."""
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(4, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    index = torch.tensor([0, 1, 500, 999])

    def target(family, prediction):
        _, _, p, q = reference.coefficients(family, _level(family)[index], prediction)
        return p.view(-1, 1, 1) * noise + q.view(-1, 1, 1) * x0

    abar = _level("ddpm")
    torch.testing.assert_close(
        target("ddpm", "v_prediction"), reference.get_velocity(x0, noise, index, abar)
    )
    torch.testing.assert_close(target("flow", "flow"), reference.flow_target(x0, noise))
    sigma = _level("edm")[index]
    torch.testing.assert_close(target("edm", "raw"), reference.edm_raw_target(x0, noise, sigma))
    x_t = reference.edm_noised(x0, noise, sigma)
    torch.testing.assert_close(reference.edm_denoised(x_t, target("edm", "raw"), sigma), x0)


def test_edm_loss_is_the_weighted_raw_loss():
    """EDMLoss on F, lambda ||D - x0||^2, is the MSE of F against the raw target weighted
    lambda c_out^2: the identity behind prediction="raw"."""
    g = torch.Generator().manual_seed(1)
    x0, noise, raw = (torch.randn(5, 2, 7, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = _level("edm")[torch.tensor([0, 10, 400, 800, 999])]
    _, c_out, _, _ = reference.edm_precondition(sigma)
    target = reference.edm_raw_target(x0, noise, sigma)
    want = reference.weighted_mse(raw, target, reference.edm_weight(sigma) * c_out**2, "none")
    got = reference.edm_loss(raw, x0, noise, sigma, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
