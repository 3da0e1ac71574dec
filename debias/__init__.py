"""debias: fused kernels for unbiased diffusion training losses, and exact nearest
neighbours for measuring memorization.

x_t, noise = debias.add_noise(x0, t, scheduler)          # noise drawn inside the kernel
loss = debias.fused_loss(model(x_t, t), noise, t, scheduler, weighting="debias")
sigma = debias.sample_timesteps(B, "flow", "sigmoid")   # continuous time: t is each sigma
x_t, noise = debias.add_noise(x0, sigma, "flow")         # then fused_loss(..., sigma, "flow")
dist, idx = debias.knn(samples, train_images, k=2)       # exact, without the n x m matrix
gu = debias.memorization.gu_ratio(samples, train_images)  # memorized fraction, bootstrap CI

These need torch and numpy only. debias.pipeline (training, sampling, evaluation, studies, plots
and the `debias` command) is a user of these names with dependencies of its own:
pip install "debias-kernels[pipeline]".
"""

from debias import memorization
from debias.ops.knn import knn
from debias.ops.noise_loss import PhiloxNoise, add_noise, affine_loss, affine_noise, fused_loss
from debias.schedules import NoiseSchedule, sample_timesteps
from debias.weighting import WEIGHTINGS, loss_weight, weight_table

__version__ = "0.1.0"

__all__ = [
    "WEIGHTINGS",
    "NoiseSchedule",
    "PhiloxNoise",
    "add_noise",
    "affine_loss",
    "affine_noise",
    "fused_loss",
    "knn",
    "loss_weight",
    "memorization",
    "sample_timesteps",
    "weight_table",
]
