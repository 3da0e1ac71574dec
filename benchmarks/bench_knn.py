"""Exact k nearest neighbours (``debias.knn``) against the searches people run today, on the
same float32 Gaussian data: the whole n x m distance matrix (``torch.cdist`` + ``topk``) and
faiss' flat index (``faiss.IndexFlatL2``; on a GPU ``faiss.GpuIndexFlatL2``, where the
installed faiss has GPU support).

    pytest benchmarks/bench_knn.py --benchmark-json=knn.json
    python benchmarks/report.py knn.json

Before a provider is timed, its indices on CHECK_QUERIES seeded queries are compared with a
float64 brute force (``debias.reference.knn``, chunked over the database). debias promises
exactly those indices: a debias provider that differs fails its test and is never timed.
cdist + topk and faiss compute float32 expansions and may swap near-ties: their agreement is
recorded, not required (that is the point of the comparison).

CPU: pytest-benchmark times the in-memory cases (pedantic, ROUNDS calls after the check call
that warms up); the streamed case runs in a subprocess per provider (see _worker). Peak
memory is always measured in a fresh subprocess, from /proc/self/status (see _peak). CUDA
(DEBIAS_BENCH_DEVICE=cuda, or a GPU present): CUDA-event times (triton.testing.do_bench, as in
bench_noise_loss.py) stored in extra_info, peak memory from the caching allocator.
DEBIAS_BENCH_JSONL and the stand-in for a missing pytest-benchmark work as in
bench_noise_loss.py.

Also runnable as ``python benchmarks/bench_knn.py --worker SPEC``: the subprocess side.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pytest
import torch
from bench_noise_loss import (
    DEVICE,
    HAVE_PYTEST_BENCHMARK,
    ON_GPU,
    THREADS,
    _cpu_ticks,
    _other_cpu,
    _summary,
    _times,
    _version,
    device_name,
    jsonl_result,  # noqa: F401 (an autouse fixture: imported, it applies here too)
)

import debias
from debias import reference
from debias.ops import knn as knn_ops

if not HAVE_PYTEST_BENCHMARK:
    from bench_noise_loss import benchmark  # noqa: F401 (the fixture's stand-in)


@dataclass(frozen=True)
class Case:
    """n queries against m database rows of d float32 values, k neighbours each. ``streamed``:
    the database is a .npy file on disk, memory-mapped and streamed by debias.knn."""

    n: int
    m: int
    d: int
    k: int
    streamed: bool = False

    @property
    def id(self) -> str:
        return ("stream-" if self.streamed else "") + f"n{self.n}-m{self.m}-d{self.d}-k{self.k}"

    @property
    def flops(self) -> int:
        """2 n m d: the multiply-adds of the n x m dot products, every provider's core."""
        return 2 * self.n * self.m * self.d


CPU_CASES = (
    Case(1000, 20000, 3072, 2),  # CIFAR-sized images (3x32x32) against a training-set slice
    Case(4000, 50000, 64, 10),  # low-dimensional features, many queries
    Case(1000, 1_000_000, 256, 10, streamed=True),  # 1 GB of float32 on disk
)
# CUDA, in order of priority (a run cut short by its time limit keeps the cases it finished):
# k = 10 first, then 100 (k + margin + 1 = 201 candidates, beyond the CUDA kernel's lists of
# 128: its torch path), then 2.
GPU_CASES = tuple(Case(10000, 50000, d, k) for k in (10, 100, 2) for d in (3072, 64))
CASES = GPU_CASES if ON_GPU else CPU_CASES


@dataclass(frozen=True)
class Provider:
    """``kind``: "debias" (debias.knn on ``backend``), "cdist" or "faiss"; ``exact``: its
    indices must equal the float64 brute force's; ``devices``: where it is measured;
    ``streamed``: also measured on the streamed case."""

    kind: str
    backend: str | None
    exact: bool
    devices: tuple[str, ...]
    streamed: bool = True


# The order here is the order of the report's columns.
PROVIDERS: dict[str, Provider] = {
    "debias": Provider("debias", "cpu", True, ("cpu",)),
    "debias-triton": Provider("debias", "triton", True, ("cuda",)),
    "debias-cuda": Provider("debias", "cuda", True, ("cuda",)),
    # the reference backend, for comparison; left out of the streamed case to keep the suite
    # short (it streams the same way)
    "debias-torch": Provider("debias", "torch", True, ("cpu",), streamed=False),
    "cdist+topk": Provider("cdist", None, False, ("cpu", "cuda")),
    # faiss-cpu's IndexFlatL2, or on CUDA faiss-gpu's GpuIndexFlatL2 (skipped where the
    # installed faiss has no GPU support)
    "faiss": Provider("faiss", None, False, ("cpu", "cuda")),
}

