"""Noise schedules: the float64 tables every op reads.

A schedule is its cumulative signal fraction ``abar_t`` for t = 0..T-1; everything else is
derived from it:

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,     snr(t) = abar_t / (1 - abar_t)

Tables are kept in float64 on the CPU. The small per-device, per-dtype copies that kernels
read are cached on the schedule (``NoiseSchedule.table``), so a training step does no set-up.
"""

from __future__ import annotations

import math
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSchedule:
    """A diffusion noise schedule with float64 ``alphas_cumprod`` and ``snr`` tables.

    Build one with a constructor (``linear``, ``cosine``, ``scaled_linear``,
    ``from_alphas_cumprod``, ``from_diffusers``); every public op also accepts a diffusers
    scheduler where it takes a schedule.

    Attributes:
        alphas_cumprod: ``[T]`` float64, abar_t; every value in [0, 1) and abar_0 > 0.
            abar_{T-1} == 0 is a zero-terminal-SNR schedule.
        snr: ``[T]`` float64, abar_t / (1 - abar_t).
        prediction_type: what the network predicts by default: "epsilon", "v_prediction"
            or "sample".
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if abar.numel() < 1:
            raise ValueError("alphas_cumprod must hold at least one value, got an empty table")
        if not torch.isfinite(abar).all() or (abar < 0).any() or (abar >= 1).any():
            # abar == 1 is a step with no noise at all: eps is undefined there.
            raise ValueError("alphas_cumprod values must be finite and lie in [0, 1)")
        if abar[0] <= 0:
            raise ValueError("alphas_cumprod[0] must be > 0 (t=0 has to carry signal)")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        self.alphas_cumprod = abar
        # 1/(1-abar) - 1 is the official Debias form; abar/(1-abar) is the same number with
        # one rounding fewer.
        self.snr = abar / (1.0 - abar)
        self.prediction_type = prediction_type
        self._tables: dict[tuple, torch.Tensor] = {}

    # ---- constructors -------------------------------------------------------------------

    @classmethod
    def linear(
        cls,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
    ) -> NoiseSchedule:
        """guided-diffusion's linear schedule: betas ``linspace(s*1e-4, s*0.02, T)`` in
        float64 with ``s = 1000 / T``, so every T spans the same noise range as T=1000."""
        T = _check_timesteps(num_timesteps)
        scale = 1000.0 / T
        betas = torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)
        return cls.from_betas(betas, prediction_type)

    @classmethod
    def cosine(
        cls,
        num_timesteps: int = 1000,
        s: float = 0.008,
        max_beta: float = 0.999,
        prediction_type: str = "epsilon",
    ) -> NoiseSchedule:
        """improved-DDPM's cosine schedule: ``abar(u) = cos((u + s)/(1 + s) * pi/2)^2``,
        ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)``."""
        T = _check_timesteps(num_timesteps)

        def abar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
        return cls.from_betas(torch.tensor(betas, dtype=torch.float64), prediction_type)

    @classmethod
    def scaled_linear(
        cls,
        num_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: str = "epsilon",
    ) -> NoiseSchedule:
        """Stable Diffusion's schedule: betas ``linspace(sqrt(start), sqrt(end), T) ** 2``."""
        T = _check_timesteps(num_timesteps)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        return cls.from_betas(betas, prediction_type)

    @classmethod
    def from_betas(cls, betas: torch.Tensor, prediction_type: str = "epsilon") -> NoiseSchedule:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if (betas <= 0).any() or (betas > 1).any():
            raise ValueError(
                f"betas must lie in (0, 1], got values in [{betas.min():.3g}, {betas.max():.3g}]"
            )
        return cls(torch.cumprod(1.0 - betas, dim=0), prediction_type)

    @classmethod
    def from_alphas_cumprod(
        cls, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"
    ) -> NoiseSchedule:
        return cls(alphas_cumprod, prediction_type)

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> NoiseSchedule:
        """Reads ``alphas_cumprod``, ``config.num_train_timesteps`` and
        ``config.prediction_type`` from a diffusers scheduler (DDPM, DDIM, Euler, ...).

        The float32 table diffusers keeps is taken as is, so ``debias.add_noise`` with a given
        noise tensor reproduces ``scheduler.add_noise`` bit for bit.
        """
        abar = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(abar, torch.Tensor):
            raise TypeError(
                "schedule must be a debias.NoiseSchedule or a diffusers scheduler with an "
                f"`alphas_cumprod` tensor, got {type(scheduler).__name__}"
            )
        config = getattr(scheduler, "config", {})
        prediction_type = _config_get(config, "prediction_type", "epsilon")
        T = _config_get(config, "num_train_timesteps", abar.numel())
        if T != abar.numel():
            raise ValueError(
                f"scheduler.config.num_train_timesteps={T} but alphas_cumprod has "
                f"{abar.numel()} entries"
            )
        return cls(abar, prediction_type)

    # ---- derived schedules ----------------------------------------------------------------

    def rescale_zero_terminal_snr(self) -> NoiseSchedule:
        """Lin et al. 2023 (Common Diffusion Noise Schedules are Flawed), Algorithm 1:
        shift and scale sqrt(abar) so that abar_{T-1} = 0 exactly and abar_0 is unchanged."""
        a = self.alphas_cumprod.sqrt()
        a0, aT = a[0].clone(), a[-1].clone()
        a = (a - aT) * a0 / (a0 - aT)
        return NoiseSchedule(a**2, self.prediction_type)

    # ---- tables ---------------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def __len__(self) -> int:
        return self.num_timesteps

    def table(self, key: tuple, build, device: torch.device) -> torch.Tensor:
        """A cached derived table: ``build()`` runs once per ``(key, device)``."""
        cache_key = (key, str(device))
        out = self._tables.get(cache_key)
        if out is None:
            out = build().to(device)
            self._tables[cache_key] = out
        return out

    def __repr__(self) -> str:
        abar = self.alphas_cumprod
        return (
            f"NoiseSchedule(T={self.num_timesteps}, abar[0]={abar[0].item():.6g}, "
            f"abar[-1]={abar[-1].item():.6g}, prediction_type={self.prediction_type!r})"
        )


# diffusers schedulers are converted once and kept for as long as the scheduler lives and its
# table is the same object (diffusers replaces it when it moves the table between devices).
_FROM_DIFFUSERS: dict[int, tuple[Any, torch.Tensor, NoiseSchedule]] = {}


def as_schedule(schedule: Any) -> NoiseSchedule:
    """A ``NoiseSchedule`` for a ``NoiseSchedule`` or a diffusers scheduler."""
    if isinstance(schedule, NoiseSchedule):
        return schedule
    abar = getattr(schedule, "alphas_cumprod", None)
    hit = _FROM_DIFFUSERS.get(id(schedule))
    if hit is not None and hit[0] is schedule and hit[1] is abar:
        return hit[2]
    converted = NoiseSchedule.from_diffusers(schedule)
    if len(_FROM_DIFFUSERS) > 64:
        _FROM_DIFFUSERS.clear()
    _FROM_DIFFUSERS[id(schedule)] = (schedule, abar, converted)
    return converted


def _config_get(config: Any, name: str, default: Any) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _check_timesteps(num_timesteps: int) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int):
        raise TypeError(f"num_timesteps must be an int, got {type(num_timesteps).__name__}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return num_timesteps
