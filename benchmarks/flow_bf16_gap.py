"""How far the SD3/Flux DreamBooth scripts' loss under --mixed_precision bf16 lies from
debias.fused_loss's, per weighting scheme and shift (README, "Drop-in for Flux / SD3").

The scripts cast the sigmas, and so the weighting, to the latents' dtype (bfloat16); debias
computes the coefficients in float64 and rounds them once to float32. Same latents, noise,
prediction and timesteps; prints the largest relative difference over 20 batches of
8x16x32x32 per case. Run: python benchmarks/flow_bf16_gap.py (a few seconds on a CPU).
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

import debias

BATCH, SHAPE, SEEDS = 8, (16, 32, 32), 20


def script_loss(pred, x0, noise, sigmas, scheme):
    """The scripts' lines from the sigmas on, in the latents' dtype."""
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = noise - x0
    loss = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(BATCH, -1)
    return torch.mean(loss, 1).mean()


def main() -> None:
    print("weighting     shift  max relative difference")
    for scheme in ("logit_normal", "cosmap", "sigma_sqrt"):
        for shift in (1.0, 3.0):
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
            worst = 0.0
            for seed in range(SEEDS):
                torch.manual_seed(seed)
                x0 = torch.randn(BATCH, *SHAPE).bfloat16()
                noise, pred = torch.randn_like(x0), torch.randn_like(x0)
                u = compute_density_for_timestep_sampling(
                    scheme, BATCH, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
                )
                indices = (u * 1000).long()
                timesteps = scheduler.timesteps[indices]
                sigmas = scheduler.sigmas[indices].to(dtype=x0.dtype).view(-1, 1, 1, 1)
                want = script_loss(pred, x0, noise, sigmas, scheme)
                got = debias.fused_loss(pred, noise, timesteps, scheduler, scheme, x0=x0)
                worst = max(worst, abs(got.item() - want.item()) / abs(want.item()))
            print(f"{scheme:12s}  {shift:5g}  {worst:.2e}")


if __name__ == "__main__":
    main()
