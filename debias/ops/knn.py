"""Exact k nearest neighbours of queries in a database, without the n x m distance matrix.

    d(x, y) = ||x - y||                      metric "l2"
              1 - <x / ||x||, y / ||y||>     metric "cosine"
              1 - <s(x), s(y)>               metric "standardized": s standardises each
                                             channel of a sample, then makes it a unit vector

The database streams through in chunks (a tensor, a memory-mapped .npy or any iterable of
chunks), each searched in two passes:

1. Fast pass (the backend's kernel): scores r = ||a||^2 + ||b||^2 - 2 a.b on the centred
   vectors (a = x - c, b = y - c, c the queries' mean: the expansion loses digits in
   proportion to the norms, so centring keeps them small) in float32 (float64 for float64
   data), keeping a running top-(kc + 1) per query, kc = k plus a margin. On the ``cpu``
   backend, for long vectors on a CPU with int8 matrix units, the products a.b come instead
   from two levels of int8 codes with exact int32 sums (the int8 pass, ``_bounds_int8``);
   ``DEBIAS_KNN_FAST`` = "auto" (default), "float32" or "int8" (where its kernel is built)
   chooses, read at each call.
2. Exact pass: the kc best candidates are re-ranked with float64 differences, as the brute
   force computes them, and merged into the running top-k.

A rigorous bound on the fast pass's error (the dot product's rounding or quantisation, the
norms', the rounding of the centred data) turns the (kc + 1)-th score into a lower bound on
the true distance of every point the fast pass left out. When that bound exceeds the current
k-th exact distance, no left-out point can belong to the answer; otherwise (near-ties, rare;
or data the int8 codes cannot resolve) the query is searched exhaustively in float64 against
the chunk. Hence the guarantee: the indices are those of the float64 brute force
(``debias.reference.knn``), ties broken by the lower index, and the distances are its float64
distances (equal up to the order of float64 additions).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from debias import reference
from debias.checks import (
    check_finite_rows,
    check_float_dtype,
    check_int,
    check_samples,
    check_tensor,
)
from debias.ops import _backend

METRICS = ("l2", "cosine", "standardized")
# float64 bytes of one database chunk's features: bounds the memory next to the answer.
_CHUNK_BYTES = 64 * 2**20
# float64 bytes of the gathered candidates re-ranked at once: small enough for the allocator to
# reuse its blocks (measured, 3000 rows of d = 3072, one thread: 40 ms in 1-8 MiB blocks,
# 73 ms in 16 MiB and 104 ms in 32 MiB ones, which take fresh pages from the system each time).
_RERANK_BYTES = 8 * 2**20
# Candidates kept by the fast pass beyond k: a margin for rounding, and for near-ties that
# would otherwise send a query to the exhaustive search.
_MARGIN = 8
_NO_INDEX = torch.iinfo(torch.int64).max
# The int8 pass (cpu backend). DEBIAS_KNN_FAST picks it: "auto" where it is faster (below),
# "int8" wherever its kernel is built (tests), "float32" never. d <= 2^16 keeps its int32 sums
# exact: |h . l + l . h| <= 2 d 127 * 128 < 2^31.
_FAST_ENV = "DEBIAS_KNN_FAST"
_FAST_CHOICES = ("auto", "float32", "int8")
_INT8_MAX_D = 2**16
# "auto" takes the int8 pass from this many values per sample, on a CPU with AMX or AVX512-VNNI.
# Measured on a 2-core Xeon with AMX (torch 2.13, idle), the whole debias.knn, n=1000, m=20000,
# k=10, float32 Gaussian data, medians of 5 alternating in one process, seconds:
#   d         64     128    160    192    256    512    1024
#   float32   .019   .031   .036   .043   .056   .107   .222
#   int8      .023   .031   .035   .038   .042   .057   .106
# Below ~150 the products are cheap next to writing and scanning two int32 tiles per pair.
_INT8_MIN_D = 160
# The longest list the CUDA kernel keeps per query (kKnnMaxK, csrc/cuda/knn.cuh); its products
# are plain float32 FMA, so it needs no dot_unit.
_CUDA_MAX_COUNT = 128


def knn(
    queries: torch.Tensor,
    database: Any,
    k: int,
    metric: str = "l2",
    *,
    exclude_self: bool = False,
    backend: str | None = None,
    progress: bool | Callable[[Iterable], Iterable] = False,
    sharded: bool = False,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest database rows of each query, exactly.

    Args:
        queries: ``[n, ...]`` float tensor (each sample flattened to d values; "standardized"
            reads channels from dim 1).
        database: ``[m, ...]`` samples shaped like a query: a tensor or numpy array, the path
            of a .npy file (memory-mapped, read in chunks), or an iterable of such chunks in
            index order (streamed once: larger than memory is fine).
        k: neighbours per query, 1 <= k <= m.
        metric: "l2" (true Euclidean distance, not squared), "cosine" (1 - cosine
            similarity) or "standardized" (1 - similarity after per-sample, per-channel
            standardisation and normalisation).
        exclude_self: the database is the queries themselves (m = n): query i never gets
            row i (train-vs-train baselines).
        backend: "cpu", "cuda", "triton" or "torch" (default: the kernel built for the
            queries' device, then torch). On "cpu", the environment variable DEBIAS_KNN_FAST
            ("auto", "float32" or "int8") picks the fast pass (module docstring).
        progress: a progress bar over the database chunks: True draws tqdm's (imported only
            then; tqdm comes with the ``pipeline`` extra, or ``pip install tqdm``), a callable
            wraps the iterable of chunks with the caller's own bar (``progress(chunks)`` must
            yield what it is given), False (default) draws none.
        sharded: with torch.distributed initialised, ``database`` is this rank's shard of
            the whole, the shards in rank order (rank 0 holds rows 0..m_0 - 1, and so on);
            every rank passes the same queries and receives the same answer, in the whole
            database's indices. ``group``: the process group (default: the world).

    Returns:
        ``(distances [n, k] float64, indices [n, k] int64)`` on the queries' device,
        ascending, ties broken by the lower index: the float64 brute force's answer (see the
        module docstring). Memory: O(n k) plus one chunk of the database.
    """
    check_samples("queries", queries)
    database = _check_database(database, queries)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    k = check_int("k", k, 1)
    if sharded and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("sharded=True needs torch.distributed initialised (one shard per rank)")
    rows = getattr(database, "shape", (None,))[0] if not isinstance(database, str) else None
    want = k + 1 if exclude_self else k
    if rows is not None and want > rows and not sharded:
        raise ValueError(f"k must be at most the database's {rows} rows, got {k}")
    device = queries.device
    backend = _backend.resolve(backend, device, supported=supported_backends(device))
    search = _Search(queries, metric, want, backend)
    chunks = _chunks(database, queries, metric, search.int8)
    for start, chunk in _progress_bar(progress, chunks):
        search.add(start, chunk)
    dist, index, seen = search.dist, search.index, search.seen
    if sharded:
        dist, index, seen = _merge_shards(dist, index, seen, want, group)
    if seen < want:
        if seen == 0:
            raise ValueError("database is empty")
        raise ValueError(f"k must be at most the database's {seen} rows, got {k}")
    if exclude_self:
        if seen != queries.shape[0]:
            raise ValueError(
                f"exclude_self needs the queries themselves as the database, got "
                f"{queries.shape[0]} queries and {seen} database rows"
            )
        return _drop_self(dist, index, k)
    return dist, index


