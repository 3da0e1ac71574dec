"""The loss side of one diffusion training step — noising, weighted loss, backward — per
provider, on the same inputs.

    pytest benchmarks/bench_noise_loss.py --benchmark-json=bench.json
    python benchmarks/report.py bench.json

Providers: ``eager`` is debias.reference, the code trainers run today; ``compile`` is
torch.compile of that same function; the others are debias' fused ops on one backend. Before a
provider is timed, its x_t, loss and gradient are checked against eager on the same inputs
and the same noise; a provider that disagrees fails its test and is never timed.

Runs on CUDA when there is a GPU, else on the CPU; DEBIAS_BENCH_DEVICE=cpu|cuda forces one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pytest
import torch
from torch._C._profiler import _EventType

import debias
from debias import reference
from debias.ops import _backend

DEVICE = torch.device(
    os.environ.get("DEBIAS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
# Every core this process may run on (2 on the reference machine); recorded with each result.
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
SHAPES = ((128, 3, 32, 32), (32, 4, 64, 64), (8, 4, 128, 128))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# assert_close's rtol per dtype; atol is rtol times the reference's largest magnitude, since
# the gradient's scale (w(t) / numel) is far below any fixed atol.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
COPY_BYTES = 256 * 2**20
# glibc mallopt parameters and the values the suite pins them to (see malloc_config).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 2**30

# Every (dtype, shape) case compiles two graphs (noise drawn inside, noise given for the
# check); dynamo's default of 8 graphs per function would fall back to eager mid-suite.
torch._dynamo.config.recompile_limit = 64


@dataclass
class Case:
    """One benchmark input: the batch, its timesteps and the network output standing in for
    the model (a leaf, so backward stops at the loss side)."""

    x0: torch.Tensor
    t: torch.Tensor
    pred: torch.Tensor
    schedule: debias.NoiseSchedule
    abar: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def make(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Case:
        gen = torch.Generator().manual_seed(0)
        schedule = debias.NoiseSchedule.linear(1000)
        return cls(
            x0=torch.randn(shape, generator=gen).to(device, dtype),
            t=torch.randint(0, 1000, (shape[0],), generator=gen).to(device),
            pred=torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(),
            schedule=schedule,
            # float32, as diffusers' scheduler keeps it; reference.add_noise casts per call.
            abar=schedule.alphas_cumprod.float(),
            weights=debias.weight_table(schedule, "debias").float(),
        )


Forward = Callable[[Case], tuple[torch.Tensor, torch.Tensor]]
Checked = Callable[[Case], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Provider:
    """``forward`` is the timed code (returns x_t and the loss); ``checked`` runs the same
    code and also returns the noise it used, as a tensor. ``backend`` is the debias backend
    the provider needs (None: plain torch, runs anywhere)."""

    backend: str | None
    forward: Forward
    checked: Checked | None


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


_compiled_loss_side = torch.compile(loss_side, dynamic=False)


def _eager(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return loss_side(case.x0, case.t, case.pred, case.abar, case.weights)


def _compiled(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return _compiled_loss_side(case.x0, case.t, case.pred, case.abar, case.weights)


def _compiled_checked(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Inductor draws randn_like with its own generator, which eager cannot reproduce; the same
    # function with the noise passed in checks the compiled arithmetic.
    noise = torch.randn_like(case.x0)
    x_t, loss = _compiled_loss_side(case.x0, case.t, case.pred, case.abar, case.weights, noise)
    return x_t, loss, noise


def _fused(backend: str) -> Provider:
    """debias' ops on ``backend``, noise drawn in the kernel (Philox), as a trainer calls them."""

    def forward(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
        x_t, loss, _ = run(case)
        return x_t, loss

    def run(case: Case) -> tuple[torch.Tensor, torch.Tensor, debias.PhiloxNoise]:
        x_t, noise = debias.add_noise(case.x0, case.t, case.schedule, backend=backend)
        loss = debias.fused_loss(
            case.pred, noise, case.t, case.schedule, weighting="debias", backend=backend
        )
        return x_t, loss, noise

    def checked(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_t, loss, noise = run(case)
        return x_t, loss, noise.materialize()

    return Provider(backend, forward, checked)


# The order here is the order of the report's columns. A GPU backend is one more line
# (`"triton": _fused("triton"),`); providers whose backend cannot run on DEVICE are skipped.
PROVIDERS: dict[str, Provider] = {
    "eager": Provider(None, _eager, None),
    "compile": Provider(None, _compiled, _compiled_checked),
    "cpu": _fused("cpu"),
}


def fused_bytes(numel: int, itemsize: int) -> int:
    """Bytes the fused design moves for one step, the numerator of every provider's GB/s:
    add_noise reads x0 and writes x_t, the loss reads pred and writes the gradient (kept for
    backward), backward reads that gradient and writes pred's; the noise never reaches memory.
    That is the GPU design. The cpu backend, bound by computing the noise rather than by
    memory, keeps the noise it generates (PhiloxNoise.values) and skips the backward pass when
    grad_output is 1, so on the CPU this is a common yardstick, not the bytes it moved."""
    return 6 * numel * itemsize


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(provider: Provider, case: Case) -> Callable[[], torch.Tensor]:
    """One timed loss side. Returns x_t so that nothing is skipped for being unused."""

    def step() -> torch.Tensor:
        case.pred.grad = None  # as optimizer.zero_grad(set_to_none=True) leaves it
        x_t, loss = provider.forward(case)
        loss.backward()
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
    want_x_t, want_loss = loss_side(case.x0, case.t, pred, case.abar, case.weights, noise)
    want_loss.backward()
    rtol = RTOL[case.x0.dtype]
    for name, got, want in (
        ("x_t", x_t, want_x_t),
        ("loss", loss, want_loss),
        ("pred.grad", grad, pred.grad),
    ):
        atol = rtol * want.detach().abs().max().item()
        try:
            torch.testing.assert_close(got.detach(), want.detach(), rtol=rtol, atol=atol)
        except AssertionError as err:
            pytest.fail(f"{name} disagrees with eager, so this provider is not timed:\n{err}")


def _peak_memory(
    step: Callable[[], torch.Tensor], pred: torch.Tensor, device: torch.device
) -> tuple[int, str]:
    """Peak bytes of tensor memory that one step allocates and holds at once, above what was
    live before it (x_t and the new pred.grad count; the inputs do not), and how it was read.

    CUDA: the caching allocator's peak counter. CPU: torch keeps no CPU allocator statistics,
    but under ``profile_memory`` each allocation and free reports a running total of allocated
    bytes. That total is process-wide and outlives the profiler (blocks allocated in an earlier
    profiled step and freed outside it are never taken off), so the peak is measured from the
    total just before the step's first allocation. Allocations made inside OpenMP worker
    threads, if any, are not seen.
    """
    step()  # warm: lazy initialisation and compiled graphs are not part of a step
    pred.grad = None  # freed here, not inside the measured step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
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
    Anything above a few percent competes with the OpenMP threads and skews the numbers."""
    if before is None or after is None:
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / (seconds * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(THREADS)


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
def copy_gbps(_threads: None) -> float:
    """This machine's copy bandwidth in GB/s: ``dst.copy_(src)`` on 256 MiB float32 tensors,
    read + write, median of 10 after 2 warm-up copies."""
    src = torch.ones(COPY_BYTES // 4, device=DEVICE)
    dst = torch.empty_like(src)
    times = []
    for i in range(12):
        _sync(DEVICE)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(DEVICE)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * COPY_BYTES / statistics.median(times) / 1e9


def _shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


CASES = [
    pytest.param(dtype, shape, name, id=f"{dtype}-{_shape_id(shape)}-{name}")
    for dtype in DTYPES
    for shape in SHAPES
    for name in PROVIDERS
]


@pytest.mark.benchmark(min_rounds=20, max_time=1.0, warmup=True, warmup_iterations=5)
@pytest.mark.parametrize(("dtype", "shape", "name"), CASES)
def test_noise_loss(
    benchmark: Any,
    copy_gbps: float,
    malloc_config: str,
    dtype: str,
    shape: tuple[int, ...],
    name: str,
) -> None:
    provider = PROVIDERS[name]
    if provider.backend is not None and provider.backend not in _backend.available(DEVICE):
        pytest.skip(
            f"debias backend {provider.backend!r} cannot run on {DEVICE.type} in this build "
            f"(available: {_backend.available(DEVICE)})"
        )
    torch.manual_seed(0)
    case = Case.make(shape, DTYPES[dtype], DEVICE)
    if provider.checked is not None:
        _check(provider, case)
    step = _step(provider, case)
    peak, peak_method = _peak_memory(step, case.pred, DEVICE)  # also compiles and warms the step

    benchmark.group = f"{dtype}-{_shape_id(shape)}"
    info = benchmark.extra_info
    info.update(
        provider=name,
        backend=provider.backend or "",
        shape=_shape_id(shape),
        dtype=dtype,
        numel=case.x0.numel(),
        bytes=fused_bytes(case.x0.numel(), case.x0.element_size()),
        peak_mem_bytes=peak,
        peak_mem_method=peak_method,
        check="reference" if provider.checked is None else "passed",
        copy_gbps=copy_gbps,
        device=device_name(DEVICE),
        device_type=DEVICE.type,
        threads=torch.get_num_threads(),
        malloc=malloc_config,
        torch=str(torch.__version__),
        triton=_version("triton"),
        command=shlex.join(["pytest", *sys.argv[1:]]),
    )
    before = _cpu_ticks()
    start = time.perf_counter()
    benchmark(step)
    info["other_cpu"] = _other_cpu(before, _cpu_ticks(), time.perf_counter() - start)
    if benchmark.stats is not None:  # None under --benchmark-disable
        # pytest-benchmark keeps quartiles only; the raw per-round times give the 20/80 ones.
        q = statistics.quantiles(benchmark.stats.stats.data, n=5, method="inclusive")
        info.update(q20_s=q[0], q80_s=q[3])