SEED_QUERIES, SEED_DATABASE, SEED_CHECK = 0, 1, 2
CHECK_QUERIES = 50
ROUNDS = 5  # timed calls per in-memory case on the CPU (after the check call, which warms up)
STREAM_ROUNDS = 3  # timed calls per provider on the streamed case (seconds each)
# torch.cdist writes a [queries, m] float32 block: at most this many bytes of it at once
# (the in-memory CPU cases fit in one block; the streamed case takes 256 queries at a time).
CDIST_BLOCK_BYTES = (4 if ON_GPU else 1) * 2**30
# float64 bytes of the brute force's [queries, rows, d] difference per database chunk.
ORACLE_BYTES = 256 * 2**20
# The streamed case's matrix product rate is measured on its first rows (a 400 MB product).
MM_STREAM_ROWS = 100_000
STREAM_WRITE_ROWS = 50_000
# How often the subprocess samples its anonymous resident memory while a call runs.
SAMPLE_S = 0.002
WORKER_TIMEOUT_S = 600


# ---- data ---------------------------------------------------------------------------------


def make_queries(case: Case, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(SEED_QUERIES)
    return torch.randn(case.n, case.d, generator=gen, device=device)


def make_database(case: Case, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(SEED_DATABASE)
    return torch.randn(case.m, case.d, generator=gen, device=device)


def write_database(case: Case, path: str) -> None:
    """The streamed case's database as a .npy file, written in slices (never whole in memory)."""
    gen = torch.Generator().manual_seed(SEED_DATABASE)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(case.m, case.d))
    for lo in range(0, case.m, STREAM_WRITE_ROWS):
        rows = min(STREAM_WRITE_ROWS, case.m - lo)
        out[lo : lo + rows] = torch.randn(rows, case.d, generator=gen).numpy()
    out.flush()
    del out


def check_rows(n: int) -> torch.Tensor:
    """The seeded subset of queries whose answers are checked, ascending."""
    gen = torch.Generator().manual_seed(SEED_CHECK)
    return torch.randperm(n, generator=gen)[: min(n, CHECK_QUERIES)].sort().values


def _database_slices(database: Any, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 tensor) per slice of ``rows`` rows: a tensor's views, or copies
    read from a .npy file's memory map."""
    if isinstance(database, str):
        database = np.load(database, mmap_mode="r")
    for lo in range(0, database.shape[0], rows):
        part = database[lo : lo + rows]
        yield lo, torch.from_numpy(np.array(part)) if isinstance(part, np.ndarray) else part


def exact_indices(queries: torch.Tensor, database: Any, k: int) -> torch.Tensor:
    """The float64 brute force's indices ``[s, k]``: debias.reference.knn on each database
    chunk, merged by (distance, index); ties go to the lower index as in one call."""
    s, d = queries.shape
    best_d = best_i = None
    for lo, part in _database_slices(database, max(k, ORACLE_BYTES // (8 * s * d))):
        dist, index = reference.knn(queries, part.to(queries.device), min(k, part.shape[0]))
        index = index + lo
        if best_d is not None:  # earlier chunks first: a stable sort keeps lower indices first
            dist, index = torch.cat((best_d, dist), 1), torch.cat((best_i, index), 1)
            order = torch.argsort(dist, dim=1, stable=True)[:, :k]
            dist, index = dist.gather(1, order), index.gather(1, order)
        best_d, best_i = dist, index
    return best_i


def agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[int, float]:
    """(rows whose k indices equal the brute force's, in order; recall: the share of the brute
    force's neighbours found anywhere in the row)."""
    got, want = got.cpu().long(), want.cpu().long()
    rows = int((got == want).all(dim=1).sum())
    found = (got[:, :, None] == want[:, None, :]).any(dim=1)
    return rows, float(found.float().mean())


# ---- providers ----------------------------------------------------------------------------


def cdist_topk(queries: torch.Tensor, database: torch.Tensor, k: int) -> torch.Tensor:
    """torch.cdist then topk(k, largest=False), CDIST_BLOCK_BYTES of distances at a time."""
    block = max(1, CDIST_BLOCK_BYTES // (4 * database.shape[0]))
    return torch.cat(
        [
            torch.cdist(queries[lo : lo + block], database).topk(k, dim=1, largest=False).indices
            for lo in range(0, queries.shape[0], block)
        ]
    )


def searcher(name: str, case: Case, queries: torch.Tensor, database: Any) -> Callable[[], Any]:
    """The timed call: the indices ``[n, k]`` of ``queries`` in ``database`` (a tensor, or the
    path of the streamed .npy). debias: the whole debias.knn call, re-ranking included.
    cdist+topk and faiss on a path load the whole file first, inside the call; faiss on a
    tensor searches an IndexFlatL2 built before (outside the timing, as a faiss user builds
    it once)."""
    provider = PROVIDERS[name]
    if provider.kind == "debias":
        return lambda: debias.knn(queries, database, case.k, backend=provider.backend)[1]
    if provider.kind == "cdist":
        if isinstance(database, str):
            return lambda: cdist_topk(queries, torch.from_numpy(np.load(database)), case.k)
        return lambda: cdist_topk(queries, database, case.k)
    import faiss

    if queries.is_cuda:
        # torch_utils lets the index take and return CUDA tensors: no host copies in the call
        import faiss.contrib.torch_utils

        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatL2(resources, case.d)
        index.add(database)

        def search_gpu() -> torch.Tensor:
            return index.search(queries, case.k)[1]

        search_gpu.resources = resources  # kept alive as long as the index
        return search_gpu
    faiss.omp_set_num_threads(THREADS)
    q = queries.contiguous().numpy()
    if isinstance(database, str):

        def search_file() -> np.ndarray:
            index = faiss.IndexFlatL2(case.d)
            index.add(np.load(database))
            return index.search(q, case.k)[1]

        return search_file
    index = faiss.IndexFlatL2(case.d)
    index.add(database.contiguous().numpy())
    return lambda: index.search(q, case.k)[1]


def _as_indices(result: Any) -> torch.Tensor:
    return torch.from_numpy(result) if isinstance(result, np.ndarray) else result


# ---- memory -------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmHWM, VmRSS and RssAnon of this process, in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                out[key] = int(line.split()[1]) * 1024
    return out


def _peak(fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak resident memory one call of ``fn`` adds to this process.

    ``peak_rss``: VmHWM after the call minus VmRSS before it, the high-water mark reset just
    before (``5 > /proc/self/clear_refs``); it counts file pages the call maps (the streamed
    .npy's pages, which the kernel may drop at will). ``peak_anon``: the largest RssAnon seen
    by a thread sampling every SAMPLE_S seconds, minus RssAnon before: the memory the call
    itself allocates (a lower bound: a peak shorter than the interval can be missed)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM (reset by clear_refs) - VmRSS before"
    except OSError:
        method = "VmHWM - VmRSS before (VmHWM not reset: an upper bound)"
    before = _status()
    high = [before["RssAnon"]]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            high[0] = max(high[0], _status()["RssAnon"])

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn()
    stop.set()
    thread.join()
    after = _status()
    return dict(
        peak_rss_bytes=after["VmHWM"] - before["VmRSS"],
        peak_anon_bytes=max(high[0], after["RssAnon"]) - before["RssAnon"],
        peak_method=f"fresh process, one call after a warm-up one: {method}; RssAnon sampled "
        f"every {SAMPLE_S * 1e3:g} ms",
    )


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The subprocess side: build the case's data, one warm-up call (its answers on the checked
    queries go back), one call under _peak, then ``rounds`` timed calls (host clock)."""
    torch.set_num_threads(THREADS)
    case = Case(**spec["case"])
    cpu = torch.device("cpu")
    queries = make_queries(case, cpu)
    database = spec["path"] or make_database(case, cpu)
    run = searcher(spec["provider"], case, queries, database)
    got = _as_indices(run())[check_rows(case.n)]
    result = dict(indices=got.tolist(), **_peak(run))
    times = []
    before, start = _cpu_ticks(), time.perf_counter()
    for _ in range(spec["rounds"]):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    if times:
        result.update(
            times_s=times, other_cpu=_other_cpu(before, _cpu_ticks(), time.perf_counter() - start)
        )
    return result


def in_subprocess(case: Case, name: str, path: str | None, rounds: int) -> dict[str, Any]:
    spec = dict(case=asdict(case), provider=name, path=path, rounds=rounds)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    if proc.returncode != 0:
        pytest.fail(f"{name} on {case.id}: the subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---- per-case state (the cases run one after another: one of each is kept) --------------


@functools.lru_cache(maxsize=1)
def case_data(case: Case, path: str | None) -> tuple[torch.Tensor, Any]:
    """(queries, database: a tensor, or the streamed .npy's path) on DEVICE."""
    queries = make_queries(case, DEVICE)
    return queries, path if case.streamed else make_database(case, DEVICE)


@functools.lru_cache(maxsize=1)
def case_oracle(case: Case, path: str | None) -> torch.Tensor:
    queries, database = case_data(case, path)
    return exact_indices(queries[check_rows(case.n).to(DEVICE)], database, case.k)


@functools.lru_cache(maxsize=1)
def case_mm(case: Case, path: str | None) -> dict[str, Any]:
    """GFLOP/s of one float32 matrix product of the case's shape, ``[n, d] x [d, m]`` into a
    preallocated output (the streamed case: its first MM_STREAM_ROWS rows). CPU: median of 3
    after a warm-up (host clock). CUDA: CUDA-event times (see _times), with TF32 off (fp32)
    and on (tf32)."""
    queries, database = case_data(case, path)
    if case.streamed:
        database = next(_database_slices(database, MM_STREAM_ROWS))[1].to(DEVICE)
    out = torch.empty(queries.shape[0], database.shape[0], device=DEVICE)
    flops = 2 * queries.shape[0] * database.shape[0] * case.d
    shape = f"[{queries.shape[0]}, {case.d}] x [{case.d}, {database.shape[0]}]"

    def mm() -> torch.Tensor:
        return torch.mm(queries, database.T, out=out)

    if not ON_GPU:
        times = []
        for i in range(4):
            start = time.perf_counter()
            mm()
            if i:
                times.append(time.perf_counter() - start)
        return dict(
            mm_fp32_gflops=flops / statistics.median(times) / 1e9,
            mm_method=f"torch.mm {shape}, out= given, median of 3, host clock",
        )
    rates, timer = {}, ""
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, tf32 in (("fp32", False), ("tf32", True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            times, timer = _times(mm)
            rates[f"mm_{name}_gflops"] = flops / statistics.median(times) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous  # debias' TF32 bound reads this flag
    return dict(**rates, mm_method=f"torch.mm {shape}, out= given, allow_tf32 off/on, {timer}")


@pytest.fixture(scope="session")
def stream_path() -> Iterator[str]:
    """The streamed case's .npy, written once per session into a temporary folder
    (DEBIAS_BENCH_TMP, else the system's), removed afterwards."""
    case = next(c for c in CASES if c.streamed)
    root = os.environ.get("DEBIAS_BENCH_TMP") or tempfile.gettempdir()
    need = case.m * case.d * 4
    free = shutil.disk_usage(root).free
    if free < need + 2**30:
        pytest.skip(
            f"streamed case needs {need / 2**30:.1f} GiB + 1 GiB spare in {root}, "
            f"{free / 2**30:.1f} GiB free (DEBIAS_BENCH_TMP picks another folder)"
        )
    folder = tempfile.mkdtemp(prefix="debias-knn-", dir=root)
    path = os.path.join(folder, "database.npy")
    try:
        write_database(case, path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(THREADS)


def _skip_unless_runs(name: str, case: Case) -> None:
    provider = PROVIDERS[name]
    if DEVICE.type not in provider.devices:
        pytest.skip(f"this provider is measured on {'/'.join(provider.devices)} only")
    if case.streamed and not provider.streamed:
        pytest.skip("left out of the streamed case (the same streaming as debias, slower)")
    if provider.kind == "debias" and provider.backend not in knn_ops.supported_backends(DEVICE):
        pytest.skip(
            f"debias.knn backend {provider.backend!r} is not built for {DEVICE.type} "
            f"(available: {knn_ops.supported_backends(DEVICE)})"
        )
    if provider.kind == "faiss":
        faiss = pytest.importorskip("faiss", reason="faiss is not installed (faiss-cpu, faiss-gpu)")
        if DEVICE.type == "cuda" and not hasattr(faiss, "GpuIndexFlatL2"):
            pytest.skip("the installed faiss has no GPU support (faiss-gpu)")
    if case.streamed and provider.kind != "debias":
        # The whole database in memory, plus faiss' copy of it or cdist's block of distances.
        need = case.m * case.d * 4 + max(case.m * case.d * 4, CDIST_BLOCK_BYTES)
        available = _mem_available()
        if available is not None and available < 1.5 * need:
            pytest.skip(
                f"{name} loads the whole database: needs ~{need / 2**30:.1f} GiB, "
                f"{available / 2**30:.1f} GiB available"
            )


def _common_info(name: str, case: Case) -> dict[str, Any]:
    provider = PROVIDERS[name]
    faiss_threads = faiss_version = ""
    if provider.kind == "faiss":
        import faiss

        faiss_threads = "" if ON_GPU else faiss.omp_get_max_threads()
        faiss_version = faiss.__version__
    return dict(
        op="knn",
        provider=name,
        backend=provider.backend or "",
        # debias on the cpu backend: "int8" or "float32", as DEBIAS_KNN_FAST (default "auto")
        # chooses for this case's d on this CPU
        fast_pass=_fast_pass(provider, case),
        case=case.id,
        n=case.n,
        m=case.m,
        d=case.d,
        k=case.k,
        streamed=case.streamed,
        flops=case.flops,
        device=device_name(DEVICE),
        device_type=DEVICE.type,
        threads=torch.get_num_threads(),
        faiss_threads=faiss_threads,
        torch=str(torch.__version__),
        triton=_version("triton"),
        faiss=faiss_version,
        cdist_block_queries=max(1, CDIST_BLOCK_BYTES // (4 * case.m)),
        command=shlex.join(["pytest", *sys.argv[1:]]),
    )


def _fast_pass(provider: Provider, case: Case) -> str:
    if provider.kind != "debias" or provider.backend != "cpu":
        return ""
    return "int8" if knn_ops._use_int8("cpu", torch.float32, case.d) else "float32"


def _record_check(info: dict[str, Any], name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Agreement with the brute force on the checked queries; fails a debias provider that is
    not exact (it is then never timed)."""
    rows, recall = agreement(got, want)
    info.update(check_queries=want.shape[0], exact_rows=rows, recall=recall)
    if PROVIDERS[name].exact:
        if rows != want.shape[0]:
            pytest.fail(
                f"{name}: {want.shape[0] - rows} of {want.shape[0]} checked queries "
                "differ from the float64 brute force, so it is not timed"
            )
        info["check"] = "exact"
    else:
        info["check"] = "agreement"


CASE_PARAMS = [
    pytest.param(case, name, id=f"{case.id}-{name}") for case in CASES for name in PROVIDERS
]


@pytest.mark.parametrize(("case", "name"), CASE_PARAMS)
def test_knn(benchmark: Any, request: pytest.FixtureRequest, case: Case, name: str) -> None:
    _skip_unless_runs(name, case)
    path = request.getfixturevalue("stream_path") if case.streamed else None
    queries, database = case_data(case, path)
    want = case_oracle(case, path)
    rows = check_rows(case.n)
    benchmark.group = case.id
    info = benchmark.extra_info
    info.update(_common_info(name, case))
    info.update(case_mm(case, path))

    if case.streamed:  # everything in a subprocess: its peak memory is the call's own
        result = in_subprocess(case, name, path, STREAM_ROUNDS)
        _record_check(info, name, torch.tensor(result.pop("indices")), want)
        times = result.pop("times_s")
        info.update(result, timer="host clock, in a subprocess", **_summary(times))
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the times are info's
        return

    run = searcher(name, case, queries, database)
    _record_check(info, name, _as_indices(run()).cpu()[rows], want)  # also the warm-up
    if ON_GPU:
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        run()
        torch.cuda.synchronize(DEVICE)
        info.update(
            peak_rss_bytes=torch.cuda.max_memory_allocated(DEVICE) - base,
            peak_anon_bytes=None,
            peak_method="cuda max_memory_allocated"
            + (" (faiss' own allocations not seen)" if PROVIDERS[name].kind == "faiss" else ""),
        )
        before, start = _cpu_ticks(), time.perf_counter()
        times, timer = _times(run)
        info.update(timer=timer, **_summary(times))
        info["other_cpu"] = _other_cpu(before, _cpu_ticks(), time.perf_counter() - start)
        benchmark.pedantic(lambda: (run(), torch.cuda.synchronize(DEVICE)), rounds=1)
        return

    memory = in_subprocess(case, name, None, rounds=0)
    memory.pop("indices")
    info.update(memory)
    before, start = _cpu_ticks(), time.perf_counter()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    info["other_cpu"] = _other_cpu(before, _cpu_ticks(), time.perf_counter() - start)
    info.setdefault("timer", "pytest-benchmark pedantic (host clock)")
    if benchmark.stats is not None:  # None under --benchmark-disable
        data = benchmark.stats.stats.data
        q = statistics.quantiles(data, n=5, method="inclusive")
        info.update(median_s=statistics.median(data), q20_s=q[0], q80_s=q[3], rounds=len(data))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
