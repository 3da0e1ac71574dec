"""Noise schedules: the float64 tables every op reads, for every diffusion family.

A schedule is a table of T noise levels. Each family writes its noisy input the same way,

    x_t = alpha_t x0 + sigma_t eps,     snr(t) = alpha_t^2 / sigma_t^2

    ddpm   alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t); t is the integer index
    flow   alpha = 1 - sigma_t, sigma = sigma_t (rectified flow: SD3, Flux); t is the float
           timestep ``sigma_t * T`` of diffusers' FlowMatchEulerDiscreteScheduler
    edm    alpha = 1, sigma = sigma_t (Karras et al. 2022); t is the float timestep
           ``0.25 ln sigma_t`` of diffusers' EDMEulerScheduler

Tables are kept in float64 on the CPU. The small per-device, per-dtype copies that kernels
read are cached on the schedule (``NoiseSchedule.table``), so a training step does no set-up.
"""

from __future__ import annotations

import math
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "raw")
# Other names trainers use for a prediction type.
PREDICTION_ALIASES = {"denoised": "sample"}
FAMILIES = ("ddpm", "flow", "edm")
TIMESTEP_SCHEMES = ("uniform", "logit_normal", "mode", "lognormal")


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
        self.family = "ddpm"
        self.alpha, self.sigma = abar.sqrt(), (1.0 - abar).sqrt()
        # flow / edm: the float timesteps of the table and the float32 sigmas the trainers
        # gather (diffusers keeps both in float32); EDM's sigma_data.
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.sigma_data: float | None = None
        self._tables: dict[tuple, torch.Tensor] = {}

    @classmethod
    def _from_sigmas(
        cls,
        family: str,
        sigmas: torch.Tensor,
        timesteps: torch.Tensor,
        prediction_type: str,
        sigma_data: float | None = None,
    ) -> NoiseSchedule:
        """A flow or EDM schedule from its float32 ``sigmas`` and ``timesteps`` tables."""
        sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float32).flatten()
        timesteps = torch.as_tensor(timesteps).detach().to("cpu", torch.float32).flatten()
        if sigmas.numel() < 1 or sigmas.numel() != timesteps.numel():
            raise ValueError(
                f"sigmas ({sigmas.numel()}) and timesteps ({timesteps.numel()}) must be "
                "non-empty tables of one length"
            )
        sig = sigmas.double()
        if (
            not torch.isfinite(sig).all()
            or (sig <= 0).any()
            or (family == "flow" and (sig > 1).any())
        ):
            bound = "(0, 1]" if family == "flow" else "(0, inf)"
            raise ValueError(f"sigmas must lie in {bound} for a {family} schedule")
        if torch.unique(timesteps).numel() != timesteps.numel():
            raise ValueError("timesteps must be distinct: each names one noise level")
        self = cls.__new__(cls)
        self.family, self.prediction_type, self.sigma_data = family, prediction_type, sigma_data
        self.sigmas, self.timesteps = sigmas, timesteps
        self.alpha = 1.0 - sig if family == "flow" else torch.ones_like(sig)
        self.sigma = sig
        self.snr = (self.alpha / self.sigma) ** 2
        self.alphas_cumprod = self.alpha**2 / (self.alpha**2 + self.sigma**2)  # VP-equivalent
        self._tables = {}
        return self

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
    def flow_matching(cls, num_timesteps: int = 1000, shift: float = 1.0) -> NoiseSchedule:
        """Rectified flow as diffusers' ``FlowMatchEulerDiscreteScheduler(num_timesteps,
        shift)`` trains it (SD3: shift 3; Flux: the shift its dynamic shifting computes for
        the resolution). sigma_i = shift s / (1 + (shift - 1) s) for s = (T - i)/T, timestep
        sigma_i T, in float32 as diffusers computes them; x_t = (1 - sigma) x0 + sigma eps."""
        T = _check_timesteps(num_timesteps)
        shift = _check_positive("shift", shift)
        timesteps = torch.linspace(1, T, T, dtype=torch.float32).flip(0)
        s = timesteps / T
        sigmas = shift * s / (1 + (shift - 1) * s)
        return cls._from_sigmas("flow", sigmas, sigmas * T, "flow")

    @classmethod
    def edm(
        cls,
        num_timesteps: int = 1000,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        prediction_type: str = "raw",
    ) -> NoiseSchedule:
        """EDM (Karras et al. 2022) as diffusers' ``EDMEulerScheduler`` keeps it for training:
        T noise levels sigma_i = (smax^(1/rho) + i/T (smin^(1/rho) - smax^(1/rho)))^rho,
        i = 0..T-1 (float64, stored as float32), timestep 0.25 ln sigma_i;
        x_t = x0 + sigma eps. ``prediction_type`` "raw" is the network output F under the
        paper's preconditioning (D = c_skip x_t + c_out F), "sample" the denoised D."""
        T = _check_timesteps(num_timesteps)
        smin, smax = (
            _check_positive("sigma_min", sigma_min),
            _check_positive("sigma_max", sigma_max),
        )
        if smin >= smax:
            raise ValueError(f"sigma_min must be < sigma_max, got {smin} and {smax}")
        ramp = torch.arange(T + 1, dtype=torch.float64) / T
        lo, hi = smin ** (1 / rho), smax ** (1 / rho)
        sigmas = ((hi + ramp * (lo - hi)) ** rho).float()[:T]
        return cls._from_sigmas(
            "edm", sigmas, 0.25 * sigmas.log(), _check_prediction(prediction_type),
            _check_positive("sigma_data", sigma_data),
        )  # fmt: skip

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
        """Reads a diffusers scheduler: DDPM-style ones (DDPM, DDIM, Euler, ...:
        ``alphas_cumprod``, ``config.num_train_timesteps``, ``config.prediction_type``),
        ``FlowMatchEulerDiscreteScheduler`` (any shift: its ``sigmas`` and ``timesteps`` as
        constructed, the copy the training scripts keep) and ``EDMEulerScheduler`` (its
        first ``num_train_timesteps`` sigmas, ``sigma_data``).

        The float32 tables diffusers keeps are taken as they are, so ``debias.add_noise`` with
        a given noise tensor reproduces the trainer's noising bit for bit.
        """
        config = getattr(scheduler, "config", {})
        kind = type(scheduler).__name__
        if kind.startswith(("FlowMatch", "EDM")):
            T = _config_get(config, "num_train_timesteps", None)
            # as constructed: T timesteps (flow), T + 1 (EDM's ramp ends on sigma_min)
            expected = T if kind.startswith("FlowMatch") else T + 1
            if scheduler.timesteps.numel() != expected:
                raise ValueError(
                    f"schedule: this {kind} holds {scheduler.timesteps.numel()} timesteps, not "
                    f"its {T} training ones (set_timesteps was called for inference); pass a "
                    "copy made before that, as diffusers' training scripts keep "
                    "(noise_scheduler_copy)"
                )
        if kind.startswith("FlowMatch"):
            return cls._from_sigmas("flow", scheduler.sigmas[:T], scheduler.timesteps[:T], "flow")
        if kind.startswith("EDM"):
            return cls._from_sigmas(
                "edm", scheduler.sigmas[:T], scheduler.timesteps[:T], "raw",
                float(_config_get(config, "sigma_data", 0.5)),
            )  # fmt: skip
        abar = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(abar, torch.Tensor):
            raise TypeError(
                "schedule must be a debias.NoiseSchedule or a diffusers scheduler with an "
                f"`alphas_cumprod` tensor, got {type(scheduler).__name__}"
            )
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
        self._require("ddpm", "rescale_zero_terminal_snr")
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

    def index(self, t: Any) -> torch.Tensor:
        """The table index of each timestep, ``[B]`` int64 on t's device.

        ddpm: ``t`` is the integer index itself, in [0, T). flow / edm: ``t`` holds float
        timesteps of ``self.timesteps`` (``scheduler.timesteps[indices]`` in the training
        scripts), matched exactly as their ``get_sigmas`` does. Values are checked on the host
        for CPU tensors in eager mode; on a GPU asynchronously, so nothing synchronises.
        """
        if not isinstance(t, torch.Tensor):
            kind = "an integer" if self.family == "ddpm" else "a float"
            raise TypeError(f"t must be {kind} torch.Tensor of shape [B], got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"t must have shape [B], got {list(t.shape)}")
        if self.family == "ddpm":
            check_timesteps(t, self.num_timesteps)
            return t.long()
        if not t.dtype.is_floating_point:
            raise TypeError(
                f"t must be a float tensor of this {self.family} schedule's timesteps "
                f"(schedule.timesteps[indices]), got dtype {t.dtype}"
            )
        order = self.table(("timestep_order",), lambda: self.timesteps.argsort(), t.device)
        ascending = self.table(
            ("timesteps_ascending",), lambda: self.timesteps[self.timesteps.argsort()], t.device
        )
        t32 = t.to(torch.float32)
        pos = torch.searchsorted(ascending, t32).clamp(max=self.num_timesteps - 1)
        found = ascending[pos] == t32
        if t.numel() and not torch.compiler.is_compiling():
            if t.device.type == "cpu":
                if not bool(found.all()):
                    bad = t[~found][:4].tolist()
                    raise ValueError(
                        f"t must hold timesteps of this {self.family} schedule "
                        f"(schedule.timesteps[indices]); got values not in it: {bad}"
                    )
            else:
                torch._assert_async(found.all(), "t holds values that are not timesteps")
        return order[pos]

    def noise_table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``[2, T]`` (a, s) of x_t = a x0 + s eps, rounded as the trainers compute them for
        data of ``dtype`` and stored in the compute type (float64 for float64 data, else
        float32) so a kernel's products round like theirs: ddpm ``sqrt(abar)``,
        ``sqrt(1 - abar)`` from diffusers' float32 table in ``dtype``; flow ``1 - sigma`` and
        ``sigma`` in ``dtype``; edm ``1`` and ``sigma``. float64 data of a ddpm schedule uses
        the float64 table."""
        compute = torch.float64 if dtype == torch.float64 else torch.float32

        def build() -> torch.Tensor:
            if self.family == "ddpm":
                abar = self.alphas_cumprod
                if dtype != torch.float64:
                    abar = abar.float().to(dtype)
                a, s = abar.sqrt(), (1 - abar).sqrt()
            else:
                s = self.sigmas.to(dtype)
                a = 1.0 - s if self.family == "flow" else torch.ones_like(s)
            return torch.stack((a, s)).to(compute)

        return self.table(("noise", dtype), build, device)

    def _require(self, family: str, what: str) -> None:
        if self.family != family:
            raise ValueError(f"{what} needs a {family} schedule, this one is {self.family}")

    def table(self, key: tuple, build, device: torch.device) -> torch.Tensor:
        """A cached derived table: ``build()`` runs once per ``(key, device)``."""
        cache_key = (key, str(device))
        out = self._tables.get(cache_key)
        if out is None:
            out = build().to(device)
            self._tables[cache_key] = out
        return out

    def __repr__(self) -> str:
        if self.family != "ddpm":
            sig = self.sigma
            return (
                f"NoiseSchedule({self.family}, T={self.num_timesteps}, "
                f"sigma=[{sig[0].item():.6g} .. {sig[-1].item():.6g}], "
                f"prediction_type={self.prediction_type!r})"
            )
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
    # the table that identifies the scheduler's state: diffusers replaces it when it moves it
    abar = getattr(schedule, "alphas_cumprod", None)
    if abar is None:
        abar = getattr(schedule, "sigmas", None)
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


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _check_prediction(prediction_type: str) -> str:
    prediction_type = PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction must be one of {PREDICTION_TYPES} (or {list(PREDICTION_ALIASES)}), "
            f"got {prediction_type!r}"
        )
    return prediction_type


def check_timesteps(t: Any, num_timesteps: int, batch: int | None = None) -> None:
    """ValueError/TypeError naming ``t`` unless it is an integer ``[B]`` tensor in [0, T)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be an integer torch.Tensor of shape [B], got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor (int64 or int32), got dtype {t.dtype}")
    if t.dim() != 1 or (batch is not None and t.shape[0] != batch):
        want = "[B]" if batch is None else f"[{batch}] (one timestep per sample)"
        raise ValueError(f"t must have shape {want}, got {list(t.shape)}")
    if t.numel() == 0 or torch.compiler.is_compiling():
        return
    if t.device.type == "cpu":
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_timesteps:
            raise ValueError(
                f"t must lie in [0, {num_timesteps}) for this schedule, got values in [{lo}, {hi}]"
            )
    else:
        # Checking on the host would synchronise the device; the assert fires asynchronously.
        torch._assert_async(((t >= 0) & (t < num_timesteps)).all(), "t out of range")


# ---- timestep sampling ----------------------------------------------------------------------


def sample_timesteps(
    batch_size: int,
    schedule: Any,
    scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps ``[batch_size]`` for ``schedule``, as the trainers draw them.

    flow: diffusers' ``compute_density_for_timestep_sampling(scheme, ...)`` then
    ``scheduler.timesteps[(u * T).long()]`` (the SD3 / Flux scripts), drawing from
    ``generator`` in the same order, so one generator state gives the same timesteps;
    ``scheme`` "uniform", "logit_normal" (sigmoid of N(logit_mean, logit_std)) or "mode"
    (``mode_scale``). ddpm: ``randint(0, T)`` ("uniform" only). edm: "lognormal" (the
    default for EDM schedules, EDM's ln sigma ~ N(logit_mean, logit_std), pass -1.2 and 1.2
    for the paper's P_mean and P_std), mapped to the table's nearest noise level in ln sigma,
    or "uniform" over the table. Drawn on the CPU (``generator`` must be a CPU generator),
    then moved to ``device``.
    """
    from debias._checks import check_int

    schedule = as_schedule(schedule)
    B = check_int("batch_size", batch_size, low=1)
    if scheme not in TIMESTEP_SCHEMES:
        raise ValueError(f"scheme must be one of {TIMESTEP_SCHEMES}, got {scheme!r}")
    allowed = {"ddpm": ("uniform",), "flow": ("uniform", "logit_normal", "mode"),
               "edm": ("uniform", "lognormal")}[schedule.family]  # fmt: skip
    if scheme not in allowed:
        raise ValueError(
            f"scheme {scheme!r} does not apply to a {schedule.family} schedule; "
            f"use one of {allowed}"
        )
    for name, value in (
        ("logit_mean", logit_mean),
        ("logit_std", logit_std),
        ("mode_scale", mode_scale),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise TypeError(f"{name} must be a finite number, got {value!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    T = schedule.num_timesteps
    if schedule.family == "ddpm":
        t = torch.randint(0, T, (B,), generator=generator)
    elif schedule.family == "flow":
        if scheme == "logit_normal":
            u = torch.normal(mean=logit_mean, std=logit_std, size=(B,), generator=generator)
            u = torch.sigmoid(u)
        elif scheme == "mode":
            u = torch.rand(size=(B,), generator=generator)
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            u = torch.rand(size=(B,), generator=generator)
        # (u * T).long() as the scripts; a u that rounds to 1.0 takes the last entry
        t = schedule.timesteps[(u * T).long().clamp(max=T - 1)]
    elif scheme == "uniform":
        t = schedule.timesteps[torch.randint(0, T, (B,), generator=generator)]
    else:
        ln_sigma = torch.normal(mean=logit_mean, std=logit_std, size=(B,), generator=generator)
        table = schedule.sigma.log()
        t = schedule.timesteps[(ln_sigma.double()[:, None] - table).abs().argmin(dim=1)]
    return t if device is None else t.to(device)
