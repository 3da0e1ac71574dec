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
   data), keeping a running top-(kc + 1) per query, kc = k plus a margin.
2. Exact pass: the kc best candidates are re-ranked with float64 differences, as the brute
   force computes them, and merged into the running top-k.

A rigorous bound on the fast pass's rounding error (the dot product's, the norms', the
rounding of the centred data) turns the (kc + 1)-th score into a lower bound on the true
distance of every point the fast pass left out. When that bound exceeds the current k-th
exact distance, no left-out point can belong to the answer; otherwise (near-ties, rare) the
query is searched exhaustively in float64 against the chunk. Hence the guarantee: the
indices are those of the float64 brute force (``debias.reference.knn``), ties broken by the
lower index, and the distances are its float64 distances (equal up to the order of float64
additions).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from debias import reference
from debias.ops import _backend

METRICS = ("l2", "cosine", "standardized")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# float64 bytes of one database chunk's features: bounds the memory next to the answer.
_CHUNK_BYTES = 64 * 2**20
# float64 bytes of the gathered candidates re-ranked at once.
_RERANK_BYTES = 32 * 2**20
# Candidates kept by the fast pass beyond k: a margin for rounding, and for near-ties that
# would otherwise send a query to the exhaustive search.
_MARGIN = 8
_NO_INDEX = torch.iinfo(torch.int64).max
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
    progress: bool = False,
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
            queries' device, then torch).
        progress: a progress bar over the database chunks.
        sharded: with torch.distributed initialised, ``database`` is this rank's shard of
            the whole, the shards in rank order (rank 0 holds rows 0..m_0 - 1, and so on);
            every rank passes the same queries and receives the same answer, in the whole
            database's indices. ``group``: the process group (default: the world).

    Returns:
        ``(distances [n, k] float64, indices [n, k] int64)`` on the queries' device,
        ascending, ties broken by the lower index: the float64 brute force's answer (see the
        module docstring). Memory: O(n k) plus one chunk of the database.
    """
    _check_query(queries)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if sharded and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("sharded=True needs torch.distributed initialised (one shard per rank)")
    rows = getattr(database, "shape", (None,))[0] if not isinstance(database, str) else None
    want = k + 1 if exclude_self else k
    if rows is not None and want > rows and not sharded:
        raise ValueError(f"k must be at most the database's {rows} rows, got {k}")
    device = queries.device
    backend = _backend.resolve(backend, device, supported=_supported(device))
    search = _Search(queries, metric, want, backend)
    chunks = _chunks(database, queries, metric)
    for start, chunk in tqdm(chunks, desc="knn", unit="chunk", disable=not progress):
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


def _supported(device: torch.device) -> tuple[str, ...]:
    """The knn backends built for ``device``: the kernels of knn_candidates, then torch (on
    the CPU, Triton only in its interpreter, as a test backend)."""
    kernel = device.type == "cpu" and _backend.has_kernel("knn_candidates", "CPU")
    kernel = kernel or (device.type == "cuda" and _backend.has_kernel("knn_candidates", "CUDA"))
    found = ("cpu" if device.type == "cpu" else "cuda",) if kernel else ()
    if device.type == "cuda" or _backend.triton_interpreted():
        found += ("triton",)
    return (*found, "torch")


def _triton_knn():
    """triton_kernels/knn.py, imported on first use (importing Triton takes a second)."""
    from debias.triton_kernels import knn

    return knn


# ---- input --------------------------------------------------------------------------------


def _check_query(queries: Any) -> None:
    if not isinstance(queries, torch.Tensor):
        raise TypeError(f"queries must be a torch.Tensor, got {type(queries).__name__}")
    _check_rows("queries", queries, 0)
    if queries.shape[0] == 0 or math.prod(queries.shape[1:]) == 0:
        raise ValueError(f"queries must be a non-empty [n, ...] tensor, got {list(queries.shape)}")


def _check_rows(name: str, x: torch.Tensor, start: int) -> None:
    """TypeError unless float; ValueError naming the first row with a NaN or infinity."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be [rows, ...] with one sample per row, got {list(x.shape)}")
    finite = torch.isfinite(x.reshape(x.shape[0], math.prod(x.shape[1:]))).all(dim=1)
    if not bool(finite.all()):
        row = start + int((~finite).nonzero()[0, 0])
        raise ValueError(f"{name} row {row} contains NaN or infinity")


def _chunks(
    database: Any, queries: torch.Tensor, metric: str
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the first row, float tensor on the queries' device) per chunk, in order, each
    checked: float rows shaped like a query, finite."""
    if isinstance(database, str | os.PathLike):
        path = os.fspath(database)
        if not path.endswith(".npy"):
            raise ValueError(f"database path must name a .npy file, got {path!r}")
        database = np.load(path, mmap_mode="r")
    if isinstance(database, torch.Tensor | np.ndarray):
        source: Iterable[Any] = (database,)
    elif isinstance(database, Iterable):
        source = database
    else:
        raise TypeError(
            "database must be a tensor, a numpy array, the path of a .npy file or an iterable "
            f"of chunks, got {type(database).__name__}"
        )
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
        for lo in range(0, part.shape[0], rows_per_chunk):
            piece = part[lo : lo + rows_per_chunk]
            if isinstance(piece, np.ndarray):
                piece = torch.from_numpy(np.array(piece))  # a copy: memory maps are read-only
            piece = piece.to(queries.device)
            _check_rows("database", piece, start)
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

    def _fast(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centred vectors in the fast dtype (one rounding of the exact difference) and their
        squared norms computed in that dtype."""
        fast = rows.to(self.fast_dtype) - self.center if rows.dtype != torch.float64 else (
            (rows - self.center.double()).to(self.fast_dtype)
        )  # fmt: skip
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
        fast_db, db_sq = self._fast(db)
        score, cand = self._candidates(fast_db, db_sq, kc + 1)
        low, high = self._bounds(score, db_sq.max())
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
            exact = reference.knn_distance(self.exact[row], db.double(), self.metric)[None]
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
        score = score.double()
        low = ((score - e2).clamp(min=0).sqrt() - e1).clamp(min=0)
        high = (score + e2).clamp(min=0).sqrt() + e1
        if self.metric == "l2":
            return low, high
        # unit vectors: 1 - a.b = ||a - b||^2 / 2, up to the float64 rounding of the features
        return low.square() / 2 - 1e-14, high.square() / 2 + 1e-14

    def _rerank(self, db: torch.Tensor, cand: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """Exact float64 distances from each query to its candidate rows ``cand [n, c]`` where
        ``need``, infinity elsewhere."""
        dist = torch.full(cand.shape, math.inf, dtype=torch.float64, device=cand.device)
        rows, cols = need.nonzero(as_tuple=True)
        block = max(1, _RERANK_BYTES // (8 * db.shape[1]))
        for lo in range(0, rows.numel(), block):
            r, c = rows[lo : lo + block], cols[lo : lo + block]
            dist[r, c] = reference.knn_distance(self.exact[r], db[cand[r, c]].double(), self.metric)
        return dist


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
