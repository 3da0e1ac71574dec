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

Continuous time: the strings "flow" and "edm" name a family without a table, for trainers that
draw sigma itself (sd-scripts, musubi-tuner, OneTrainer, SimpleTuner, ai-toolkit, diffusers'
flux2 / qwen_image / z_image scripts). There ``t`` is each sample's sigma, a float ``[B]``
tensor (flow: in [0, 1]; edm: > 0), and the coefficients are the same per-sample functions
(``noise_coefficients``, ``levels``) evaluated on those sigmas, on the data's device.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from debias.checks import (
    check_all,
    check_float,
    check_float_dtype,
    check_generator,
    check_int,
    check_range,
)

FAMILIES = ("ddpm", "flow", "edm")
# Which of eps and x0 a target y = p eps + q x0 reads: the `Terms` of csrc/noise_loss.h.
TERM_EPS, TERM_X0 = 1, 2


class Prediction(NamedTuple):
    """What a prediction type's target reads and where it exists."""

    terms: int  # TERM_EPS | TERM_X0: the terms of its target (p or q is 0 where one is absent)
    families: tuple[str, ...]  # the schedule families it applies to


# Every prediction type, written once. Every target is affine in (x0, eps), so each applies to
# every family; "raw" is EDM's preconditioned network output and exists only there.
PREDICTIONS = {
    "epsilon": Prediction(TERM_EPS, FAMILIES),
    "v_prediction": Prediction(TERM_EPS | TERM_X0, FAMILIES),
    "sample": Prediction(TERM_X0, FAMILIES),
    "flow": Prediction(TERM_EPS | TERM_X0, FAMILIES),
    "raw": Prediction(TERM_EPS | TERM_X0, ("edm",)),
}
PREDICTION_TYPES = tuple(PREDICTIONS)
# Other names trainers use for a prediction type.
PREDICTION_ALIASES = {"denoised": "sample"}
FAMILY_PREDICTIONS = {
    family: tuple(name for name, p in PREDICTIONS.items() if family in p.families)
    for family in FAMILIES
}
# The families that also exist without a table: schedule="flow" or "edm", t the sigmas.
CONTINUOUS_FAMILIES = ("flow", "edm")
# What a continuous family predicts when no prediction is given (as its table schedules).
CONTINUOUS_PREDICTIONS = {"flow": "flow", "edm": "raw"}
# sample_timesteps' schemes for the continuous families (they return sigmas).
SIGMA_SCHEMES = {
    "flow": ("uniform", "sigmoid", "logit_normal", "mode", "shift", "flux_shift"),
    "edm": ("lognormal",),
}
# The schemes drawn as sd-scripts draws them: on the data's device from its default generator.
_DEVICE_SCHEMES = ("uniform", "sigmoid", "shift", "flux_shift")
# sample_timesteps: the schemes each family's table schedules draw with.
TIMESTEP_SCHEMES = {
    "ddpm": ("uniform",),
    "flow": ("uniform", "logit_normal", "mode"),
    "edm": ("uniform", "lognormal"),
}
# diffusers' --weighting_scheme names that compute_density_for_timestep_sampling draws
# uniformly for, so a flow trainer can pass its weighting_scheme to sample_timesteps as is.
_UNIFORM_WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")
# SD3's "mode" density is a density on [0, 1] only for -1 <= mode_scale <= 2 / (pi - 2)
# (Esser et al. 2024, eq. 20); outside it u leaves [0, 1] and indexes no timestep.
_MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


