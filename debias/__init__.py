"""debias: fused kernels for unbiased diffusion training losses.

x_t, noise = debias.add_noise(x0, t, scheduler)          # noise drawn inside the kernel
loss = debias.fused_loss(model(x_t, t), noise, t, scheduler, weighting="debias")
"""

from debias.ops.noise_loss import PhiloxNoise, add_noise, fused_loss
from debias.schedules import NoiseSchedule
from debias.weighting import WEIGHTINGS, loss_weight, weight_table

__version__ = "0.1.0"

__all__ = [
    "WEIGHTINGS",
    "NoiseSchedule",
    "PhiloxNoise",
    "add_noise",
    "fused_loss",
    "loss_weight",
    "weight_table",
]
