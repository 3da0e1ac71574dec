"""The loss side of one diffusion training step — noising, weighted loss, backward — per
provider, on the same inputs, for two families: DDPM (epsilon target, debias weighting) and
flow matching (Flux/SD3: target noise - x0, cosmap weighting); and one training step of a
small UNet around the DDPM one.

    pytest benchmarks/bench_noise_loss.py --benchmark-json=bench.json
    python benchmarks/report.py bench.json

Providers: ``eager`` is the code trainers run today (DDPM: debias.reference, as diffusers'
train_text_to_image.py; flow: the lines of diffusers' Flux/SD3 DreamBooth scripts);
``compile`` is torch.compile of that same function; the others are debias' fused ops on one
backend, and on a GPU in each of the two gradient designs (``GRAD_IN_FORWARD``, below).
Before a provider is timed, its x_t, loss and gradient are checked against eager on the same
inputs and the same noise; a provider that disagrees fails its test and is never timed.

Runs on CUDA when there is a GPU, else on the CPU; DEBIAS_BENCH_DEVICE=cpu|cuda forces one.
On the CPU pytest-benchmark times each case (host clock). On CUDA the times come from CUDA
events (triton.testing.do_bench) and are stored in each result's extra_info; pytest-benchmark
then runs the step once, only so that the case lands in --benchmark-json.

With DEBIAS_BENCH_JSONL=path each result is also appended to that file (one JSON object a
line) as soon as its test ends, so that a run stopped at a time limit keeps every finished
case: --benchmark-json is written only when the session ends. report.py reads either file.
Where pytest-benchmark is not installed, a small stand-in fixture (``_Benchmark``) times the
cases instead; the results then reach the JSONL file only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import pytest
import torch
from torch._C._profiler import _EventType

import debias
from debias import reference
from debias.ops import _backend
from debias.ops import noise_loss as noise_loss_ops

DEVICE = torch.device(
    os.environ.get("DEBIAS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
ON_GPU = DEVICE.type == "cuda"
# Every core this process may run on (2 on the reference machine); recorded with each result.
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
CPU_SHAPES = ((128, 3, 32, 32), (32, 4, 64, 64), (8, 4, 128, 128))
# On a GPU, in order of priority (a run stopped at its time limit keeps the cases it finished,
# both dtypes of a shape before the next shape): the two bandwidth-bound shapes, fp32 tensors
# of 64 and 96 MiB, far beyond the L2 cache, on which the report checks the performance
# targets; then the launch-bound CIFAR batch; then two in between.
GPU_SHAPES = (
    (256, 4, 128, 128),
    (32, 3, 512, 512),
    (128, 3, 32, 32),
    (256, 3, 64, 64),
    (64, 4, 64, 64),
)
# Flow-matching latents, 16 channels: Flux/SD3 images of 1024 px (16x16x128x128) and video
# latents of 21 frames at 60x104 (4x16x21x60x104), the sizes, measured on a GPU. On
# the CPU they are scaled down to the size of the DDPM cases, where one eager step takes a
# few ms and per-call overhead shows: 4x16x64x64 (1/16 of the image batch) and 1x16x9x30x52
# (1/37 of the video one); the full sizes follow, since they fit too (eager 35-90 ms a step
# on the 2-core reference machine with malloc pinned as below; ~30 s more for the suite).
FLOW_GPU_SHAPES = ((16, 16, 128, 128), (4, 16, 21, 60, 104))
FLOW_CPU_SHAPES = ((4, 16, 64, 64), (1, 16, 9, 30, 52), *FLOW_GPU_SHAPES)
# sd-scripts' Flux LoRA loss side with its options on (continuous sigmas, --loss_type huber,
# --masked_loss, loss_weights): an image batch of 1024 px latents cut to 4, and one video of
# 21 frames at 60x104, on every device.
HUBER_SHAPES = ((4, 16, 64, 64), (1, 16, 21, 60, 104))
FAMILY_SHAPES = {
    "ddpm": GPU_SHAPES if ON_GPU else CPU_SHAPES,
    "flow": FLOW_GPU_SHAPES if ON_GPU else FLOW_CPU_SHAPES,
    "flow_huber": HUBER_SHAPES,
}
# sd-scripts' defaults for --huber_schedule exponential: --huber_c 0.1, --huber_scale 1.
HUBER_C, HUBER_SCALE = 0.1, 1.0
# As the flow scripts call it (--weighting_scheme cosmap); shift 3, SD3's.
FLOW_SHIFT, FLOW_WEIGHTING = 3.0, "cosmap"
TRAIN_SHAPE = (128, 3, 32, 32)  # CIFAR-10 sized batch for the training-step measurement
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# assert_close's rtol per dtype; atol is rtol times the reference's largest magnitude, since
# the gradient's scale (w(t) / numel) is far below any fixed atol.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# Copy bandwidth: 256 MiB per tensor on the CPU, 1 GiB on a GPU (20x its L2 cache).
COPY_BYTES = 2**30 if ON_GPU else 256 * 2**20
# CUDA-event timing: milliseconds of warm-up calls, then of timed calls (do_bench's units).
WARMUP_MS, REP_MS = 25, 200
# glibc mallopt parameters and the values the suite pins them to (see malloc_config).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 2**30
# The gradient design of each GPU backend as this build ships it, before any provider forces
# one: True computes the gradient in forward and keeps it, False recomputes it in backward.
DEFAULT_DESIGNS = dict(getattr(noise_loss_ops, "GRAD_IN_FORWARD", None) or {})

# Every (dtype, shape) case compiles two graphs (noise drawn inside, noise given for the
# check); dynamo's default of 8 graphs per function would fall back to eager mid-suite.
torch._dynamo.config.recompile_limit = 64


@dataclass
class Case:
    """One benchmark input: the batch, its timesteps and the network output standing in for
    the model (a leaf, so backward stops at the loss side).

    ``t`` is what debias' ops take (DDPM: integer timesteps; flow: the schedule's float
    timesteps); ``eager_t`` and ``tables`` are what the family's eager code takes after x0, t
    and pred (EAGER[family]); ``loss_args`` are fused_loss's arguments beyond pred, noise, t
    and the schedule."""

    family: str
    x0: torch.Tensor
    t: torch.Tensor
    pred: torch.Tensor
    schedule: debias.NoiseSchedule | str  # "flow": continuous sigmas
    eager_t: torch.Tensor
    tables: tuple[torch.Tensor, ...]
    loss_args: dict[str, Any]

    @classmethod
    def make(
        cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, family: str = "ddpm"
    ) -> Case:
        # Drawn on the device: on a GPU the large cases would spend seconds in CPU randn.
        gen = torch.Generator(device=device).manual_seed(0)
        x0 = torch.randn(shape, generator=gen, device=device).to(dtype)
        if family == "ddpm":
            schedule = debias.NoiseSchedule.linear(1000)
            t = torch.randint(0, 1000, (shape[0],), generator=gen, device=device)
            pred = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_()
            # float32, as diffusers' scheduler keeps it; reference.add_noise casts per call.
            abar = schedule.alphas_cumprod.float().to(device)
            weights = debias.weight_table(schedule, "debias").float().to(device)
            return cls(family, x0, t, pred, schedule, t, (abar, weights), {"weighting": "debias"})
        if family == "flow_huber":
            return cls._flow_huber(x0, gen, device)
        schedule = debias.NoiseSchedule.flow_matching(1000, shift=FLOW_SHIFT)
        # The scripts' draw for cosmap (uniform u): indices = (u * T).long(), then
        # timesteps = scheduler.timesteps[indices].
        u = torch.rand(shape[0], generator=gen, device=device)
        indices = (u * schedule.num_timesteps).long()
        t = schedule.timesteps.to(device)[indices]
        pred = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_()
        sigmas = schedule.sigma.float().to(device)  # diffusers' float32 scheduler.sigmas
        loss_args = {"weighting": FLOW_WEIGHTING, "x0": x0}
        return cls(family, x0, t, pred, schedule, indices, (sigmas,), loss_args)

    @classmethod
    def _flow_huber(cls, x0: torch.Tensor, gen: torch.Generator, device: torch.device) -> Case:
        """--timestep_sampling sigmoid sigmas, --huber_schedule exponential's c of them, an
        alpha mask at the latents' size ([B, 1, ...]: apply_masked_loss's after its resize)
        and per-sample loss_weights."""
        B = x0.shape[0]
        sigmas = torch.sigmoid(torch.randn(B, generator=gen, device=device))
        alpha = -math.log(HUBER_C) / 1000
        huber_c = torch.exp(-alpha * sigmas * 1000) * HUBER_SCALE
        mask = torch.rand((B, 1, *x0.shape[2:]), generator=gen, device=device)
        loss_weights = torch.rand(B, generator=gen, device=device) + 0.5
        pred = torch.randn(x0.shape, generator=gen, device=device).to(x0.dtype).requires_grad_()
        loss_args = {
            "weighting": "none",
            "prediction": "flow",
            "x0": x0,
            "loss": "huber",
            "huber_c": huber_c,
            "mask": mask,
            "sample_weight": loss_weights,
        }
        tables = (mask, loss_weights, huber_c)
        return cls("flow_huber", x0, sigmas, pred, "flow", sigmas, tables, loss_args)


Forward = Callable[[Case], tuple[torch.Tensor, torch.Tensor]]
Checked = Callable[[Case], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Train = Callable[[Case, torch.nn.Module], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    """``forward`` is the timed code (returns x_t and the loss); ``checked`` runs the same
    code and also returns the noise it used, as a tensor; ``train`` runs the same ops around a
    network (returns the loss; None: not part of the training-step measurement).
    ``backend`` is the debias backend the provider needs (None: plain torch, runs anywhere);
    ``grad_in_forward`` the gradient design it forces through GRAD_IN_FORWARD (None: leaves
    the build's own); ``devices`` the device types it is measured on."""

    backend: str | None
    forward: Forward
    checked: Checked | None
    train: Train | None = None
    grad_in_forward: bool | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")


def loss_side(
    x0: torch.Tensor,
    t: torch.Tensor,
    pred: torch.Tensor,
    abar: torch.Tensor,
    weights: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a diffusers trainer runs around its model call (minus the model)."""
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = reference.add_noise(x0, t, abar, noise)
    loss = reference.noise_loss(pred, noise, t, weights)
    return x_t, loss


def flow_loss_side(
    x0: torch.Tensor,
    indices: torch.Tensor,
    pred: torch.Tensor,
    sigma_table: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What diffusers' train_dreambooth_lora_flux.py / _sd3.py run around the transformer call
    (minus the model), --weighting_scheme cosmap, through the reference's copies of their
    lines (for fp32 and bf16 the same ops in the same dtypes). Their get_sigmas finds each
    timestep's index with one host-synchronising ``(timesteps == t).nonzero().item()`` per
    sample; here the indices they drew the timesteps from are passed in, which only makes eager
    faster."""
    if noise is None:
        noise = torch.randn_like(x0)
    # get_sigmas: the float32 table in x0's dtype, gathered (the reference views it [B, 1, ...])
    sigmas = sigma_table.to(dtype=x0.dtype)[indices]
    x_t = reference.flow_noised(x0, noise, sigmas)
    weighting = reference.sd3_loss_weighting(FLOW_WEIGHTING, sigmas)
    loss = reference.flow_loss(pred, reference.flow_target(x0, noise), weighting)
    return x_t, loss


def sd_scripts_loss_side(
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    loss_weights: torch.Tensor,
    huber_c: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What kohya-ss/sd-scripts' Flux LoRA training runs around the transformer call, with
    --loss_type huber, --masked_loss and loss_weights: library/flux_train_utils.py
    get_noisy_model_input_and_timesteps (float32 sigmas, the result cast to the latents'
    dtype), target = noise - latents, library/train_util.py conditional_loss(pred.float(),
    target.float(), "huber", "none", huber_c), custom_train_functions.py apply_masked_loss
    (the mask already at the latents' size), then train_network.py's mean over the non-batch
    dims, times loss_weights, and the batch mean."""
    if noise is None:
        noise = torch.randn_like(x0)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    s = sigmas.view(shape)
    x_t = ((1.0 - s) * x0 + s * noise).to(x0.dtype)
    target = noise - x0
    c = huber_c.view(shape)
    loss = 2 * c * (torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)
    loss = loss * mask.to(loss.dtype)
    loss = loss.mean(list(range(1, loss.dim())))
    loss = loss * loss_weights
    return x_t, loss.mean()


# The eager code of each family: (x0, eager_t, pred, *tables, noise=None) -> (x_t, loss).
EAGER = {"ddpm": loss_side, "flow": flow_loss_side, "flow_huber": sd_scripts_loss_side}
_COMPILED = {family: torch.compile(fn, dynamic=False) for family, fn in EAGER.items()}


def _eager(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return EAGER[case.family](case.x0, case.eager_t, case.pred, *case.tables)


def _eager_train(case: Case, model: torch.nn.Module) -> torch.Tensor:
    abar, weights = case.tables  # DDPM only (TRAIN_SHAPE)
    noise = torch.randn_like(case.x0)
    x_t = reference.add_noise(case.x0, case.t, abar, noise)
    return reference.noise_loss(model(x_t, case.t), noise, case.t, weights)


def _compiled(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return _COMPILED[case.family](case.x0, case.eager_t, case.pred, *case.tables)


def _compiled_checked(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Inductor draws randn_like with its own generator, which eager cannot reproduce; the same
    # function with the noise passed in checks the compiled arithmetic.
    noise = torch.randn_like(case.x0)
    compiled = _COMPILED[case.family]
    x_t, loss = compiled(case.x0, case.eager_t, case.pred, *case.tables, noise)
    return x_t, loss, noise


def _fused(
    backend: str, grad_in_forward: bool | None = None, devices: tuple[str, ...] = ("cpu", "cuda")
) -> Provider:
    """debias' ops on ``backend``, noise drawn in the kernel (Philox), as a trainer calls them."""

    def run(case: Case) -> tuple[torch.Tensor, torch.Tensor, debias.PhiloxNoise]:
        x_t, noise = debias.add_noise(case.x0, case.t, case.schedule, backend=backend)
        loss = debias.fused_loss(
            case.pred, noise, case.t, case.schedule, backend=backend, **case.loss_args
        )
        return x_t, loss, noise

    def forward(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
        x_t, loss, _ = run(case)
        return x_t, loss

    def checked(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_t, loss, noise = run(case)
        return x_t, loss, noise.materialize()

    def train(case: Case, model: torch.nn.Module) -> torch.Tensor:
        x_t, noise = debias.add_noise(case.x0, case.t, case.schedule, backend=backend)
        return debias.fused_loss(
            model(x_t, case.t), noise, case.t, case.schedule, backend=backend, **case.loss_args
        )

    return Provider(backend, forward, checked, train, grad_in_forward, devices)


# The order here is the order of the report's columns. Providers that cannot run on DEVICE
# are skipped with the reason. The fused backends run in both gradient designs: `cpu`,
# `triton` and `cuda` keep the gradient computed in forward (backward scales it by
# grad_output, or on the CPU hands it over when grad_output is 1), `-recompute` computes the
# loss alone in forward and the gradient in backward, regenerating the noise (on the CPU,
# reading the noise add_noise kept). The Triton interpreter can run `triton` on CPU tensors,
# but only as a test backend, so the GPU providers are measured on CUDA alone.
_GPU = ("cuda",)
PROVIDERS: dict[str, Provider] = {
    "eager": Provider(None, _eager, None, _eager_train),
    "compile": Provider(None, _compiled, _compiled_checked),
    "cpu": _fused("cpu", grad_in_forward=True, devices=("cpu",)),
    "cpu-recompute": _fused("cpu", grad_in_forward=False, devices=("cpu",)),
    "triton": _fused("triton", grad_in_forward=True, devices=_GPU),
    "triton-recompute": _fused("triton", grad_in_forward=False, devices=_GPU),
    "cuda": _fused("cuda", grad_in_forward=True, devices=_GPU),
    "cuda-recompute": _fused("cuda", grad_in_forward=False, devices=_GPU),
}


def design_name(grad_in_forward: bool | None) -> str:
    return {True: "kept", False: "recompute"}.get(grad_in_forward, "")


def fused_bytes(
    numel: int, itemsize: int, grad_in_forward: bool | None = True, reads_x0: bool = False
) -> int:
    """Bytes the fused design must move for one step, the numerator of a provider's GB/s
    (N = numel * itemsize; epsilon target, the DDPM cases):

        add_noise                     read x0, write x_t                          2N
        kept (grad_in_forward=True)   loss: read pred, write the gradient it keeps 2N
                                      backward: read it, write pred.grad           2N  = 6N
        recompute (False)             loss: read pred                              N
                                      backward: read pred, write pred.grad         2N  = 5N

    The noise never reaches memory; a target with an x0 term (v, x0, flow's noise - x0:
    ``reads_x0``) adds a read of x0 to each pass over pred (+N kept, +2N recompute: 7N
    either way). eager, compile and cpu are measured against the kept design's bytes (6N,
    7N with x0), a common yardstick rather than the bytes they move: eager moves several times more
    (noise, float copies, temporaries), and the compute-bound cpu backend keeps the noise it
    generates (PhiloxNoise.values) and skips the backward pass when grad_output is 1."""
    passes = 5 if grad_in_forward is False else 6
    if reads_x0:
        passes += 2 if grad_in_forward is False else 1
    return passes * numel * itemsize


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(provider: Provider, case: Case, sync: bool = True) -> Callable[[], torch.Tensor]:
    """One loss side. Returns x_t so that nothing is skipped for being unused. ``sync``
    waits for the device, for host clocks; CUDA events need no wait, and one would idle the
    GPU between calls."""

    def step() -> torch.Tensor:
        case.pred.grad = None  # as optimizer.zero_grad(set_to_none=True) leaves it
        x_t, loss = provider.forward(case)
        loss.backward()
        if sync:
            _sync(DEVICE)
        return x_t

    return step


def _check(provider: Provider, case: Case) -> None:
    """Fail unless the provider's x_t, loss and pred.grad match eager's on the same noise."""
    case.pred.grad = None
    x_t, loss, noise = provider.checked(case)
    loss.backward()
    grad = case.pred.grad
    case.pred.grad = None

    pred = case.pred.detach().clone().requires_grad_()
    want_x_t, want_loss = EAGER[case.family](case.x0, case.eager_t, pred, *case.tables, noise)
    want_loss.backward()
    rtol = RTOL[case.x0.dtype]
    # bf16 Huber: eager's target noise - x0 rounds to bf16 (the fused target stays float), and
    # where pred - target is near 0 the gradient d / sqrt(d^2 + c^2) magnifies that rounding.
    slack = 4.0 if case.family == "flow_huber" and case.x0.dtype == torch.bfloat16 else 1.0
    for name, got, want in (
        ("x_t", x_t, want_x_t),
        ("loss", loss, want_loss),
        ("pred.grad", grad, pred.grad),
    ):
        atol = slack * rtol * want.detach().abs().max().item()
        try:
            torch.testing.assert_close(got.detach(), want.detach(), rtol=rtol, atol=atol)
        except AssertionError as err:
            pytest.fail(f"{name} disagrees with eager, so this provider is not timed:\n{err}")


def _peak_memory(
    step: Callable[[], Any], reset: Callable[[], None], device: torch.device
) -> tuple[int, str]:
    """Peak bytes of tensor memory that one step allocates and holds at once, above what was
    live before it (x_t and the new gradients count; the inputs do not), and how it was read.
    ``reset`` frees the gradients of the step before, outside the measured step.

    CUDA: the caching allocator's peak counter. CPU: torch keeps no CPU allocator statistics,
    but under ``profile_memory`` each allocation and free reports a running total of allocated
    bytes. That total is process-wide and outlives the profiler (blocks allocated in an earlier
    profiled step and freed outside it are never taken off), so the peak is measured from the
    total just before the step's first allocation. Allocations made inside OpenMP worker
    threads, if any, are not seen.
    """
    step()  # warm: lazy initialisation and compiled graphs are not part of a step
    reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append(event)
    if not events:
        return 0, "torch.profiler total_allocated"
    first = min(events, key=lambda e: e.start_time_ns).extra_fields
    base = first.total_allocated - first.alloc_size
    peak = max(e.extra_fields.total_allocated for e in events) - base
    return peak, "torch.profiler total_allocated"


def _event_times_ms(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> list[float]:
    """do_bench's loop without Triton: CUDA events around each call, L2 flushed before it."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEVICE)
    fn()
    torch.cuda.synchronize(DEVICE)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize(DEVICE)
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(max(1, int(rep_ms / estimate)))
    ]
    for start, end in pairs:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(DEVICE)
    return [start.elapsed_time(end) for start, end in pairs]


def _times(fn: Callable[[], Any]) -> tuple[list[float], str]:
    """Seconds per call of ``fn`` over many calls, and how they were taken.

    CUDA: CUDA events through triton.testing.do_bench (one call, an estimate from five, 25 ms
    of warm-up calls, then 200 ms of calls, each between its own pair of events with the L2
    cache flushed before it), or the same loop by hand without Triton. ``fn`` must not wait
    for the device. CPU: the host clock, 2 warm-up calls, then at least 5 calls and up to 2 s
    (used by the training step; the loss side on the CPU is timed by pytest-benchmark)."""
    if ON_GPU:
        ms, timer = None, "cuda events"
        if importlib.util.find_spec("triton") is not None:
            from triton.testing import do_bench

            try:
                ms = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="all")
                timer = "cuda events (triton.testing.do_bench)"
            except AssertionError:  # a Triton older than return_mode="all"
                pass
        if ms is None:
            ms = _event_times_ms(fn, WARMUP_MS, REP_MS)
        return [m / 1e3 for m in ms], timer
    for _ in range(2):
        fn()
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - begin < 2.0:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times, "host clock"


def _summary(times: list[float]) -> dict[str, Any]:
    """Median, 20th and 80th percentiles (seconds) and the number of timed calls."""
    if len(times) == 1:
        return dict(median_s=times[0], q20_s=times[0], q80_s=times[0], rounds=1)
    q = statistics.quantiles(times, n=5, method="inclusive")
    return dict(median_s=statistics.median(times), q20_s=q[0], q80_s=q[3], rounds=len(times))


def _prepare(provider: Provider, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip a provider that cannot run here; force its gradient design for this test only
    (monkeypatch restores GRAD_IN_FORWARD afterwards)."""
    if DEVICE.type not in provider.devices:
        pytest.skip(f"this provider is measured on {'/'.join(provider.devices)} only")
    if provider.backend is not None and provider.backend not in _backend.available(DEVICE):
        pytest.skip(
            f"debias backend {provider.backend!r} cannot run on {DEVICE.type} in this build "
            f"(available: {_backend.available(DEVICE)})"
        )
    if provider.grad_in_forward is not None:
        table = getattr(noise_loss_ops, "GRAD_IN_FORWARD", None)
        if not isinstance(table, dict) or provider.backend not in table:
            pytest.skip(
                f"debias.ops.noise_loss.GRAD_IN_FORWARD has no switch for {provider.backend!r}"
            )
        monkeypatch.setitem(table, provider.backend, provider.grad_in_forward)


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of the whole machine, ticks of this process), or None without /proc."""
    try:
        with open("/proc/stat") as f:
            # user nice system idle iowait irq softirq steal; steal is a busy hypervisor.
            ticks = [int(x) for x in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(ticks) - ticks[3] - ticks[4], int(own[11]) + int(own[12])  # utime + stime


def _other_cpu(
    before: tuple[int, int] | None, after: tuple[int, int] | None, seconds: float
) -> float | None:
    """Share of the machine's CPU time that other processes used while a case was timed.
    Anything above a few percent competes with the OpenMP threads (or, on a GPU, with the
    thread launching the kernels) and skews the numbers."""
    if before is None or after is None or seconds <= 0:
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / (seconds * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from debias.info import cpu_model

    return cpu_model()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _common_info(name: str, provider: Provider, copy: dict[str, Any], malloc: str) -> dict:
    """extra_info fields every result carries."""
    return dict(
        provider=name,
        backend=provider.backend or "",
        design=design_name(provider.grad_in_forward),
        default_designs=", ".join(
            f"{b}={design_name(v)}" for b, v in DEFAULT_DESIGNS.items() if b in ("triton", "cuda")
        ),
        check="reference" if provider.checked is None else "passed",
        copy_gbps=copy["gbps"],
        copy_method=copy["method"],
        device=device_name(DEVICE),
        device_type=DEVICE.type,
        threads=torch.get_num_threads(),
        malloc=malloc,
        torch=str(torch.__version__),
        triton=_version("triton"),
        command=shlex.join(["pytest", *sys.argv[1:]]),
    )


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(THREADS)


def _git_sha() -> str:
    """DEBIAS_GIT_SHA (gpu_run.sh's caller sets it: the GPU machine has no .git), a full sha
    shortened to 7 characters as pytest-benchmark's commit id is in the report."""
    sha = os.environ.get("DEBIAS_GIT_SHA", "")
    return sha[:7] if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha) else sha


@pytest.fixture(autouse=True)
def jsonl_result(request: pytest.FixtureRequest, benchmark: Any) -> Iterator[None]:
    """Appends the test's result to $DEBIAS_BENCH_JSONL when the test ends, in the shape of one
    entry of --benchmark-json's "benchmarks" plus its date and git sha. A test that timed
    nothing (skipped, failed its check, stopped) writes nothing."""
    yield
    path = os.environ.get("DEBIAS_BENCH_JSONL")
    info = benchmark.extra_info
    stats = getattr(benchmark.stats, "stats", None)  # pytest-benchmark's, where it timed
    if not path or not info or ("median_s" not in info and stats is None):
        return
    keys = ("median", "min", "max", "rounds")
    record = dict(
        name=request.node.name,
        group=benchmark.group,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        git_sha=_git_sha(),
        extra_info=info,
        stats={} if stats is None else {key: getattr(stats, key) for key in keys},
    )
    with open(path, "a") as f:  # one write of one line: a kill leaves at most a torn last line
        f.write(json.dumps(record, default=str) + "\n")


class _Benchmark:
    """The part of pytest-benchmark's ``benchmark`` fixture these suites use, where the plugin
    is not installed: ``extra_info``, ``group``, ``pedantic`` and the call, which time ``fn``
    themselves and put the median, quantiles and rounds in extra_info (CUDA cases put their
    own CUDA-event times there first, which are kept)."""

    def __init__(self) -> None:
        self.extra_info: dict[str, Any] = {}
        self.group: str | None = None
        self.stats = None

    def __call__(self, fn: Callable[[], Any]) -> None:
        times, timer = _times(fn)
        self.extra_info.update(timer=timer, **_summary(times))

    def pedantic(
        self, fn: Callable[[], Any], rounds: int = 1, iterations: int = 1, **_: Any
    ) -> None:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(iterations):
                fn()
            _sync(DEVICE)
            times.append((time.perf_counter() - start) / iterations)
        if "median_s" not in self.extra_info:
            self.extra_info.update(timer="host clock", **_summary(times))


HAVE_PYTEST_BENCHMARK = importlib.util.find_spec("pytest_benchmark") is not None
if not HAVE_PYTEST_BENCHMARK:

    @pytest.fixture
    def benchmark() -> _Benchmark:
        return _Benchmark()


@pytest.fixture(scope="session", autouse=True)
def malloc_config() -> str:
    """Keep freed CPU memory in the process, as a caching allocator would.

    By default glibc maps and unmaps MiB-sized blocks, or trims its heap, depending on the
    sizes freed before, so whether a step page-faults (measured: 2.5 ms vs 4.2 ms for one
    eager step) depended on which cases ran earlier, and medians moved by 1.5x between runs.
    Pinned thresholds make every step run in warm memory: the kernels' cost, not the
    allocator's history. Eager, which allocates the most, would lose most from page faults.
    """
    if DEVICE.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return "default"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not (
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ):
        return "default"
    return f"glibc, mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim {TRIM_THRESHOLD >> 20} MiB"


@pytest.fixture(scope="session")
def copy_bandwidth(_threads: None) -> dict[str, Any]:
    """This machine's copy bandwidth in GB/s, read + write: ``dst.copy_(src)`` on float32
    tensors of COPY_BYTES each. CPU: host clock, median of 10 copies after 2 warm-up ones.
    CUDA: median of the CUDA-event times (see _times), a device-to-device copy."""
    src = torch.ones(COPY_BYTES // 4, device=DEVICE)
    dst = torch.empty_like(src)
    size = f"{COPY_BYTES >> 20} MiB"
    if ON_GPU:
        times, timer = _times(lambda: dst.copy_(src))
        seconds = statistics.median(times)
        method = f"dst.copy_(src), {size} each, median of {len(times)}, {timer}"
    else:
        times = []
        for i in range(12):
            start = time.perf_counter()
            dst.copy_(src)
            if i >= 2:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        method = f"dst.copy_(src), {size} each, median of 10, host clock"
    return dict(gbps=2 * COPY_BYTES / seconds / 1e9, method=method)


# Ids name the family first ("flow-bf16-4x16x64x64-cpu"): `-k flow` or `-k ddpm` picks one.
CASES = [
    pytest.param(family, dtype, shape, name, id=f"{family}-{dtype}-{_shape_id(shape)}-{name}")
    for family, shapes in FAMILY_SHAPES.items()
    for shape in shapes
    for dtype in DTYPES
    for name in PROVIDERS
]


@pytest.mark.benchmark(min_rounds=20, max_time=1.0, warmup=True, warmup_iterations=5)
@pytest.mark.parametrize(("family", "dtype", "shape", "name"), CASES)
def test_noise_loss(
    benchmark: Any,
    copy_bandwidth: dict[str, Any],
    malloc_config: str,
    monkeypatch: pytest.MonkeyPatch,
    family: str,
    dtype: str,
    shape: tuple[int, ...],
    name: str,
) -> None:
    provider = PROVIDERS[name]
    _prepare(provider, monkeypatch)
    torch.manual_seed(0)
    case = Case.make(shape, DTYPES[dtype], DEVICE, family)
    if provider.checked is not None:
        _check(provider, case)
    step = _step(provider, case)

    def reset() -> None:
        case.pred.grad = None

    peak, peak_method = _peak_memory(step, reset, DEVICE)  # also compiles and warms the step

    benchmark.group = f"{family}-{dtype}-{_shape_id(shape)}"
    info = benchmark.extra_info
    info.update(_common_info(name, provider, copy_bandwidth, malloc_config))
    numel, itemsize = case.x0.numel(), case.x0.element_size()
    info.update(
        kind="loss_side",
        family=family,
        shape=_shape_id(shape),
        dtype=dtype,
        numel=numel,
        bytes=fused_bytes(numel, itemsize, provider.grad_in_forward, family != "ddpm"),
        peak_mem_bytes=peak,
        peak_mem_method=peak_method,
    )
    before = _cpu_ticks()
    start = time.perf_counter()
    if ON_GPU:
        times, timer = _times(_step(provider, case, sync=False))
        info.update(timer=timer, **_summary(times))
        info["other_cpu"] = _other_cpu(before, _cpu_ticks(), time.perf_counter() - start)
        benchmark.pedantic(step, rounds=1, iterations=1)  # the result's times are info's
        return
    benchmark(step)
    info["other_cpu"] = _other_cpu(before, _cpu_ticks(), time.perf_counter() - start)
    info.setdefault("timer", "pytest-benchmark (host clock)")
    if benchmark.stats is not None:  # None under --benchmark-disable
        # pytest-benchmark keeps quartiles only; the raw per-round times give the 20/80 ones.
        q = statistics.quantiles(benchmark.stats.stats.data, n=5, method="inclusive")
        info.update(q20_s=q[0], q80_s=q[3])


# ---- one training step --------------------------------------------------------------------


class SmallConvNet(torch.nn.Module):
    """A stand-in for the UNet where diffusers is not installed: a timestep embedding and
    four residual GroupNorm-SiLU-conv blocks at full resolution, ``width`` channels."""

    def __init__(self, channels: int = 3, width: int = 64, timesteps: int = 1000) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(timesteps, width)
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.GroupNorm(8, width),
                torch.nn.SiLU(),
                torch.nn.Conv2d(width, width, 3, padding=1),
            )
            for _ in range(4)
        )
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.embed(t)[:, :, None, None]
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class _Sample(torch.nn.Module):
    """diffusers' UNet2DModel returning its ``.sample`` tensor, as trainers use it."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


def make_model(device: torch.device) -> tuple[torch.nn.Module, str]:
    """A small DDPM-style UNet (diffusers' UNet2DModel, UNET_CONFIG), or SmallConvNet where
    diffusers cannot be imported; and a name for the report."""
    torch.manual_seed(0)  # the same weights for every provider
    try:
        from diffusers import UNet2DModel
    except Exception as err:  # not installed, or broken against this torch
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:80]
        return SmallConvNet().to(device), f"SmallConvNet(width=64) (no diffusers: {reason})"
    channels = "-".join(map(str, UNET_CONFIG["block_out_channels"]))
    name = f"diffusers UNet2DModel({channels}, 1 layer/block, attention at 16 and 8 px)"
    return _Sample(UNet2DModel(**UNET_CONFIG)).to(device), name


TRAIN_PROVIDERS = [name for name, p in PROVIDERS.items() if p.train is not None]


@pytest.mark.parametrize("name", TRAIN_PROVIDERS)
def test_train_step(
    benchmark: Any,
    copy_bandwidth: dict[str, Any],
    malloc_config: str,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> None:
    """One fp32 training step on TRAIN_SHAPE: noising, the network's forward, the loss and the
    whole backward; no optimizer step (gradients only, zeroed with set_to_none before each
    step). The loss side alone (the same ops with pred a leaf, as in test_noise_loss) is timed
    the same way, and the report gives its share of the step."""
    if not ON_GPU and not os.environ.get("DEBIAS_BENCH_TRAIN_STEP"):
        pytest.skip(
            "a GPU measurement: on the CPU the network takes seconds per step and the loss "
            "side is lost in it (DEBIAS_BENCH_TRAIN_STEP=1 runs it anyway)"
        )
    provider = PROVIDERS[name]
    _prepare(provider, monkeypatch)
    torch.manual_seed(0)
    case = Case.make(TRAIN_SHAPE, torch.float32, DEVICE)
    if provider.checked is not None:
        _check(provider, case)
    model, model_name = make_model(DEVICE)

    def train_step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = provider.train(case, model)
        loss.backward()
        return loss

    def reset() -> None:
        model.zero_grad(set_to_none=True)

    peak, peak_method = _peak_memory(train_step, reset, DEVICE)
    before = _cpu_ticks()
    start = time.perf_counter()
    step_times, timer = _times(train_step)
    loss_times, _ = _times(_step(provider, case, sync=False))
    other = _other_cpu(before, _cpu_ticks(), time.perf_counter() - start)

    benchmark.group = f"train-step-{_shape_id(TRAIN_SHAPE)}"
    info = benchmark.extra_info
    info.update(_common_info(name, provider, copy_bandwidth, malloc_config))
    info.update(
        kind="train_step",
        family="ddpm",
        shape=_shape_id(TRAIN_SHAPE),
        dtype="fp32",
        numel=case.x0.numel(),
        model=model_name,
        peak_mem_bytes=peak,
        peak_mem_method=peak_method,
        timer=timer,
        other_cpu=other,
        loss_side_median_s=statistics.median(loss_times),
        **_summary(step_times),
    )
    benchmark.pedantic(lambda: (train_step(), _sync(DEVICE)), rounds=1, iterations=1)