class NoiseSchedule:
    """A diffusion noise schedule: float64 ``[T]`` tables of one family's noise levels.

    Build one with a constructor: DDPM ``linear``, ``cosine``, ``scaled_linear``,
    ``from_betas``, ``from_alphas_cumprod``; rectified flow ``flow_matching``; EDM ``edm``;
    or ``from_diffusers`` (every public op also accepts a diffusers scheduler where it takes a
    schedule).

    Attributes:
        family: "ddpm", "flow" or "edm".
        alpha, sigma: ``[T]`` float64, x_t = alpha x0 + sigma eps.
        snr: ``[T]`` float64, alpha^2 / sigma^2 (ddpm: abar / (1 - abar)).
        alphas_cumprod: ``[T]`` float64; ddpm: abar_t, every value in [0, 1), abar_0 > 0,
            abar_{T-1} == 0 a zero-terminal-SNR schedule; flow / edm: the variance-preserving
            equivalent alpha^2 / (alpha^2 + sigma^2).
        timesteps: None for ddpm (t is the integer index); flow / edm: ``[T]`` float32, the
            model timesteps exactly as diffusers keeps them (``scheduler.timesteps``).
        sigmas: None for ddpm; flow / edm: ``[T]`` float32, diffusers' ``scheduler.sigmas``
            (``sigma`` is the same values in float64).
        prediction_type: what the network predicts by default, one of ``PREDICTION_TYPES``
            (ddpm "epsilon", flow "flow", edm "raw").
        sigma_data: EDM's data standard deviation (None for the other families).
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
        self.family = "ddpm"
        self.prediction_type = check_prediction(prediction_type, "prediction_type", "ddpm")
        self.alphas_cumprod = abar
        # 1/(1-abar) - 1 is the official Debias form; abar/(1-abar) is the same number with
        # one rounding fewer.
        self.snr = abar / (1.0 - abar)
        self.alpha, self.sigma = abar.sqrt(), (1.0 - abar).sqrt()
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.sigma_data: float | None = None
        self.c_out_sign = 1.0
        self._tables: dict[tuple, torch.Tensor] = {}

    @classmethod
    def _from_sigmas(
        cls,
        family: str,
        sigmas: torch.Tensor,
        timesteps: torch.Tensor,
        prediction_type: str,
        sigma_data: float | None = None,
        c_out_sign: float = 1.0,
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
        if not torch.isfinite(timesteps).all() or timesteps.unique().numel() != timesteps.numel():
            raise ValueError("timesteps must be finite and distinct: each names one noise level")
        self = cls.__new__(cls)
        self.family = family
        self.prediction_type = check_prediction(prediction_type, "prediction_type", family)
        self.sigma_data, self.c_out_sign = sigma_data, c_out_sign
        self.sigmas, self.timesteps = sigmas, timesteps
        level = levels(family, sig)
        self.alpha, self.sigma, self.snr = level.alpha, level.sigma, level.snr
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
        T = check_int("num_timesteps", num_timesteps, 1)
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
        T = check_int("num_timesteps", num_timesteps, 1)

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
        T = check_int("num_timesteps", num_timesteps, 1)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        return cls.from_betas(betas, prediction_type)

    @classmethod
    def flow_matching(
        cls, num_timesteps: int = 1000, shift: float = 1.0, prediction_type: str = "flow"
    ) -> NoiseSchedule:
        """Rectified flow as diffusers' ``FlowMatchEulerDiscreteScheduler(num_timesteps,
        shift)`` keeps it for training (SD3: shift 3; Flux, whose scheduler shifts
        dynamically: the shift its resolution gives, or 1.0 for the constructed tables its
        training script reads). In float32 as diffusers computes them: timesteps T, T-1, .., 1,
        s = timestep / T, sigma = shift s / (1 + (shift - 1) s), timestep = sigma T;
        x_t = (1 - sigma) x0 + sigma eps; the default target is ``eps - x0`` ("flow")."""
        T = check_int("num_timesteps", num_timesteps, 1)
        shift = check_float("shift", shift, low=0.0)
        s = torch.arange(T, 0, -1, dtype=torch.float64).float() / T
        sigmas = shift * s / (1 + (shift - 1) * s)
        return cls._from_sigmas("flow", sigmas, sigmas * T, prediction_type)

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
        sigma_i = (smax^(1/rho) + i/T (smin^(1/rho) - smax^(1/rho)))^rho in float64, stored
        as float32, timestep 0.25 ln sigma_i (float32); diffusers builds T + 1 of them and its
        training script (train_dreambooth_lora_sdxl.py, EDM) draws from the first T, which
        are this table; x_t = x0 + sigma eps. ``prediction_type`` "raw" (default) is the
        network output F under the paper's preconditioning D = c_skip x_t + c_out F,
        "sample" the denoised D."""
        T = check_int("num_timesteps", num_timesteps, 1)
        smin = check_float("sigma_min", sigma_min, low=0.0)
        smax = check_float("sigma_max", sigma_max, low=0.0)
        sd = check_float("sigma_data", sigma_data, low=0.0)
        rho = check_float("rho", rho, low=0.0)
        if smin >= smax:
            raise ValueError(f"sigma_min must be < sigma_max, got {smin} and {smax}")
        # All T + 1 entries, as diffusers computes them, then the T training ones.
        ramp = torch.arange(T + 1, dtype=torch.float64) / T
        lo, hi = smin ** (1 / rho), smax ** (1 / rho)
        sigmas = ((hi + ramp * (lo - hi)) ** rho).float()
        timesteps = 0.25 * sigmas.log()
        return cls._from_sigmas("edm", sigmas[:T], timesteps[:T], prediction_type, sd)

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
        """Reads a diffusers scheduler as its training script uses it.

        - DDPM-style (DDPM, DDIM, Euler, ...): ``alphas_cumprod``,
          ``config.num_train_timesteps``, ``config.prediction_type``.
        - Flow matching (``FlowMatchEulerDiscreteScheduler``, any shift, dynamic shifting
          included): its ``sigmas`` and ``timesteps`` as constructed; prediction "flow".
        - EDM (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``): the first
          ``num_train_timesteps`` entries of ``sigmas`` and ``timesteps`` (the ones the SDXL
          script draws), ``config.sigma_data``; prediction "raw", the F of the scheduler's
          ``precondition_outputs`` (whose c_out is negated when its config says
          "v_prediction").

        Flow and EDM tables are taken as they are, so ``debias.add_noise`` with a given noise
        tensor reproduces the trainer's noising bit for bit. A flow or EDM scheduler set for
        inference (``set_timesteps``) no longer holds its training tables: pass a copy kept
        at construction, as the training scripts do (``noise_scheduler_copy``).
        """
        config = getattr(scheduler, "config", {})
        kind = type(scheduler).__name__
        if kind.startswith(("FlowMatch", "EDM")):
            family = "flow" if kind.startswith("FlowMatch") else "edm"
            T = _config_get(config, "num_train_timesteps", None)
            sigmas, timesteps = _training_tables(scheduler, kind, family, T)
            if family == "flow":
                return cls._from_sigmas("flow", sigmas, timesteps, "flow")
            sign = -1.0 if _config_get(config, "prediction_type", None) == "v_prediction" else 1.0
            sd = float(_config_get(config, "sigma_data", 0.5))
            return cls._from_sigmas("edm", sigmas, timesteps, "raw", sd, sign)
        abar = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(abar, torch.Tensor):
            raise TypeError(
                "schedule must be a debias.NoiseSchedule or a diffusers scheduler (with an "
                "`alphas_cumprod` tensor, or a FlowMatch* / EDM* scheduler), got "
                f"{type(scheduler).__name__}"
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

    def index(self, t: Any, batch: int | None = None) -> torch.Tensor:
        """The table index of each timestep, ``[B]`` int64 on t's device; ``batch``: the B
        that t's shape must have (any when None).

        ddpm: ``t`` holds integer indices in [0, T). flow / edm: ``t`` holds float timesteps
        of ``self.timesteps`` (``scheduler.timesteps[indices]`` in the training scripts; any
        float dtype, compared in float32 as diffusers' ``get_sigmas`` compares them), each
        matched to the entry equal to it. Values are checked on the host for CPU tensors in
        eager mode (ValueError naming ``t``); on a GPU asynchronously (``torch._assert_async``)
        so nothing synchronises; not at all while torch.compile traces.
        """
        if not isinstance(t, torch.Tensor):
            kind = "an integer" if self.family == "ddpm" else "a float"
            raise TypeError(f"t must be {kind} torch.Tensor of shape [B], got {type(t).__name__}")
        if self.family == "ddpm":
            check_timesteps(t, self.num_timesteps, batch)
            return t.long()
        if not t.dtype.is_floating_point:
            raise TypeError(
                f"t must be a float tensor of this {self.family} schedule's timesteps "
                f"(schedule.timesteps[indices], as the training scripts draw them), got dtype "
                f"{t.dtype}; integer table indices are not timesteps here"
            )
        _check_shape(t, batch)
        ascending = self.table(("timesteps_ascending",), lambda: self.timesteps.sort()[0], t.device)
        order = self.table(("timesteps_order",), lambda: self.timesteps.argsort(), t.device)
        t32 = t.to(torch.float32).contiguous()  # searchsorted copies (and warns) otherwise
        pos = torch.searchsorted(ascending, t32).clamp(max=self.num_timesteps - 1)
        found = ascending[pos] == t32  # False for NaN and for values between entries
        check_all(
            found,
            lambda: (
                f"t must hold timesteps of this {self.family} schedule "
                f"(schedule.timesteps[indices]); got values not in it: {t[~found][:4].tolist()}"
            ),
            "t holds values that are not timesteps",
        )
        return order[pos]

    def noise_table(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[2, T]`` rows (a, s) of x_t = a x0 + s eps for data of ``dtype``, rounded as the
        trainers compute them and stored in the compute type (float64 for float64 data, else
        float32; every value is exact there) so a kernel's products round like theirs:

            ddpm  abar (diffusers' float32 table) -> dtype; sqrt(abar), sqrt(1 - abar) in
                  dtype (``scheduler.add_noise``); float64 data uses the float64 table
            flow  sigma (float32) -> dtype; 1 - sigma in dtype (``(1.0 - sigmas) * x0``)
            edm   1 and sigma (float32) -> dtype (``x0 + noise * sigma``)

        Cached on the schedule per (dtype, device); ``dtype`` is checked when the table is
        built, so a training step's call is one dictionary lookup.
        """

        def build() -> torch.Tensor:
            check_float_dtype("dtype", dtype)
            level = self.alphas_cumprod if self.family == "ddpm" else self.sigmas
            return noise_coefficients(self.family, level, dtype)

        return self.table(("noise", dtype), build, device)

    def table(
        self, key: tuple, build: Callable[[], torch.Tensor], device: torch.device | str
    ) -> torch.Tensor:
        """A cached derived table: ``build()`` runs once per ``(key, device)``."""
        cache_key = (key, str(device))
        out = self._tables.get(cache_key)
        if out is None:
            out = build().to(device)
            self._tables[cache_key] = out
        return out

    def _require(self, family: str, what: str) -> None:
        if self.family != family:
            raise ValueError(f"{what} needs a {family} schedule, this one is {self.family}")

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


# diffusers schedulers are converted once and kept for as long as the scheduler lives and the
# tables that define it are the same objects (diffusers replaces them when it moves them
# between devices or when set_timesteps rebuilds them).
_FROM_DIFFUSERS: dict[int, tuple[Any, tuple, NoiseSchedule]] = {}
_STATE = ("alphas_cumprod", "sigmas", "timesteps")


def as_schedule(schedule: Any) -> NoiseSchedule:
    """A ``NoiseSchedule`` for a ``NoiseSchedule`` or a diffusers scheduler."""
    if isinstance(schedule, NoiseSchedule):
        return schedule
    tables = tuple(getattr(schedule, name, None) for name in _STATE)
    hit = _FROM_DIFFUSERS.get(id(schedule))
    if hit is not None and hit[0] is schedule and all(map(operator.is_, hit[1], tables)):
        return hit[2]
    converted = NoiseSchedule.from_diffusers(schedule)
    if len(_FROM_DIFFUSERS) > 64:
        _FROM_DIFFUSERS.clear()
    _FROM_DIFFUSERS[id(schedule)] = (schedule, tables, converted)
    return converted


def _training_tables(scheduler: Any, kind: str, family: str, T: Any):
    """The ``[T]`` training sigmas and timesteps of a diffusers flow or EDM scheduler."""
    sigmas = getattr(scheduler, "sigmas", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(sigmas, torch.Tensor) or not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"schedule: a {kind} needs `sigmas` and `timesteps` tensors")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(
            f"schedule: {kind}.config.num_train_timesteps must be an int >= 1, got {T!r}"
        )
    n = timesteps.numel()
    # flow: T timesteps and T sigmas; EDM: T + 1 (Euler) or T (DPMSolver) timesteps and one
    # sigma more (the final 0); the trainers draw from the first T.
    if family == "flow":
        fits = n == T and sigmas.numel() == T
    else:
        fits = n == (T + 1 if kind.startswith("EDMEuler") else T) and sigmas.numel() == n + 1
    if not fits:
        raise ValueError(
            f"schedule: this {kind} holds {n} timesteps and {sigmas.numel()} sigmas, not "
            f"the training tables of num_train_timesteps={T}: it has been set for inference "
            "(set_timesteps). Pass a scheduler as constructed, as the training scripts keep "
            "one (noise_scheduler_copy = copy.deepcopy(noise_scheduler))"
        )
    return sigmas[:T], timesteps[:T]


def _config_get(config: Any, name: str, default: Any) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def check_prediction(prediction: Any, name: str = "prediction", family: str | None = None) -> str:
    """A prediction type of ``PREDICTIONS`` (aliases resolved), checked against ``family`` when
    given: TypeError or ValueError naming ``name`` otherwise."""
    if not isinstance(prediction, str):
        raise TypeError(f"{name} must be a string, got {type(prediction).__name__}")
    prediction = PREDICTION_ALIASES.get(prediction, prediction)
    if prediction not in PREDICTION_TYPES:
        raise ValueError(
            f"{name} must be one of {PREDICTION_TYPES} (or {list(PREDICTION_ALIASES)}), "
            f"got {prediction!r}"
        )
    if family is not None and prediction not in FAMILY_PREDICTIONS[family]:
        only = " or ".join(PREDICTIONS[prediction].families)
        raise ValueError(
            f"{name} {prediction!r} exists on {only} schedules only; this schedule is "
            f"{family}: use one of {FAMILY_PREDICTIONS[family]}"
        )
    return prediction


def _check_shape(t: torch.Tensor, batch: int | None) -> None:
    if t.dim() != 1 or (batch is not None and t.shape[0] != batch):
        want = "[B]" if batch is None else f"[{batch}] (one timestep per sample)"
        raise ValueError(f"t must have shape {want}, got {list(t.shape)}")


def check_timesteps(t: Any, num_timesteps: int, batch: int | None = None) -> None:
    """ValueError/TypeError naming ``t`` unless it is an integer ``[B]`` tensor in [0, T)
    (a DDPM schedule's timesteps). Values are checked on the host for CPU tensors, with
    ``torch._assert_async`` on other devices, and not while torch.compile traces."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be an integer torch.Tensor of shape [B], got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor (int64 or int32), got dtype {t.dtype}")
    _check_shape(t, batch)
    check_all(
        (t >= 0) & (t < num_timesteps),
        lambda: (
            f"t must lie in [0, {num_timesteps}) for this schedule, got values in "
            f"[{int(t.min())}, {int(t.max())}]"
        ),
        "t out of range",
    )


# ---- per-sample coefficients: one definition for tables and continuous sigmas ----------------


class Levels:
    """Noise levels as the weightings read them (the attributes of a ``NoiseSchedule`` they
    use), here per sample for a continuous family: float64 ``[B]`` on the sigmas' device.
    alpha (x_t = alpha x0 + sigma eps) and snr = alpha^2 / sigma^2 (inf at sigma = 0, 0 at a
    flow sigma of 1) are computed when first read: a weighting that reads neither costs
    nothing per step."""

    timesteps = None  # no table: messages name sigma

    def __init__(
        self,
        family: str,
        sigma: torch.Tensor,
        sigma_data: float | None = None,  # EDM's data standard deviation
        c_out_sign: float = 1.0,  # -1 for diffusers' "v_prediction" EDM schedulers
    ):
        self.family, self.sigma, self.sigma_data, self.c_out_sign = (
            family, sigma, sigma_data, c_out_sign
        )  # fmt: skip

    @functools.cached_property
    def alpha(self) -> torch.Tensor:
        return 1.0 - self.sigma if self.family == "flow" else torch.ones_like(self.sigma)

    @functools.cached_property
    def snr(self) -> torch.Tensor:
        return (self.alpha / self.sigma) ** 2


def levels(
    family: str, sigma: torch.Tensor, sigma_data: float | None = None, c_out_sign: float = 1.0
) -> Levels:
    """The ``Levels`` of a flow or EDM family at float64 ``sigma``: flow alpha = 1 - sigma,
    edm alpha = 1; snr = (alpha / sigma)^2. A table schedule's rows are this function of its
    table's sigmas."""
    return Levels(family, sigma, sigma_data, c_out_sign)


def noise_coefficients(family: str, level: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[2, n]`` rows (a, s) of x_t = a x0 + s eps for data of ``dtype`` at noise levels
    ``level [n]`` (ddpm: abar, float64; flow / edm: sigma, in the trainer's dtype), rounded as
    the trainers compute them, in the compute type (float64 for float64 data, else float32):
    ddpm sqrt(abar), sqrt(1 - abar) in dtype from abar in float32 (float64 data: float64);
    flow sigma -> dtype, 1 - sigma in dtype; edm 1, sigma -> dtype. On ``level``'s device."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if family == "ddpm":
        abar = level if dtype == torch.float64 else level.float().to(dtype)
        a, s = abar.sqrt(), (1 - abar).sqrt()
    else:
        s = level.to(dtype)
        a = 1.0 - s if family == "flow" else torch.ones_like(s)
    return torch.stack((a, s)).to(compute)


def continuous_family(schedule: Any) -> str | None:
    """ "flow" or "edm" when ``schedule`` names a continuous family, None for anything else
    but a string (a table schedule or a diffusers scheduler); ValueError for another string."""
    if not isinstance(schedule, str):
        return None
    if schedule not in CONTINUOUS_FAMILIES:
        raise ValueError(
            f"schedule must be a debias.NoiseSchedule, a diffusers scheduler or one of "
            f"{CONTINUOUS_FAMILIES} (continuous time: t holds each sample's sigma), got "
            f"{schedule!r}"
        )
    return schedule


def check_sigma(t: Any, family: str, batch: int | None = None) -> torch.Tensor:
    """``t`` of a continuous family, each sample's sigma: a float ``[B]`` tensor (``batch``:
    the B it must have), finite, in [0, 1] for flow and > 0 for edm; returned detached.
    Values are checked as ``NoiseSchedule.index`` checks timesteps: on the host for CPU tensors
    in eager mode (ValueError naming t and sigma), on other devices asynchronously
    (``torch._assert_async``, no synchronisation), not while torch.compile traces."""
    bound = "[0, 1]" if family == "flow" else "(0, inf)"
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"t must be a float torch.Tensor [B] of per-sample sigmas in {bound} on the "
            f"continuous {family} family, got {type(t).__name__}"
        )
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"t must hold per-sample sigmas in {bound} (a float tensor) on the continuous "
            f"{family} family, got dtype {t.dtype}"
        )
    if t.dim() != 1 or (batch is not None and t.shape[0] != batch):
        want = "[B]" if batch is None else f"[{batch}] (one sigma per sample)"
        raise ValueError(f"t (the per-sample sigma) must have shape {want}, got {list(t.shape)}")
    t = t.detach()
    check_range(
        t,
        lambda bad: (
            f"t holds the sigma of each sample, which must lie in {bound} on the "
            f"continuous {family} family; got {t[bad][:4].tolist()}"
        ),
        f"t: a sigma outside {bound} (or not finite)",
        low=0.0,
        high=1.0 if family == "flow" else math.inf,
        open_low=family == "edm",
    )
    return t


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
    *,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigmoid_scale: float = 1.0,
    shift: float = 3.0,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Training timesteps ``[batch_size]`` for ``schedule``, drawn as the trainers draw them.

    Continuous time (``schedule`` "flow" or "edm") returns float32 sigmas, each scheme drawing
    the numbers of the trainer line it names after the same ``torch.manual_seed``:

    - flow, "uniform": ``torch.rand((B,), device=device)``; "sigmoid":
      ``torch.sigmoid(sigmoid_scale * torch.randn((B,), device=device))``; "shift": that
      sigmoid, then ``(sigmas * shift) / (1 + (shift - 1) * sigmas)`` (default shift 3.0, as
      ``--discrete_flow_shift``); "flux_shift": that sigmoid, then ``time_shift(mu, 1.0,
      sigmas) = e^mu / (e^mu + (1 / sigmas - 1))`` with ``mu = get_lin_function(y1=0.5,
      y2=1.15)(seq_len)``, linear in the latent's token count ``seq_len`` from (256, 0.5) to
      (4096, 1.15) (sd-scripts passes ``(h // 2) * (w // 2)`` of the [B, C, h, w] latents):
      kohya-ss/sd-scripts, library/flux_train_utils.py, ``get_noisy_model_input_and_timesteps``
      (``--timestep_sampling``), ``time_shift``, ``get_lin_function``.
    - flow, "logit_normal" / "mode": diffusers' ``training_utils
      .compute_density_for_timestep_sampling(scheme, B, logit_mean, logit_std, mode_scale)``
      (CPU draws), the u itself as sigma, as diffusers' flux2 / qwen_image / z_image scripts.
    - edm, "lognormal": the EDM paper's ``(randn(B) * p_std + p_mean).exp()`` (Karras et al.
      2022, training/loss.py EDMLoss; P_mean -1.2, P_std 1.2), drawn on the CPU.

    Where they draw: sd-scripts' schemes with ``generator=None`` draw on ``device`` from that
    device's default generator, exactly as its ``torch.randn(..., device=device)`` (so after
    ``torch.manual_seed`` a CUDA device gives sd-scripts' CUDA numbers, not the CPU's); with a
    (CPU) ``generator`` every scheme draws on the CPU and the result moves to ``device``.

    A table schedule (a ``NoiseSchedule`` or a diffusers scheduler) returns its timesteps:

    - ddpm, "uniform": ``torch.randint(0, T, (B,))`` (int64), as diffusers' scripts.
    - flow: ``u = compute_density_for_timestep_sampling(scheme, B, logit_mean, logit_std,
      mode_scale)`` of diffusers' training_utils, then ``scheduler.timesteps[(u * T).long()]``
      as the SD3 / Flux scripts; scheme "uniform" (u ~ U[0, 1)), "logit_normal" (sigmoid of
      N(logit_mean, logit_std)) or "mode" (SD3's mode density, ``mode_scale`` in
      [-1, 2/(pi - 2)]). A u that rounds to 1.0 takes the last entry (the scripts would
      index past the table).
    - edm: "uniform" over the table (``scheduler.timesteps[randint(0, T, (B,))]``, the SDXL
      script's EDM branch) or "lognormal", the EDM paper's training density
      ln sigma ~ N(p_mean, p_std) (P_mean = -1.2, P_std = 1.2), each draw mapped to the
      table entry nearest in ln sigma (draws beyond the table's range take its end).
    Flow and EDM tables return the float32 timesteps of ``schedule.timesteps``. Table draws are
    made on the CPU from ``generator`` (a CPU ``torch.Generator``; None: torch's default) in
    the same order as those lines, so one generator state gives the same timesteps, and the
    result moves to ``device``.

    Raises:
        ValueError / TypeError naming the argument: a scheme the family does not draw with,
        a non-positive batch_size, a non-finite or out-of-range parameter, a non-CPU
        generator.
    """
    family = continuous_family(schedule)
    if family is not None:
        return _sample_sigmas(
            batch_size, family, scheme, generator, device, logit_mean, logit_std, mode_scale,
            p_mean, p_std, sigmoid_scale, shift, seq_len,
        )  # fmt: skip
    schedule = as_schedule(schedule)
    B = check_int("batch_size", batch_size, low=1)
    allowed = TIMESTEP_SCHEMES[schedule.family]
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a string, got {type(scheme).__name__}")
    if schedule.family == "flow" and scheme in _UNIFORM_WEIGHTING_SCHEMES:
        scheme = "uniform"  # the scripts' --weighting_scheme passes through as is
    if scheme not in allowed:
        raise ValueError(
            f"scheme {scheme!r} does not apply to a {schedule.family} schedule; use one of "
            f"{allowed}"
        )
    logit_mean, logit_std, mode_scale, p_mean, p_std = _check_density(
        logit_mean, logit_std, mode_scale, p_mean, p_std
    )
    generator = check_generator(generator, "timesteps are drawn on the host")
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
        t = schedule.timesteps[(u * T).long().clamp(0, T - 1)]
    elif scheme == "uniform":
        t = schedule.timesteps[torch.randint(0, T, (B,), generator=generator)]
    else:
        ln_sigma = torch.normal(mean=p_mean, std=p_std, size=(B,), generator=generator).double()
        t = schedule.timesteps[_nearest(schedule.sigma.log(), ln_sigma)]
    return t if device is None else t.to(device)


def _check_density(logit_mean, logit_std, mode_scale, p_mean, p_std) -> tuple[float, ...]:
    """The density parameters of sample_timesteps, checked by name."""
    logit_mean, p_mean = check_float("logit_mean", logit_mean), check_float("p_mean", p_mean)
    logit_std, p_std = (
        check_float("logit_std", logit_std, low=0.0),
        check_float("p_std", p_std, low=0.0),
    )
    mode_scale = check_float("mode_scale", mode_scale)
    lo, hi = _MODE_SCALE_RANGE
    if not lo <= mode_scale <= hi:
        raise ValueError(
            f"mode_scale must lie in [-1, 2/(pi - 2) = {hi:.4f}] (where SD3's mode density "
            f"stays in [0, 1]), got {mode_scale}"
        )
    return logit_mean, logit_std, mode_scale, p_mean, p_std


def _sample_sigmas(
    batch_size, family, scheme, generator, device, logit_mean, logit_std, mode_scale,
    p_mean, p_std, sigmoid_scale, shift, seq_len,
) -> torch.Tensor:  # fmt: skip
    """sample_timesteps for a continuous family: float32 sigmas ``[B]`` (docstring there)."""
    B = check_int("batch_size", batch_size, low=1)
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a string, got {type(scheme).__name__}")
    allowed = SIGMA_SCHEMES[family]
    if scheme not in allowed:
        raise ValueError(
            f"scheme {scheme!r} does not apply to the continuous {family} family; use one of "
            f"{allowed}"
        )
    logit_mean, logit_std, mode_scale, p_mean, p_std = _check_density(
        logit_mean, logit_std, mode_scale, p_mean, p_std
    )
    sigmoid_scale = check_float("sigmoid_scale", sigmoid_scale)
    shift = check_float("shift", shift, low=0.0)
    mu = None
    if scheme == "flux_shift":
        if seq_len is None:
            raise ValueError(
                "seq_len is required for scheme 'flux_shift': the latent's token count, "
                "(h // 2) * (w // 2) for Flux's packed [B, C, h, w] latents"
            )
        tokens = check_int("seq_len", seq_len, low=1)
        # get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15), in Python floats as there
        m = (1.15 - 0.5) / (4096 - 256)
        mu = m * tokens + (0.5 - m * 256)
    elif seq_len is not None:
        raise ValueError(f"seq_len applies to scheme 'flux_shift' only, not {scheme!r}")
    generator = check_generator(generator, "with a generator, sigmas are drawn on the host")
    on = "cpu" if generator is not None or device is None else device
    if family == "edm":
        sigma = (torch.randn(B, generator=generator) * p_std + p_mean).exp()
    elif scheme in ("logit_normal", "mode"):
        # compute_density_for_timestep_sampling as diffusers writes it, on the CPU
        if scheme == "logit_normal":
            u = torch.normal(mean=logit_mean, std=logit_std, size=(B,), generator=generator)
            sigma = torch.nn.functional.sigmoid(u)
        else:
            u = torch.rand(size=(B,), generator=generator)
            sigma = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    elif scheme == "uniform":
        sigma = torch.rand((B,), device=on, generator=generator)
    elif scheme == "sigmoid":
        sigma = torch.sigmoid(sigmoid_scale * torch.randn((B,), device=on, generator=generator))
    else:
        sigma = torch.randn(B, device=on, generator=generator)
        sigma = sigma * sigmoid_scale
        sigma = sigma.sigmoid()
        if scheme == "shift":
            sigma = (sigma * shift) / (1 + (shift - 1) * sigma)
        else:  # time_shift(mu, 1.0, sigmas)
            sigma = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1) ** 1.0)
    return sigma if device is None else sigma.to(device)


def _nearest(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """For each x, the index of the ``table`` entry nearest to it (table monotone)."""
    flip = table.numel() > 1 and bool(table[0] > table[-1])
    ascending = table.flip(0) if flip else table
    hi = torch.searchsorted(ascending, x).clamp(1, max(ascending.numel() - 1, 1))
    lo = hi - 1
    if ascending.numel() == 1:
        return torch.zeros_like(hi)
    pick = torch.where((x - ascending[lo]).abs() <= (ascending[hi] - x).abs(), lo, hi)
    return table.numel() - 1 - pick if flip else pick
