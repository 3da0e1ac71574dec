"""Samplers: DDPM ancestral sampling, DDIM, DPM-Solver++(2M) and UniPC on the full or a
respaced DDPM schedule; Euler and Heun for rectified-flow schedules.

Respacing follows guided-diffusion (``respace.py``): a subset of the training timesteps is
kept, the schedule is rebuilt from the ``abar`` at those steps, and the network is still
called with the original timestep indices.

Per step, with ``a = abar_t`` and ``a' = abar_prev`` of the (respaced) schedule, and
``a' = 1`` at the last step:

    x0_hat = (x_t - sqrt(1 - a) eps_hat) / sqrt(a)                       (epsilon)
    x0_hat = sqrt(a) x_t - sqrt(1 - a) v_hat,  eps_hat = sqrt(1 - a) x_t + sqrt(a) v_hat   (v)
    eps_hat = (x_t - sqrt(a) x0_hat) / sqrt(1 - a)         (sample, and after clipping x0_hat)

    ddpm:  x_{t'} = c1 x0_hat + c2 x_t + sqrt(beta_tilde) z,   beta = 1 - a / a',
           c1 = beta sqrt(a') / (1 - a),  c2 = (1 - a') sqrt(1 - beta) / (1 - a),
           beta_tilde = beta (1 - a') / (1 - a)                  ("fixed small", no z at the end)
    ddim:  x_{t'} = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat + sigma z,
           sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')

Learned variance (a model with 2C output channels, guided-diffusion's ``learn_sigma``): the
first C channels are the prediction above, the last C are v. "ddpm" then draws with
guided-diffusion's LEARNED_RANGE variance on the respaced schedule (``variance.py``):
``log var = frac log(beta) + (1 - frac) log(beta_tilde clipped)``, ``frac = (v + 1) / 2``, in
place of beta_tilde; the other methods use the first C channels and ignore v.

The multistep solvers work in lambda = log(alpha / sigma) (alpha = sqrt(a), sigma = sqrt(1-a))
on the data prediction m = x0_hat, over the points p_0 (noisiest kept step), ..., p_{S-1}
(step 0) and p_S = the clean end (alpha = 1, sigma = 0, lambda = +inf); h = lambda_{k+1} -
lambda_k:

    dpm++2m (DPM-Solver++(2M), Lu et al. 2022; diffusers' DPMSolverMultistepScheduler):
        x_{k+1} = (sigma_{k+1}/sigma_k) x_k - alpha_{k+1} (e^{-h} - 1) (m_k + D/2),
        D = (h / h_prev) (m_k - m_{k-1}). First order (D = 0) at the first step, at the
        step into the kept step 0 and at the last one, from step 0 to sigma = 0, which
        returns m_{S-1}. Step 0 (sigma 0.01 on the linear schedule) plays the part of
        diffusers' final sigma = 0, into which DPMSolverMultistepScheduler and
        UniPCMultistepScheduler (final_sigmas_type="zero") always step with first order, so
        their lower_order_final rule (first order at the end below 15 steps) holds at every
        step count. A second-order step into step 0 extrapolates across the largest lambda
        gap of an even t spacing: on Gaussian data it measured up to 5x (linear schedule) and
        80x (cosine, 40 steps) worse than first order.
    unipc (UniPC, Zhao et al. 2023, bh2, order 2, data prediction; diffusers'
        UniPCMultistepScheduler): the predictor UniP-2 is the dpm++2m update above; once
        m_k is known, the corrector UniC replaces x_k by
        (sigma_k/sigma_{k-1}) x_{k-1} - alpha_k B(h) (m_{k-1} + rho_t (m_k - m_{k-1})
        + rho_1 (m_{k-2} - m_{k-1}) / r_1) with B(h) = e^{-h} - 1 and r_1 = (lambda_{k-2} -
        lambda_{k-1}) / h, h = lambda_k - lambda_{k-1}; the rho solve diffusers' linear system
        (rho_t = 1/2, rho_1 = 0 after a first-order predictor). m_k stays the one evaluated
        at the uncorrected x_k. The predictor's orders are dpm++2m's; the corrector, which
        raises the order by one where the steps are smooth, follows the order of the
        predictor step that produced x_k (diffusers' ``this_order``).

Flow matching (``schedule.family == "flow"``, x_t = (1 - sigma) x0 + sigma eps, the model
predicts u = eps - x0 and is called with the float timestep ``sigma T``): N sigmas spaced as
diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)`` does, then 0:
``sigma = shift(linspace(sigma_max T, sigma_min T, N) / T)`` with
``shift(s) = shift s / (1 + (shift - 1) s)``, sigma_max and sigma_min the training range
(already shifted, so the smallest sigma is shifted twice, exactly as diffusers does; with
shift 1 the sigmas are plain linspace). The shift is read back from the schedule's sigmas.

    euler:  x_{k+1} = x_k + (sigma_{k+1} - sigma_k) u(x_k, sigma_k)
    heun:   Euler, then x_{k+1} = x_k + (sigma_{k+1} - sigma_k) (u(x_k) + u(x_e)) / 2 with
            x_e the Euler point; the last step (to sigma = 0) stays Euler (Karras et al.
            2022; diffusers' FlowMatchHeunDiscreteScheduler), so 2N - 1 model calls.

Noise contract (what makes paired samples of two models comparable): every tensor is drawn
from the one generator, on the CPU, in float32, with the full batch shape ``[N, C, H, W]``,
in this order and nothing else:

    1. x_T, unless the caller passes it;
    2. one tensor z per step, in sampling order (from the noisiest step down), drawn before
       that step's (first) model call, for every step and every method, including the last
       step and the deterministic methods (DDIM with eta=0, dpm++2m, unipc, euler, heun),
       where it goes unused.

So the noise depends on ``(generator, shape, number of steps)`` only: not on the model, the
method, eta, ``batch_size`` or the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from debias.checks import check_float, check_generator, check_int
from debias.pipeline.variance import DDPM_PREDICTIONS, model_log_variance, posterior_tables
from debias.schedules import FAMILY_PREDICTIONS, PREDICTIONS, TERM_X0, NoiseSchedule, as_schedule

__all__ = [
    "DDPM_METHODS",
    "DEFAULT_METHOD",
    "FLOW_METHODS",
    "METHODS",
    "flow_sigmas",
    "respace",
    "sample",
    "space_timesteps",
]

# The samplers of each schedule family, and the one ``method=None`` picks.
DDPM_METHODS = ("ddpm", "ddim", "dpm++2m", "unipc")
FLOW_METHODS = ("euler", "heun")
METHODS = DDPM_METHODS + FLOW_METHODS
FAMILY_METHODS = {"ddpm": DDPM_METHODS, "flow": FLOW_METHODS}
DEFAULT_METHOD = {"ddpm": "ddpm", "flow": "euler"}
# What the samplers of each family invert. Flow: the targets that read x0 (u = eps - x0, x0,
# v = alpha eps - sigma x0), as x_t holds none at sigma = 1, where sampling starts.
_PREDICTIONS = {
    "ddpm": DDPM_PREDICTIONS,
    "flow": tuple(p for p in FAMILY_PREDICTIONS["flow"] if PREDICTIONS[p].terms & TERM_X0),
}


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The timesteps to keep when sampling with fewer steps (guided-diffusion's rule).

    Args:
        num_timesteps: T, the number of steps of the original schedule.
        section_counts: one of
            - an int N: N evenly spaced steps from 0 to T-1 (the section form with one
              section; N=1 keeps step 0 only, as guided-diffusion does);
            - a list of ints or a comma string such as ``"10,15,20"``: [0, T) is cut into
              ``len(section_counts)`` equal sections (the first ``T % len`` one step longer)
              and section i contributes ``section_counts[i]`` steps at
              ``start + round(j * (size - 1) / (count - 1))``;
            - ``"ddimN"``: ``range(0, T, stride)`` for the smallest integer stride in
              [1, T) that gives exactly N steps (DDIM's uniform spacing).

    Returns:
        The kept timesteps, a sorted list of distinct ints in [0, T).

    Raises:
        ValueError: a count < 1 or larger than its section, an unparsable string, or a
            "ddimN" with no integer stride giving N steps.
    """
    T = check_int("num_timesteps", num_timesteps, 1)
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            desired = _parse_int(text[len("ddim") :], "section_counts", section_counts)
            if desired < 1:
                raise ValueError(f"section_counts={section_counts!r}: ddimN needs N >= 1")
            for stride in range(1, T):
                if len(range(0, T, stride)) == desired:
                    return list(range(0, T, stride))
            raise ValueError(
                f"section_counts={section_counts!r}: no integer stride gives exactly "
                f"{desired} steps out of num_timesteps={T}"
            )
        counts = [_parse_int(part, "section_counts", section_counts) for part in text.split(",")]
    elif isinstance(section_counts, bool):
        raise TypeError("section_counts must be an int, a str or a sequence of ints, got bool")
    elif isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, Sequence) and all(
        isinstance(c, int) and not isinstance(c, bool) for c in section_counts
    ):
        counts = list(section_counts)
    else:
        raise TypeError(
            "section_counts must be an int, a str ('10,15,20' or 'ddim50') or a sequence of "
            f"ints, got {section_counts!r}"
        )
    if not counts:
        raise ValueError("section_counts must name at least one section, got an empty list")
    if len(counts) > T:
        raise ValueError(
            f"section_counts has {len(counts)} sections but num_timesteps={T}: a section "
            "would be empty"
        )

    size_per, extra = divmod(T, len(counts))
    start = 0
    steps: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1:
            raise ValueError(f"section_counts[{i}]={count}: every section needs >= 1 step")
        if count > size:
            raise ValueError(
                f"section_counts[{i}]={count}: cannot take {count} steps from a section of "
                f"{size} steps (num_timesteps={T}, {len(counts)} sections)"
            )
        frac_stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            # Python's round (half to even) on the accumulated float, exactly as upstream.
            steps.append(start + round(cur))
            cur += frac_stride
        start += size
    return sorted(set(steps))


