"""Samplers: DDPM ancestral sampling and DDIM, on the full or a respaced schedule.

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

Noise contract (what makes paired samples of two models comparable): every tensor is drawn
from the one generator, on the CPU, in float32, with the full batch shape ``[N, C, H, W]``,
in this order and nothing else:

    1. x_T, unless the caller passes it;
    2. one tensor z per step, in sampling order (from the noisiest step down), drawn before
       that step's model call, for every step, including the last one and DDIM with eta=0
       where it goes unused.

So the noise depends on ``(generator, shape, number of steps)`` only: not on the model, the
method, eta, ``batch_size`` or the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from debias._checks import check_int
from debias.schedules import FAMILY_PREDICTIONS, NoiseSchedule, as_schedule

# The DDPM targets the samplers here invert (the pipeline trains DDPM schedules).
_PREDICTIONS = FAMILY_PREDICTIONS["ddpm"][:3]

__all__ = ["respace", "sample", "space_timesteps"]

METHODS = ("ddpm", "ddim")


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
        values = list(use_timesteps)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"use_timesteps must hold ints, got {values!r}")
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
    method: str = "ddpm",
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
        model: ``model(x_t [B, C, H, W] float32, t [B] int64) -> [B, C, H, W]``, called with
            the ORIGINAL timestep indices even when respaced. An ``nn.Module`` is run in eval
            mode (each submodule's training flag is restored afterwards); an output object
            with a ``.sample`` tensor (diffusers) is unwrapped.
        schedule: the training schedule (T steps), a ``NoiseSchedule`` or diffusers scheduler.
        shape_or_noise: ``(N, C, H, W)`` to draw x_T from ``generator``, or x_T itself
            ``[N, C, H, W]``.
        steps: None: all T steps. A str goes through ``space_timesteps`` ("50", "10,15,20",
            "ddim50"). An int N in [1, T]: for "ddpm" N evenly spaced steps including 0 and
            T-1 (``space_timesteps(T, N)``); for "ddim" ``space_timesteps(T, f"ddim{N}")``,
            i.e. ``range(0, T, stride)`` (DDIM's spacing, e.g. 0, 20, ..., 980 for 50 of
            1000), when an integer stride gives exactly N steps, else the even spacing.
        method: "ddpm" (ancestral, posterior variance beta_tilde) or "ddim".
        eta: DDIM's noise scale, >= 0 (0: deterministic, 1: DDPM-like). Must be 0 for ddpm.
        prediction: what the model returns: "epsilon", "v_prediction" or "sample"; default
            ``schedule.prediction_type``.
        generator: a CPU ``torch.Generator``, an int seed (a fresh CPU generator), or None
            (torch's default generator; a model that itself draws from it then shifts the
            stream, so pass a seed for paired samples). See the module docstring for the
            order of the draws.
        clip: clamp x0_hat to [-1, 1] at every step (and recompute eps_hat from it).
        batch_size: at most this many images per model call; None: all N at once. Does not
            change the result (noise is drawn for all N per step).
        device: where x_t lives and the result is returned; default the model's parameter
            device, else the device of a given x_T, else the CPU. The model is called on its
            own parameter device.
        progress: show a tqdm bar over the steps.

    Returns:
        ``[N, C, H, W]`` float32 samples on ``device``.

    Raises:
        ValueError: bad arguments (the message names them), or a non-finite model output
            (the message names the step and timestep where it appeared).
    """
    schedule = as_schedule(schedule)
    T = schedule.num_timesteps
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    eta = _check_eta(eta, method)
    if prediction is None:
        prediction = schedule.prediction_type
    if prediction not in _PREDICTIONS:
        raise ValueError(f"prediction must be one of {_PREDICTIONS}, got {prediction!r}")
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool, got {type(clip).__name__}")
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, 1)
    gen = _as_generator(generator)
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")

    shape, x_T = _check_shape_or_noise(shape_or_noise)
    model_device = _module_device(model)
    if device is None:
        device = model_device or (x_T.device if x_T is not None else torch.device("cpu"))
    device = torch.device(device)
    call_device = model_device or device

    kept = _resolve_steps(steps, T, method)
    spaced, timestep_map = respace(schedule, kept)
    abar = spaced.alphas_cumprod
    if prediction == "epsilon" and (abar == 0).any():
        raise ValueError(
            "prediction='epsilon' cannot be sampled through a step with abar == 0 (a "
            "zero-terminal-SNR schedule): x0 = (x_t - eps)/0 is undefined there; use "
            "v_prediction or sample"
        )
    coefs = _step_coefficients(abar, method, eta)

    if x_T is None:
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
    else:
        x = x_T.detach().to(device, torch.float32, copy=True)
    N = shape[0]
    chunk = N if batch_size is None else batch_size

    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    was_training = [m.training for m in modules]
    if modules:
        model.eval()
    try:
        S = abar.numel()
        for k in tqdm(range(S), desc=f"sampling ({method})", unit="step", disable=not progress):
            i = S - 1 - k
            t_orig = int(timestep_map[i])
            z = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
            out = torch.empty_like(x)
            t_batch = torch.full((min(chunk, N),), t_orig, dtype=torch.int64, device=call_device)
            for start in range(0, N, chunk):
                xb = x[start : start + chunk]
                pred = _call(model, xb.to(call_device), t_batch[: xb.shape[0]])
                if pred.shape != xb.shape:
                    raise ValueError(
                        f"model output has shape {tuple(pred.shape)} at step {k} (t={t_orig}) "
                        f"but its input x_t has shape {tuple(xb.shape)}; they must match"
                    )
                out[start : start + chunk] = pred.to(device, torch.float32)
            if not bool(torch.isfinite(out).all()):
                raise ValueError(
                    f"model output is not finite at sampling step {k} of {S} "
                    f"(timestep t={t_orig}, prediction={prediction!r})"
                )
            x = _step(x, out, z, coefs[i], prediction, method, clip)
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


def _resolve_steps(steps: int | str | None, T: int, method: str) -> list[int]:
    if steps is None:
        return list(range(T))
    if isinstance(steps, str):
        try:
            return space_timesteps(T, steps)
        except ValueError as err:
            raise ValueError(f"steps={steps!r}: {err}") from None
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(
            f"steps must be None, an int or a str such as '50' or 'ddim50', got {steps!r}"
        )
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
    if len(shape) != 4 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise ValueError(f"shape_or_noise must be 4 positive ints (N, C, H, W), got {shape!r}")
    return shape, None


def _check_eta(eta: float, method: str) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float, got {type(eta).__name__}")
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite float >= 0, got {eta}")
    if method == "ddpm" and eta != 0:
        raise ValueError(
            f"eta={eta} only applies to method='ddim'; method='ddpm' uses the posterior "
            "variance and needs eta=0"
        )
    return eta


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(
                f"generator must be a CPU torch.Generator (noise is drawn on the CPU), got one "
                f"on {generator.device}"
            )
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device="cpu").manual_seed(generator)
    raise TypeError(
        f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}"
    )


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