def _progress_bar(progress: Any, chunks: Iterable) -> Iterable:
    """``chunks`` through the bar ``progress`` asks for: none (False), tqdm's (True: the core
    depends on torch and numpy only, so tqdm is imported here, when a bar is asked for) or the
    caller's (a callable)."""
    if callable(progress):
        return progress(chunks)
    if not progress:
        return chunks
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError(
            "progress=True draws its bar with tqdm, which is not installed: pip install tqdm "
            "(or the pipeline extra), or pass progress=<a callable wrapping an iterable>"
        ) from err
    return tqdm(chunks, desc="knn", unit="chunk")


def _merge_shards(
    dist: torch.Tensor, index: torch.Tensor, rows: int, k: int, group: Any
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's top k merged into the whole database's: shard sizes first (each rank's
    indices shift by the rows of the ranks before it), then the lists, padded to k."""
    dist_mod = torch.distributed
    world = dist_mod.get_world_size(group)
    rank = dist_mod.get_rank(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dist.device) for _ in range(world)]
    dist_mod.all_gather(sizes, torch.tensor([rows], device=dist.device), group=group)
    sizes = [int(s) for s in sizes]
    offset = sum(sizes[:rank])
    index = torch.where(index == _NO_INDEX, index, index + offset)
    dists = [torch.empty_like(dist) for _ in range(world)]
    indices = [torch.empty_like(index) for _ in range(world)]
    dist_mod.all_gather(dists, dist.contiguous(), group=group)
    dist_mod.all_gather(indices, index.contiguous(), group=group)
    merged_d, merged_i = dists[0], indices[0]
    for d, i in zip(dists[1:], indices[1:], strict=True):
        merged_d, merged_i = _merge(merged_d, merged_i, d, i, k)
    return merged_d, merged_i, sum(sizes)


def _dot_unit(backend: str, dtype: torch.dtype, d: int = 1) -> float:
    """Relative error of one product term in the fast pass's dot products beyond fp32
    rounding: the Triton kernel's TF32 tensor-core products (its own bound), or the inputs'
    rounding when torch's float32 matrix products may run in TF32 or bf16
    (torch.set_float32_matmul_precision "high" / "medium", or allow_tf32)."""
    if dtype == torch.float64:
        return 0.0
    if backend == "triton":
        return _triton_knn().dot_unit(d, dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if torch.get_float32_matmul_precision() != "highest" or tf32:
        return 2.0**-7  # bf16 inputs, the coarsest a float32 product may use; covers TF32
    return 0.0


def supported_backends(device: torch.device) -> tuple[str, ...]:
    """The knn backends built for ``device``: the kernels of knn_candidates, then torch (on
    the CPU, Triton only in its interpreter, as a test backend)."""
    kernel = device.type == "cpu" and _backend.has_kernel("knn_candidates", "CPU")
    kernel = kernel or (device.type == "cuda" and _backend.has_kernel("knn_candidates", "CUDA"))
    found = ("cpu" if device.type == "cpu" else "cuda",) if kernel else ()
    if device.type == "cuda" or _backend.triton_interpreted():
        found += ("triton",)
    return (*found, "torch")


def fast_pass_report(int8_units: bool) -> dict[str, Any]:
    """Which fast pass :func:`knn` takes on the cpu backend, for each kind of data, and why
    (as ``_use_int8`` decides; ``int8_units``: the CPU has AMX or AVX512-VNNI). For
    ``debias info``."""
    try:
        setting = _fast_choice()
    except ValueError as err:
        return {"setting": os.environ.get(_FAST_ENV), "error": str(err)}
    kernel = _backend.has_kernel("knn_candidates_int8", "CPU")
    min_d = _INT8_MIN_D
    if setting == "float32":
        long, why = "float32", f"{_FAST_ENV}=float32"
    elif not kernel:
        long, why = "float32", "the int8 kernel is not built (no compiled kernels)"
    elif setting == "auto" and not int8_units:
        long, why = "float32", "no AMX or AVX512-VNNI: int8 products are not faster here"
    elif not _int_mm_exact():
        long, why = "float32", "torch._int_mm's int32 sums are not exact on this CPU"
    elif setting == "int8":
        long, why = "int8", f"{_FAST_ENV}=int8"
    else:
        long, why = "int8", "AMX or AVX512-VNNI int8 products through torch._int_mm (oneDNN)"
    short = "int8" if setting == "int8" and long == "int8" else "float32"
    return {
        "setting": setting,
        f"float32 data, d >= {min_d}": long,
        f"float32 data, d < {min_d}": short,
        "float64 data": "float64",
        "why": why,
    }


def _fast_choice() -> str:
    """DEBIAS_KNN_FAST, read at each call: "auto" (unset or empty), "float32" or "int8"."""
    choice = os.environ.get(_FAST_ENV, "").strip().lower() or "auto"
    if choice not in _FAST_CHOICES:
        raise ValueError(f"{_FAST_ENV} must be one of {_FAST_CHOICES}, got {choice!r}")
    return choice


def _use_int8(backend: str, dtype: torch.dtype, d: int) -> bool:
    """Whether the search's fast pass is the int8 one: the cpu backend, a float32 fast pass
    (float64 data keeps its float64 pass: int8 codes would only add error to it), the kernel
    built, d <= 2^16, torch._int_mm exact here; "auto" also needs int8 matrix units and
    d >= _INT8_MIN_D."""
    choice = _fast_choice()
    if choice == "float32" or backend != "cpu" or dtype != torch.float32 or d > _INT8_MAX_D:
        return False
    if not _backend.has_kernel("knn_candidates_int8", "CPU"):
        return False
    if choice == "auto" and (d < _INT8_MIN_D or not _int8_units()):
        return False
    return _int_mm_exact()


def _int8_units() -> bool:
    """AMX or AVX512-VNNI: where oneDNN's int8 products run several times faster than sgemm."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    return bool(amx or vnni)


@functools.cache
def _int_mm_exact() -> bool:
    """torch._int_mm's int32 sums are exact on this CPU: checked once per process against int64
    products, on extreme codes (every product -128 * 127 or 127 * 127, where a kernel that
    saturates int16 pairs would fail) and random ones, in the shapes the kernel uses (a column
    slice of [h | l], a transposed database tile). torch 2.13's oneDNN path returns garbage for
    K = 1, which the int8 pass never asks for (d = 1 is padded to 2)."""
    if not hasattr(torch, "_int_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    for n, d, m in ((5, 2, 37), (17, 9, 64), (64, 64, 129), (3, 131, 300)):
        a = torch.randint(-128, 128, (n, 2 * d), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (m, 2 * d), generator=g, dtype=torch.int8)
        a[0], b[0], b[1] = -128, -128, 127
        for x, y in ((a[:, :d], b[:, d:]), (a, b)):
            if not torch.equal(torch._int_mm(x, y.t()).long(), x.long() @ y.long().t()):
                return False
    return True


def _triton_knn():
    """triton_kernels/knn.py, imported on first use (importing Triton takes a second)."""
    from debias.triton_kernels import knn

    return knn


# ---- input --------------------------------------------------------------------------------


def _check_database(database: Any, queries: torch.Tensor) -> Any:
    """The database source, opened (a .npy path memory-mapped) and checked as far as is
    possible without reading it: a tensor or array must hold rows, a tensor data."""
    if isinstance(database, str | os.PathLike):
        database = open_npy("database", database)
    if isinstance(database, torch.Tensor):
        check_tensor("database", database)
    if isinstance(database, torch.Tensor | np.ndarray):
        if database.ndim < 2:
            raise ValueError(
                f"database must be [m, ...] rows shaped like a query "
                f"{list(queries.shape[1:])}, got shape {list(database.shape)}"
            )
    elif not isinstance(database, Iterable):
        raise TypeError(
            "database must be a tensor, a numpy array, the path of a .npy file or an iterable "
            f"of chunks, got {type(database).__name__}"
        )
    return database


def open_npy(name: str, path: str | os.PathLike) -> np.ndarray:
    """The .npy file at ``path``, memory-mapped (read later, a chunk at a time)."""
    path = os.fspath(path)
    if not path.endswith(".npy"):
        raise ValueError(f"{name} path must name a .npy file, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file {path!r}")
    return np.load(path, mmap_mode="r")


def read_chunks(source: Any, rows: int) -> Iterator[Any]:
    """A database or training source in row order, ``rows`` rows at a time: a tensor or
    array (a .npy file's memory map, read only now) in slices, an iterable's tensors and arrays
    each in slices. numpy slices become tensors (a copy: memory maps are read-only); items that
    are neither are yielded as they are, for the caller to refuse."""
    parts = (source,) if isinstance(source, torch.Tensor | np.ndarray) else source
    for part in parts:
        if not isinstance(part, torch.Tensor | np.ndarray) or part.ndim == 0:
            yield part
            continue
        for lo in range(0, part.shape[0], rows):
            piece = part[lo : lo + rows]
            yield torch.from_numpy(np.array(piece)) if isinstance(piece, np.ndarray) else piece


def _chunks(
    database: Any, queries: torch.Tensor, metric: str, int8: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the first row, float tensor on the queries' device) per chunk, in order, each
    checked: float rows shaped like a query, finite. A chunk is _CHUNK_BYTES of float64 values,
    or of int8 codes (2 bytes a value) where the int8 pass compares a float32 tensor's rows in
    place ("l2"): 4 times the rows, and fewer candidates re-ranked at chunk boundaries."""
    source = (database,) if isinstance(database, torch.Tensor | np.ndarray) else database
    sample = queries.shape[1:]
    d = math.prod(sample)
    rows_per_chunk = max(1, _CHUNK_BYTES // (8 * d))
    start = 0
    for part in source:
        if isinstance(part, np.ndarray):
            if part.dtype.kind != "f":
                raise TypeError(f"database must hold floats, got numpy dtype {part.dtype}")
        elif not isinstance(part, torch.Tensor):
            raise TypeError(f"database chunks must be tensors or arrays, got {type(part).__name__}")
        if part.ndim < 1 or tuple(part.shape[1:]) != tuple(sample):
            if metric == "standardized" or math.prod(part.shape[1:]) != d or part.ndim < 2:
                raise ValueError(
                    f"database rows must have a query's shape {list(sample)}, got chunk "
                    f"shape {list(part.shape)}"
                )
        step = rows_per_chunk
        in_place = isinstance(part, torch.Tensor) and part.dtype == torch.float32
        in_place = in_place and part.is_contiguous()
        if int8 and metric == "l2" and in_place and part.device == queries.device:
            step = max(1, _CHUNK_BYTES // (2 * d))
        for piece in read_chunks(part, step):
            piece = piece.to(queries.device)
            check_float_dtype("database", piece)
            check_finite_rows("database", piece, start)
            yield start, piece
            start += piece.shape[0]


def _features(name: str, x: torch.Tensor, metric: str, start: int) -> torch.Tensor:
    """The metric's float64 feature rows; ValueError naming a row that has none (a zero
    vector under "cosine", a sample with every channel constant under "standardized")."""
    features = reference.knn_features(x, metric)
    if metric != "l2":
        finite = torch.isfinite(features).all(dim=1)
        if not bool(finite.all()):
            row = start + int((~finite).nonzero()[0, 0])
            what = "is zero" if metric == "cosine" else "has every channel constant"
            raise ValueError(f"{name} row {row} {what}: its {metric} distance is undefined")
    return features


def _drop_self(
    dist: torch.Tensor, index: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of k + 1 neighbours, drop row i's own index; where it is absent (k + 1 exact
    duplicates of lower index come first), drop the last."""
    own = torch.arange(index.shape[0], device=index.device)[:, None]
    drop = (index == own).int().argmax(dim=1)
    drop = torch.where((index == own).any(dim=1), drop, k)
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[torch.arange(index.shape[0], device=index.device), drop] = False
    return dist[keep].view(-1, k), index[keep].view(-1, k)


# ---- the search ---------------------------------------------------------------------------


class _Search:
    """The running answer and the per-query state of the two passes."""

    def __init__(self, queries: torch.Tensor, metric: str, k: int, backend: str) -> None:
        self.metric, self.k, self.backend = metric, k, backend
        self.exact = _features("queries", queries, metric, 0)  # [n, d] float64
        # The fast pass runs in float32, or float64 for float64 data, on vectors centred on
        # the queries' mean (rounded to that dtype: any centre serves, if the same for both).
        self.fast_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
        self.unit = 2.0**-53 if self.fast_dtype == torch.float64 else 2.0**-24
        self.dot_unit = _dot_unit(backend, self.fast_dtype, self.exact.shape[1])
        self.center = self.exact.mean(dim=0).to(self.fast_dtype)
        self.fast_q, self.q_sq = self._fast(self.exact)
        n = queries.shape[0]
        self.dist = torch.full((n, k), math.inf, dtype=torch.float64, device=queries.device)
        self.index = torch.full((n, k), _NO_INDEX, dtype=torch.int64, device=queries.device)
        self.seen = 0
        self.int8 = _use_int8(backend, self.fast_dtype, self.exact.shape[1])
        if self.int8:
            self.int8 = self._quantize_queries()

    def _fast(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centred vectors in the fast dtype (one rounding of the exact difference) and their
        squared norms computed in that dtype."""
        fast = (
            rows.to(self.fast_dtype) - self.center
            if rows.dtype != torch.float64
            else ((rows - self.center.double()).to(self.fast_dtype))
        )
        return fast, fast.square().sum(dim=1)

    def add(self, start: int, chunk: torch.Tensor) -> None:
        m = chunk.shape[0]
        if m == 0:
            return
        self.seen += m
        # "l2" compares the data itself: the float64 copy of a chunk is never made, only of
        # the candidates; the other metrics need their float64 features for the fast pass.
        flat = chunk.reshape(m, -1)
        db = flat if self.metric == "l2" else _features("database", chunk, self.metric, start)
        kc = min(m, self.k + max(self.k, _MARGIN))
        if kc + 1 > m:  # every row is a candidate: nothing is left out
            cand = torch.arange(m, device=db.device).expand(self.exact.shape[0], m)
            dist = self._rerank(db, cand, torch.ones(cand.shape, dtype=torch.bool))
            self.dist, self.index = _merge(self.dist, self.index, dist, cand + start, self.k)
            return
        fast = self._candidates_int8(db, kc + 1) if self.int8 else None
        if fast is None:  # the float32 (float64) pass
            fast_db, db_sq = self._fast(db)
            score, cand = self._candidates(fast_db, db_sq, kc + 1)
            low, high = self._bounds(score, db_sq.max())
        else:
            low, high, cand = fast
        cand = cand[:, :kc]
        # A candidate is re-ranked only if it can reach the top k: its lower bound is at most
        # the k-th smallest of the upper bounds (exact distances for the current answer).
        reach = torch.cat((self.dist, high[:, :kc]), dim=1).kthvalue(self.k, dim=1).values
        dist = self._rerank(db, cand, low[:, :kc] <= reach[:, None])
        merged = _merge(self.dist, self.index, dist, cand + start, self.k)
        # A left-out point matters only if it could beat the k-th distance; k-th distances only
        # shrink as chunks arrive, so the test against the merged answer is final.
        unsure = ~(low[:, kc] > merged[0][:, -1])
        self.dist, self.index = merged
        for row in unsure.nonzero()[:, 0].tolist():
            exact = self._exhaustive(row, db)[None]
            all_rows = torch.arange(start, start + m, device=db.device)[None]
            kept = self.index[row : row + 1] < start  # earlier chunks' part; this one's is redone
            d_prev = torch.where(kept, self.dist[row : row + 1], math.inf)
            i_prev = torch.where(kept, self.index[row : row + 1], _NO_INDEX)
            d_row, i_row = _merge(d_prev, i_prev, exact, all_rows, self.k)
            self.dist[row], self.index[row] = d_row[0], i_row[0]

    def _candidates(
        self, fast_db: torch.Tensor, db_sq: torch.Tensor, count: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` best fast scores per query, ascending, and their chunk rows."""
        args = (self.fast_q.contiguous(), fast_db.contiguous(), self.q_sq, db_sq, count)
        if self.backend == "cpu" or (self.backend == "cuda" and count <= _CUDA_MAX_COUNT):
            return torch.ops.debias_C.knn_candidates(*args)
        if self.backend == "triton" and count <= _triton_knn().MAX_COUNT:
            return _triton_knn().candidates(*args)
        # torch (and cuda, triton beyond their longest lists): the expansion through a matrix
        # product, a block of queries at a time.
        block = max(1, _CHUNK_BYTES // (4 * fast_db.shape[0]))
        scores, rows = [], []
        for lo in range(0, self.fast_q.shape[0], block):
            q = self.fast_q[lo : lo + block]
            base = self.q_sq[lo : lo + block, None] + db_sq[None, :]
            r = torch.addmm(base, q, fast_db.T, alpha=-2.0)
            s, i = torch.topk(r, count, dim=1, largest=False, sorted=True)
            scores.append(s)
            rows.append(i)
        return torch.cat(scores), torch.cat(rows)

    def _bounds(
        self, score: torch.Tensor, db_sq_max: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds on the metric distances of points with fast scores ``score``
        (any shape ``[n, ...]``).

        With a, b the exact centred vectors and a~, b~ their roundings to the fast dtype (unit
        roundoff u): | ||a~ - b~|| - ||a - b|| | <= u (|a~| + |b~|) (1 + u) (e1); the fast score
        is within (3 gamma_d + 4u) (|a~| + |b~|)^2 of ||a~ - b~||^2 (e2): the error bound
        gamma_d |a~| |b~| of a dot product summed in any order, gamma_d = d u / (1 - d u),
        gamma_d (|a~|^2 + |b~|^2) for the two squared norms, and the rounding of the two
        additions; plus dot_unit (|a~| + |b~|)^2 where the product rounds its inputs first
        (TF32, bf16). |b~| is bounded by the chunk's largest norm; the computed norms are within
        gamma_d of the true ones, hence the (1 + gamma_d) on the span, and a float64 term
        covers the features' own rounding.
        """
        u = self.unit
        d = self.fast_q.shape[1]
        gamma = d * u / (1 - d * u)
        norms = self.q_sq.double().sqrt() + db_sq_max.double().sqrt()
        span = (norms * (1 + gamma) * (1 + 4 * u))[:, None]
        e2 = (3 * gamma + 4 * u + self.dot_unit) * span.square()
        e1 = (u + 2.0**-50) * span
        return self._distance_bounds(score, e1, e2)

    def _distance_bounds(
        self, score: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds on the metric distance from a score within e2 of ||a~ - b~||^2, ||a~ - b~||
        within e1 of ||a - b|| (``[n, 1]`` each)."""
        score = score.double()
        low = ((score - e2).clamp(min=0).sqrt() - e1).clamp(min=0)
        high = (score + e2).clamp(min=0).sqrt() + e1
        if self.metric == "l2":
            return low, high
        # unit vectors: 1 - a.b = ||a - b||^2 / 2, up to the float64 rounding of the features
        return low.square() / 2 - 1e-14, high.square() / 2 + 1e-14

    # ---- the int8 pass

    def _quantize_queries(self) -> bool:
        """The queries' int8 codes ``[h | l]`` and their per-row terms of the bound; False (the
        float32 pass then runs) where a query needs a scale out of the kernel's range."""
        rows = _pad_one(self.fast_q)
        d = rows.shape[1]
        self.codes_q = torch.empty(rows.shape[0], 2 * d, dtype=torch.int8)
        zero = torch.zeros(d, dtype=torch.float32)
        stats = torch.ops.debias_C.knn_quantize(rows.contiguous(), zero, False, self.codes_q)
        if not bool(torch.isfinite(stats).all()):
            return False
        # the kernel's inputs: qn_i = ||a~_i||^2 and qs_i = 2 s_i in float32 (s_i: a power of two)
        self.q_norm_sq, self.q_scale2 = stats[:, 0].float(), (2 * stats[:, 1]).float()
        self.q_terms = _int8_terms(stats)
        self.center_int8 = _pad_one(self.center[None])[0].contiguous()
        self.codes_db: torch.Tensor | None = None  # one buffer for every chunk's codes
        return True

    def _candidates_int8(
        self, db: torch.Tensor, count: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The int8 pass on a chunk: (lower bounds, upper bounds, chunk rows) of the ``count``
        best int8 scores per query, ascending; None (the float32 pass then runs) where a row
        needs a scale out of the kernel's range."""
        # knn_quantize dispatches float32 and float64: narrower rows are widened to float32.
        rows = db.float() if db.dtype.itemsize < 4 else db
        rows = _pad_one(rows).contiguous()
        m, d = rows.shape
        if self.codes_db is None or self.codes_db.shape[0] < m:
            self.codes_db = torch.empty(m, 2 * d, dtype=torch.int8)
        codes = self.codes_db[:m]
        stats = torch.ops.debias_C.knn_quantize(rows, self.center_int8, True, codes)
        if not bool(torch.isfinite(stats).all()):
            return None
        score, cand = torch.ops.debias_C.knn_candidates_int8(
            self.codes_q,
            codes,
            self.q_norm_sq,
            stats[:, 0].float(),
            self.q_scale2,
            stats[:, 1].float(),
            count,
        )
        low, high = self._bounds_int8(score, stats)
        return low, high, cand

    def _bounds_int8(
        self, score: torch.Tensor, db_stats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds on the metric distances of points with int8 scores ``score``
        ``[n, c]``; ``db_stats`` ``[m, 3]``: the chunk's knn_quantize statistics.

        Codes (knn_quantize, csrc/knn.cpp): a~ (the centred float32 vector, as in _bounds) with
        s = 2^e >= max|a~_k| / 127 is a~ = s X / 256 + e_a, X integer, |e_a,k| <= s / 512, and
        X = 256 h + l with int8 h, l. So a~ . b~ = s_a s_b (G1 + G2 / 256) + D with exact int32
        G1 = h_a . h_b, G2 = h_a . l_b + l_a . h_b and
          D = a~ . e_b + e_a . (b~ - e_b) + s_a s_b l_a . l_b / 65536,
          |D| <= sqrt(d) / 512 (|a~| s_b + |b~| s_a) + d s_a s_b / 512^2 + lambda_a lambda_b
        (Cauchy-Schwarz, |e| <= sqrt(d) s / 512, lambda = s |l| / 256). The kernel's float32
        score r = (qn + yn) - 2 s_a s_b (fl(G1) + fl(G2) / 256) (products by the powers of two
        exact, norms summed in float64 then rounded) is within
          2 |D| + 4u (N_a + N_b)^2,   N = |a~| + sqrt(d) s / 512 + 2 lambda
        of ||a~ - b~||^2: the conversions and the sum of G1, G2 err by 2u (|G1| + |G2| / 256)
        <= 2u N_a N_b / (s_a s_b) (|s h| <= N, |s l / 256| <= lambda), the norms by u each and
        the two additions by u each. The chunk's largest |b~|, s_b and lambda_b stand for b's
        (the bound grows with each), (1 + 2^-20) covers the float64 arithmetic of the bound and
        of the norms, and e1 is _bounds' centring term with the norms computed in float64.
        """
        u = 2.0**-24
        d = self.codes_q.shape[1] // 2
        a_norm, s_a, lam_a = (t[:, None] for t in self.q_terms)
        b_norm, s_b, lam_b = (t.max() for t in _int8_terms(db_stats))
        dot = _int8_dot_error((a_norm, s_a, lam_a), (b_norm, s_b, lam_b), d)
        big_a = a_norm + math.sqrt(d) * s_a / 512 + 2 * lam_a
        big_b = b_norm + math.sqrt(d) * s_b / 512 + 2 * lam_b
        slack = 1 + 2.0**-20
        e2 = (2 * dot + 4 * u * (big_a + big_b).square()) * slack
        e1 = (u + 2.0**-50) * (a_norm + b_norm) * slack
        return self._distance_bounds(score, e1, e2)

    def _rerank(self, db: torch.Tensor, cand: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """Exact float64 distances from each query to its candidate rows ``cand [n, c]`` where
        ``need``, infinity elsewhere."""
        dist = torch.full(cand.shape, math.inf, dtype=torch.float64, device=cand.device)
        rows, cols = need.nonzero(as_tuple=True)
        block = max(1, _RERANK_BYTES // (8 * db.shape[1]))
        for lo in range(0, rows.numel(), block):
            r, c = rows[lo : lo + block], cols[lo : lo + block]
            dist[r, c] = _distance(self.exact[r], db[cand[r, c]], self.metric)
        return dist

    def _exhaustive(self, row: int, db: torch.Tensor) -> torch.Tensor:
        """Exact float64 distances ``[m]`` from query ``row`` to every row of the chunk, a block
        of _RERANK_BYTES at a time."""
        block = max(1, _RERANK_BYTES // (8 * db.shape[1]))
        parts = [
            _distance(self.exact[row], db[lo : lo + block], self.metric)
            for lo in range(0, db.shape[0], block)
        ]
        return torch.cat(parts)


def _int8_terms(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 bound's row terms from knn_quantize's statistics ``[r, 3]``: ||a~||, the scale s
    and lambda = s ||l|| / 256, each ``[r]`` float64."""
    return stats[:, 0].sqrt(), stats[:, 1], stats[:, 1] * stats[:, 2].sqrt() / 256


def _int8_dot_error(a_terms: tuple, b_terms: tuple, d: int) -> torch.Tensor:
    """|a~ . b~ - s_a s_b (G1 + G2 / 256)| <= sqrt(d) / 512 (|a~| s_b + |b~| s_a)
    + d s_a s_b / 512^2 + lambda_a lambda_b, from each side's (|a~|, s, lambda) (_int8_terms;
    any broadcastable shapes). Derivation: _Search._bounds_int8."""
    (a_norm, s_a, lam_a), (b_norm, s_b, lam_b) = a_terms, b_terms
    root = math.sqrt(d)
    return root / 512 * (a_norm * s_b + b_norm * s_a) + d * s_a * s_b / 512**2 + lam_a * lam_b


def _distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """reference.knn_distance of float64 rows ``a`` and rows ``b`` of any float dtype, with the
    same float64 arithmetic, without a float64 copy of ``b`` or temporaries beyond one."""
    if metric == "l2":
        return torch.sub(a, b).square_().sum(-1).sqrt_()
    return 1.0 - torch.mul(a, b).sum(-1)


def _pad_one(rows: torch.Tensor) -> torch.Tensor:
    """``[r, 1]`` rows with a zero column appended, others as they are: torch._int_mm returns
    garbage for K = 1 (torch 2.13, oneDNN), and a zero coordinate changes no distance."""
    return torch.nn.functional.pad(rows, (0, 1)) if rows.shape[1] == 1 else rows


def _merge(
    d_a: torch.Tensor, i_a: torch.Tensor, d_b: torch.Tensor, i_b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest of two lists per row, ordered by (distance, index)."""
    dist = torch.cat((d_a, d_b), dim=1)
    index = torch.cat((i_a, i_b.expand(d_b.shape[0], -1)), dim=1)
    order = torch.argsort(index, dim=1, stable=True)
    dist, index = dist.gather(1, order), index.gather(1, order)
    order = torch.argsort(dist, dim=1, stable=True)[:, :k]
    return dist.gather(1, order), index.gather(1, order)