def respace(
    schedule: NoiseSchedule | Any, use_timesteps: Sequence[int] | torch.Tensor
) -> tuple[NoiseSchedule, torch.Tensor]:
    """The schedule restricted to ``use_timesteps`` (guided-diffusion's SpacedDiffusion).

    The kept steps keep their ``abar``; the new betas are ``1 - abar_i / abar_prev`` over the
    kept steps (``abar_prev = 1`` before the first), so the respaced process has the same
    marginals q(x_t | x0) at every kept step.

    Args:
        schedule: a ``NoiseSchedule`` (or a diffusers scheduler) with T steps.
        use_timesteps: S distinct indices in [0, T), increasing (a set is sorted first), e.g.
            the output of ``space_timesteps``.

    Returns:
        ``(respaced, timestep_map)``: a ``NoiseSchedule`` with S steps and the same
        ``prediction_type``, and ``[S]`` int64 original index of each respaced step.
    """
    schedule = as_schedule(schedule)
    T = schedule.num_timesteps
    if isinstance(use_timesteps, (set, frozenset)):
        use_timesteps = sorted(use_timesteps)
    if isinstance(use_timesteps, torch.Tensor):
        if use_timesteps.dtype.is_floating_point or use_timesteps.dtype == torch.bool:
            raise TypeError(f"use_timesteps must hold integers, got a {use_timesteps.dtype} tensor")
        index = use_timesteps.detach().to("cpu", torch.int64).flatten()
    else:
        values = [check_int("use_timesteps entries", v) for v in use_timesteps]
        index = torch.tensor(values, dtype=torch.int64)
    if index.numel() < 1:
        raise ValueError("use_timesteps must hold at least one timestep, got none")
    if index.min() < 0 or index.max() >= T:
        raise ValueError(
            f"use_timesteps must lie in [0, {T}) for a schedule of {T} steps, got values in "
            f"[{index.min().item()}, {index.max().item()}]"
        )
    if (index[1:] <= index[:-1]).any():
        raise ValueError("use_timesteps must be strictly increasing (sorted, no duplicates)")
    abar = schedule.alphas_cumprod[index]
    return NoiseSchedule(abar, schedule.prediction_type), index


@torch.no_grad()
def sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule | Any,
    shape_or_noise: Sequence[int] | torch.Tensor,
    *,
    steps: int | str | None = None,
    method: str | None = None,
    eta: float = 0.0,
    prediction: str | None = None,
    generator: torch.Generator | int | None = None,
    clip: bool = True,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw x_0 samples by running the reverse process of ``schedule``.

    Args:
        model: ``model(x_t [B, C, H, W] float32, t [B]) -> [B, C, H, W]`` (or ``[B, 2C, H,
            W]``: a learned variance, DDPM schedules only). DDPM: t is int64, the ORIGINAL
            timestep indices even when respaced. Flow: t is float32, ``sigma * T`` (diffusers'
            FlowMatchEulerDiscreteScheduler timesteps). An ``nn.Module`` is run in eval mode
            (each submodule's training flag is restored afterwards); an output object with a
            ``.sample`` tensor (diffusers) is unwrapped.
        schedule: the training schedule (T steps), a ``NoiseSchedule`` or diffusers scheduler:
            a DDPM schedule, or a flow-matching one (``NoiseSchedule.flow_matching``).
        shape_or_noise: ``(N, C, H, W)`` to draw x_T from ``generator``, or x_T itself
            ``[N, C, H, W]`` (flow: the sample at sigma_max = 1, pure noise).
        steps: DDPM methods: None: all T steps. A str goes through ``space_timesteps`` ("50",
            "10,15,20", "ddim50"). An int N in [1, T]: N evenly spaced steps including 0 and
            T-1 (``space_timesteps(T, N)``, guided-diffusion's even spacing), except for
            "ddim": ``space_timesteps(T, f"ddim{N}")``, i.e. ``range(0, T, stride)`` (DDIM's
            spacing, e.g. 0, 20, ..., 980 for 50 of 1000), when an integer stride gives exactly
            N steps, else the even spacing. Flow methods: None: T steps; an int N >= 1 (or its
            str): N sigmas spaced as in the module docstring.
        method: None: ``DEFAULT_METHOD[schedule.family]`` ("ddpm" for DDPM, "euler" for flow).
            DDPM schedules: "ddpm" (ancestral, posterior variance beta_tilde, or the learned
            one), "ddim", "dpm++2m", "unipc". Flow schedules: "euler", "heun".
        eta: DDIM's noise scale, >= 0 (0: deterministic, 1: DDPM-like). Must be 0 for the
            other methods.
        prediction: what the model returns; default ``schedule.prediction_type``. DDPM:
            "epsilon", "v_prediction" or "sample". Flow: "flow" (u = eps - x0), "sample" or
            "v_prediction" (alpha eps - sigma x0 with alpha = 1 - sigma).
        generator: a CPU ``torch.Generator``, an int seed (a fresh CPU generator), or None
            (torch's default generator; a model that itself draws from it then shifts the
            stream, so pass a seed for paired samples). See the module docstring for the
            order of the draws.
        clip: clamp x0_hat to [-1, 1] at every step (and recompute eps_hat, or u, from it).
        batch_size: at most this many images per model call; None: all N at once. Does not
            change the result (noise is drawn for all N per step).
        device: where x_t lives and the result is returned; default the model's parameter
            device, else the device of a given x_T, else the CPU. The model is called on its
            own parameter device.
        progress: show a tqdm bar over the steps.

    Returns:
        ``[N, C, H, W]`` float32 samples on ``device``.

    Raises:
        ValueError: bad arguments (the message names them), a method of the other schedule
            family, a model output with neither C nor (DDPM) 2C channels, or a non-finite
            model output (the message names the step and timestep where it appeared).
    """
    schedule = as_schedule(schedule)
    T = schedule.num_timesteps
    method = _check_method(method, schedule.family)
    flow = schedule.family == "flow"
    eta = _check_eta(eta, method)
    if prediction is None:
        prediction = schedule.prediction_type
    allowed = _PREDICTIONS[schedule.family]
    if prediction not in allowed:
        raise ValueError(
            f"prediction must be one of {allowed} for a {schedule.family} schedule, got "
            f"{prediction!r}"
        )
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool, got {type(clip).__name__}")
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, 1)
    gen = check_generator(generator, "noise is drawn on the CPU", seed=True)
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")

    shape, x_T = _check_shape_or_noise(shape_or_noise)
    model_device = _module_device(model)
    if device is None:
        device = model_device or (x_T.device if x_T is not None else torch.device("cpu"))
    device = torch.device(device)
    call_device = model_device or device

    if flow:
        sigmas, model_t = flow_sigmas(schedule, _resolve_flow_steps(steps, T))
        S = model_t.numel()
        stepper: _Stepper = _FlowStepper(sigmas, model_t, method, prediction, clip)
    else:
        kept = _resolve_steps(steps, T, method)
        spaced, timestep_map = respace(schedule, kept)
        abar = spaced.alphas_cumprod
        if prediction == "epsilon" and (abar == 0).any():
            raise ValueError(
                "prediction='epsilon' cannot be sampled through a step with abar == 0 (a "
                "zero-terminal-SNR schedule): x0 = (x_t - eps)/0 is undefined there; use "
                "v_prediction or sample"
            )
        S = abar.numel()
        if method in ("ddpm", "ddim"):
            stepper = _DDPMStepper(abar, timestep_map, method, eta, prediction, clip)
        else:
            stepper = _MultistepStepper(abar, timestep_map, method, prediction, clip)

    if x_T is None:
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
    else:
        x = x_T.detach().to(device, torch.float32, copy=True)
    N, C = shape[0], shape[1]
    chunk = N if batch_size is None else batch_size

    def evaluate(x: torch.Tensor, t_value: int | float, k: int) -> torch.Tensor:
        """The model output at every x in chunks, float32 on ``device``, checked."""
        dtype = torch.float32 if flow else torch.int64
        t_batch = torch.full((min(chunk, N),), t_value, dtype=dtype, device=call_device)
        out: torch.Tensor | None = None
        for start in range(0, N, chunk):
            xb = x[start : start + chunk]
            pred = _call(model, xb.to(call_device), t_batch[: xb.shape[0]])
            channels = (C,) if flow else (C, 2 * C)
            if (
                pred.dim() != xb.dim()
                or pred.shape[0] != xb.shape[0]
                or pred.shape[2:] != xb.shape[2:]
                or pred.shape[1] not in channels
            ):
                allowed_shapes = " or ".join(str((xb.shape[0], c, *xb.shape[2:])) for c in channels)
                raise ValueError(
                    f"model output has shape {tuple(pred.shape)} at step {k} (t={t_value}) "
                    f"but its input x_t has shape {tuple(xb.shape)}; it must be "
                    f"{allowed_shapes}" + ("" if flow else " (2C: a learned variance)")
                )
            if out is None:
                out = torch.empty((N, *pred.shape[1:]), dtype=torch.float32, device=device)
            elif pred.shape[1] != out.shape[1]:
                raise ValueError(
                    f"model output has {pred.shape[1]} channels for one batch and "
                    f"{out.shape[1]} for another at step {k} (t={t_value})"
                )
            out[start : start + chunk] = pred.to(device, torch.float32)
        assert out is not None
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"model output is not finite at sampling step {k} of {S} "
                f"(timestep t={t_value}, prediction={prediction!r})"
            )
        return out

    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    was_training = [m.training for m in modules]
    if modules:
        model.eval()
    try:
        for k in tqdm(range(S), desc=f"sampling ({method})", unit="step", disable=not progress):
            z = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
            x = stepper.step(k, x, z, evaluate)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"the samples are not finite after the last step ({S} steps, method={method!r})"
            )
    finally:
        for m, flag in zip(modules, was_training, strict=True):
            m.training = flag
    return x


def _step(
    x: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    c: dict[str, float],
    prediction: str,
    method: str,
    clip: bool,
) -> torch.Tensor:
    """One reverse step; coefficients are float64-derived Python floats, tensors float32."""
    if prediction == "epsilon":
        eps = out
        x0 = (x - c["sqrt_1ma"] * eps) * c["rsqrt_a"]
    elif prediction == "v_prediction":
        x0 = c["sqrt_a"] * x - c["sqrt_1ma"] * out
        eps = c["sqrt_1ma"] * x + c["sqrt_a"] * out
    else:
        x0 = out
        eps = None
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = None
    if method == "ddpm":
        x_prev = c["c1"] * x0 + c["c2"] * x
    else:
        if eps is None:
            # This form stays finite at abar == 0, unlike guided-diffusion's 1/sqrt(abar) one.
            eps = (x - c["sqrt_a"] * x0) * c["rsqrt_1ma"]
        x_prev = c["sqrt_a_prev"] * x0 + c["dir"] * eps
    if c["std"] > 0.0:
        x_prev = x_prev + c["std"] * z
    return x_prev


def _step_coefficients(abar: torch.Tensor, method: str, eta: float) -> list[dict[str, float]]:
    """Per respaced step i, the float64 coefficients of ``_step`` as Python floats."""
    coefs = []
    for i in range(abar.numel()):
        a = abar[i].item()
        a_prev = abar[i - 1].item() if i > 0 else 1.0
        c = {
            "sqrt_a": math.sqrt(a),
            "sqrt_1ma": math.sqrt(1.0 - a),
            "rsqrt_a": 1.0 / math.sqrt(a) if a > 0 else math.inf,
            "rsqrt_1ma": 1.0 / math.sqrt(1.0 - a),
            "sqrt_a_prev": math.sqrt(a_prev),
        }
        if method == "ddpm":
            beta = 1.0 - a / a_prev
            c["c1"] = beta * math.sqrt(a_prev) / (1.0 - a)
            c["c2"] = (1.0 - a_prev) * math.sqrt(1.0 - beta) / (1.0 - a)
            c["std"] = math.sqrt(beta * (1.0 - a_prev) / (1.0 - a)) if i > 0 else 0.0
        else:
            sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
            rest = 1.0 - a_prev - sigma**2
            if rest < -1e-12:
                raise ValueError(
                    f"eta={eta} is too large for this schedule: 1 - abar_prev - sigma^2 = "
                    f"{rest:.3g} < 0 at respaced step {i}; use eta in [0, 1]"
                )
            c["dir"] = math.sqrt(max(rest, 0.0))
            c["std"] = sigma
        coefs.append(c)
    return coefs


class _Stepper:
    """One sampling step k (0 = the noisiest) of a method: its coefficients and its state."""

    def step(
        self,
        k: int,
        x: torch.Tensor,
        z: torch.Tensor,
        evaluate: Callable[[torch.Tensor, int | float, int], torch.Tensor],
    ) -> torch.Tensor:
        raise NotImplementedError


class _DDPMStepper(_Stepper):
    """The "ddpm" (fixed small or learned variance) and "ddim" steps, through ``_step``."""

    def __init__(self, abar, timestep_map, method, eta, prediction, clip):
        self.abar, self.timestep_map = abar, timestep_map
        self.method, self.prediction, self.clip = method, prediction, clip
        self.coefs = _step_coefficients(abar, method, eta)
        self.log_var: tuple[list[float], list[float]] | None = None

    def step(self, k, x, z, evaluate):
        i = len(self.coefs) - 1 - k
        out = evaluate(x, int(self.timestep_map[i]), k)
        C = x.shape[1]
        c = self.coefs[i]
        if out.shape[1] == C or self.method == "ddim":
            return _step(x, out[:, :C], z, c, self.prediction, self.method, self.clip)
        # Learned variance: the fixed-variance mean, then LEARNED_RANGE noise (none at the end).
        x_prev = _step(x, out[:, :C], z, {**c, "std": 0.0}, self.prediction, "ddpm", self.clip)
        if i == 0:
            return x_prev
        if self.log_var is None:
            tables = posterior_tables(self.abar)
            self.log_var = (
                tables["log_betas"].tolist(),
                tables["posterior_log_variance_clipped"].tolist(),
            )
        log_var = model_log_variance(out[:, C:], self.log_var[0][i], self.log_var[1][i])
        return x_prev + torch.exp(0.5 * log_var) * z


class _MultistepStepper(_Stepper):
    """The "dpm++2m" and "unipc" steps on the data prediction m = x0_hat (module docstring)."""

    def __init__(self, abar, timestep_map, method, prediction, clip):
        S = abar.numel()
        self.timestep_map, self.prediction, self.clip = timestep_map, prediction, clip
        self.coefs = _step_coefficients(abar, "ddim", 0.0)
        # Points p_0 .. p_S: the kept steps from the noisiest down, then the clean end.
        a = abar.flip(0).tolist()
        alpha = [math.sqrt(v) for v in a] + [1.0]
        sigma = [math.sqrt(1.0 - v) for v in a] + [0.0]
        lam = [_log_snr_half(al, si) for al, si in zip(alpha, sigma, strict=True)]
        if any(lam[j + 1] <= lam[j] for j in range(S)):
            raise ValueError(
                f"method={method!r} needs abar strictly decreasing over the kept steps (each "
                "step must lower the noise)"
            )
        # First order at the first step, into step 0 and from it (see the module docstring).
        order = [1 if k == 0 or k >= S - 2 else 2 for k in range(S)]
        self.pred = [_dpm_coefficients(alpha, sigma, lam, k, order[k]) for k in range(S)]
        self.corr = [None] + [
            _unic_coefficients(alpha, sigma, lam, k, order[k - 1]) for k in range(1, S)
        ]
        self.use_corrector = method == "unipc"
        self.last: torch.Tensor | None = None
        self.m1: torch.Tensor | None = None  # m_{k-1}
        self.m2: torch.Tensor | None = None  # m_{k-2}

    def step(self, k, x, z, evaluate):
        i = len(self.coefs) - 1 - k
        out = evaluate(x, int(self.timestep_map[i]), k)
        m = _data_prediction(x, out[:, : x.shape[1]], self.coefs[i], self.prediction, self.clip)
        corr = self.corr[k]
        if self.use_corrector and corr is not None:
            cx, cm, ct, c2 = corr
            x = cx * self.last + cm * self.m1 + ct * (m - self.m1)
            if c2 != 0.0:
                x = x + c2 * (self.m2 - self.m1)
        cx, c0, c1 = self.pred[k]
        x_next = cx * x + c0 * m
        if c1 != 0.0:
            x_next = x_next + c1 * (self.m1 - m)
        self.last, self.m2, self.m1 = x, self.m1, m
        return x_next


class _FlowStepper(_Stepper):
    """The "euler" and "heun" steps on u = eps - x0, from sigma_max down to 0."""

    def __init__(self, sigmas, model_t, method, prediction, clip):
        self.sigmas = [float(v) for v in sigmas]
        self.model_t = [float(v) for v in model_t]
        self.heun = method == "heun"
        self.prediction, self.clip = prediction, clip

    def step(self, k, x, z, evaluate):
        sig, sig_next = self.sigmas[k], self.sigmas[k + 1]
        u = _flow_velocity(x, evaluate(x, self.model_t[k], k), sig, self.prediction, self.clip)
        x_euler = x + (sig_next - sig) * u
        if not self.heun or sig_next == 0.0:
            return x_euler
        out = evaluate(x_euler, self.model_t[k + 1], k)
        u_next = _flow_velocity(x_euler, out, sig_next, self.prediction, self.clip)
        return x + (sig_next - sig) * 0.5 * (u + u_next)


def _log_snr_half(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), -inf at alpha = 0 and +inf at sigma = 0."""
    if alpha == 0.0:
        return -math.inf
    if sigma == 0.0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def _dpm_coefficients(alpha, sigma, lam, k, order) -> tuple[float, float, float]:
    """``(cx, c0, c1)`` of x_{k+1} = cx x_k + c0 m_k + c1 (m_{k-1} - m_k): DPM-Solver++(2M),
    which is also UniPC's predictor UniP-2 with B(h) = e^{-h} - 1 (rho = 1/2)."""
    h = lam[k + 1] - lam[k]
    em = math.expm1(-h)
    c1 = -0.5 * alpha[k + 1] * em * h / (lam[k - 1] - lam[k]) if order == 2 else 0.0
    return sigma[k + 1] / sigma[k], -alpha[k + 1] * em, c1


def _unic_coefficients(alpha, sigma, lam, k, order) -> tuple[float, float, float, float]:
    """``(cx, cm, ct, c2)`` of UniC-``order`` (bh2, data prediction) replacing x_k by
    cx x_{k-1} + cm m_{k-1} + ct (m_k - m_{k-1}) + c2 (m_{k-2} - m_{k-1}) (diffusers'
    ``multistep_uni_c_bh_update`` written out for orders 1 and 2)."""
    h = lam[k] - lam[k - 1]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1  # bh2: B(h) = e^{-h} - 1
    h_phi_k = h_phi_1 / hh - 1.0
    b1 = h_phi_k / b_h
    if order == 1:
        rho_t, c2 = 0.5, 0.0
    else:
        b2 = (h_phi_k / hh - 0.5) * 2.0 / b_h
        r1 = (lam[k - 2] - lam[k - 1]) / h
        # diffusers solves [[1, 1], [r1, 1]] (rho_1, rho_t) = (b1, b2).
        rho_1 = (b1 - b2) / (1.0 - r1)
        rho_t = b1 - rho_1
        c2 = -alpha[k] * b_h * rho_1 / r1
    return sigma[k] / sigma[k - 1], -alpha[k] * h_phi_1, -alpha[k] * b_h * rho_t, c2


def _data_prediction(
    x: torch.Tensor, out: torch.Tensor, c: dict[str, float], prediction: str, clip: bool
) -> torch.Tensor:
    """x0_hat from a DDPM model output, clamped to [-1, 1] with ``clip``."""
    if prediction == "epsilon":
        x0 = (x - c["sqrt_1ma"] * out) * c["rsqrt_a"]
    elif prediction == "v_prediction":
        x0 = c["sqrt_a"] * x - c["sqrt_1ma"] * out
    else:
        x0 = out
    return x0.clamp(-1.0, 1.0) if clip else x0


def _flow_velocity(
    x: torch.Tensor, out: torch.Tensor, sigma: float, prediction: str, clip: bool
) -> torch.Tensor:
    """u = eps - x0 at x = (1 - sigma) x0 + sigma eps (sigma > 0) from a flow model output;
    with ``clip`` from the clamped x0_hat, u = (x - x0_hat) / sigma."""
    if prediction == "flow" and not clip:
        return out
    alpha = 1.0 - sigma
    if prediction == "flow":
        x0 = x - sigma * out
    elif prediction == "sample":
        x0 = out
    else:
        # v = alpha eps - sigma x0 (not variance preserving here): invert the 2x2 system.
        norm = alpha * alpha + sigma * sigma
        x0 = (alpha * x - sigma * out) / norm
        if not clip:
            return (sigma * x + alpha * out) / norm - x0
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    return (x - x0) / sigma


def flow_sigmas(schedule: NoiseSchedule | Any, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling sigmas of a flow-matching schedule, as diffusers'
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)`` computes them.

    ``timesteps = linspace(sigma_max T, sigma_min T, num_steps)`` in float64 over the
    schedule's training range, ``s = timesteps / T``, ``sigma = shift s / (1 + (shift - 1) s)``
    (the shift read back from the schedule's sigmas; sigma_max and sigma_min are already
    shifted, so the smallest is shifted twice, as in diffusers), cast to float32; the model
    timesteps are ``sigma * T`` in float32.

    Args:
        schedule: a flow schedule (``NoiseSchedule.flow_matching(T, shift)`` or a diffusers
            FlowMatchEulerDiscreteScheduler).
        num_steps: N >= 1.

    Returns:
        ``(sigmas [N + 1] float32 ending with 0, timesteps [N] float32)``.

    Raises:
        ValueError: not a flow schedule, or sigmas that no shift reproduces.
    """
    schedule = as_schedule(schedule)
    if schedule.family != "flow":
        raise ValueError(f"schedule must be a flow schedule, got a {schedule.family} schedule")
    N = check_int("num_steps", num_steps, 1)
    T = schedule.num_timesteps
    shift = _flow_shift(schedule)
    table = schedule.sigmas
    s = np.linspace(table.max().item() * T, table.min().item() * T, N) / T
    sig = torch.from_numpy(shift * s / (1 + (shift - 1) * s)).to(torch.float32)
    return torch.cat([sig, sig.new_zeros(1)]), sig * T


def _flow_shift(schedule: NoiseSchedule) -> float:
    """The shift of sigma = shift s / (1 + (shift - 1) s), s = (T - k) / T, that rebuilds the
    schedule's float32 sigmas (as ``NoiseSchedule.flow_matching`` builds them)."""
    T = schedule.num_timesteps
    table = schedule.sigmas
    s32 = torch.arange(T, 0, -1, dtype=torch.float64).float() / T
    s, sig = s32.double(), table.double()
    usable = (s < 1) & (sig < 1)
    if not usable.any():
        return 1.0
    est = sig[usable] * (1 - s[usable]) / (s[usable] * (1 - sig[usable]))
    shift = est.median().item()
    if not math.isfinite(shift) or shift <= 0:
        shift = math.nan
    else:
        # The estimate carries float32 noise (1.7000002 for 1.7); the shift a user typed is
        # the short decimal that rebuilds the table exactly, and matches diffusers to the bit.
        for digits in (4, 6, 7):
            short = float(f"{shift:.{digits}g}")
            if torch.equal(short * s32 / (1 + (short - 1) * s32), table):
                shift = short
                break
    rebuilt = shift * s32 / (1 + (shift - 1) * s32)
    if not math.isfinite(shift) or (rebuilt - table).abs().max().item() > 1e-5:
        raise ValueError(
            "schedule: the flow samplers space sigmas as diffusers' FlowMatchEulerDiscrete"
            "Scheduler does, which needs training sigmas shift s / (1 + (shift - 1) s) with "
            "s = T, T-1, .., 1 over T (NoiseSchedule.flow_matching(T, shift)); this schedule's "
            "sigmas follow no shift"
        )
    return shift


def _resolve_steps(steps: int | str | None, T: int, method: str) -> list[int]:
    if steps is None:
        return list(range(T))
    if isinstance(steps, str):
        try:
            return space_timesteps(T, steps)
        except ValueError as err:
            raise ValueError(f"steps={steps!r}: {err}") from None
    if not isinstance(steps, int | np.integer) or isinstance(steps, bool):
        raise TypeError(
            f"steps must be None, an int or a str such as '50' or 'ddim50', got {steps!r}"
        )
    steps = check_int("steps", steps)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in [1, {T}] for a schedule of {T} steps, got {steps}")
    if method == "ddim":
        try:
            return space_timesteps(T, f"ddim{steps}")
        except ValueError:
            pass
    return space_timesteps(T, steps)


def _check_shape_or_noise(
    shape_or_noise: Sequence[int] | torch.Tensor,
) -> tuple[tuple[int, ...], torch.Tensor | None]:
    if isinstance(shape_or_noise, torch.Tensor):
        if shape_or_noise.dim() != 4:
            raise ValueError(
                "shape_or_noise as a tensor must be x_T [N, C, H, W], got shape "
                f"{tuple(shape_or_noise.shape)}"
            )
        if not shape_or_noise.is_floating_point():
            raise TypeError(f"shape_or_noise must be a float tensor, got {shape_or_noise.dtype}")
        if shape_or_noise.numel() == 0:
            raise ValueError(f"shape_or_noise is empty: shape {tuple(shape_or_noise.shape)}")
        if not bool(torch.isfinite(shape_or_noise).all()):
            raise ValueError("shape_or_noise (x_T) holds non-finite values")
        return tuple(shape_or_noise.shape), shape_or_noise
    if not isinstance(shape_or_noise, Sequence) or isinstance(shape_or_noise, str):
        raise TypeError(
            "shape_or_noise must be a shape (N, C, H, W) or an x_T tensor, got "
            f"{type(shape_or_noise).__name__}"
        )
    shape = tuple(shape_or_noise)
    try:
        if len(shape) != 4:
            raise ValueError
        shape = tuple(check_int("shape_or_noise", s, 1) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"shape_or_noise must be 4 positive ints (N, C, H, W), got {shape!r}"
        ) from None
    return shape, None


def _check_method(method: str | None, family: str) -> str:
    if family not in DEFAULT_METHOD:
        raise ValueError(
            f"schedule: sample() runs ddpm and flow schedules, got a {family} schedule"
        )
    if method is None:
        return DEFAULT_METHOD[family]
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if family == "ddpm" and method not in DDPM_METHODS:
        raise ValueError(
            f"method must be one of {DDPM_METHODS} for a ddpm schedule, got {method!r}: it "
            "samples flow-matching schedules (NoiseSchedule.flow_matching)"
        )
    if family == "flow" and method not in FLOW_METHODS:
        raise ValueError(
            f"method must be one of {FLOW_METHODS} for a flow schedule, got {method!r}: it "
            "samples DDPM schedules"
        )
    return method


def _resolve_flow_steps(steps: int | str | None, T: int) -> int:
    if steps is None:
        return T
    if isinstance(steps, str):
        try:
            steps = int(steps.strip())
        except ValueError:
            raise ValueError(
                f"steps={steps!r}: a flow sampler takes a number of steps (an int such as 28)"
            ) from None
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise TypeError(f"steps must be None or an int for a flow sampler, got {steps!r}")
    return check_int("steps", steps, 1)


def _check_eta(eta: float, method: str) -> float:
    eta = check_float("eta", eta, low=0.0, inclusive=True)
    if method == "ddpm" and eta != 0:
        raise ValueError(
            f"eta={eta} only applies to method='ddim'; method='ddpm' uses the posterior "
            "variance and needs eta=0"
        )
    if method != "ddim" and eta != 0:
        raise ValueError(
            f"eta={eta} only applies to method='ddim'; method={method!r} is deterministic and "
            "needs eta=0"
        )
    return eta


def _module_device(model: Any) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return None


def _call(model: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    if not isinstance(out, torch.Tensor):
        # diffusers models return an output object holding the tensor in `.sample`.
        out = getattr(out, "sample", out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a tensor, got {type(out).__name__}")
    return out


def _parse_int(text: str, name: str, whole: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(
            f"{name}={whole!r} is not understood: use an int, comma-separated ints such as "
            "'10,15,20', or 'ddimN'"
        ) from None
