"""Triton kernels of the knn op: the fast pass, the ``count`` best scores of each query.

    r_ij = qn_i + dn_j - 2 <q_i, y_j>      read n d + (n / TILE_M) m d, write n count

For each query i the ``count`` database rows of smallest r_ij, ascending by (r, j): ties go to
the lower index, exactly, so the list is the true top-count of the computed scores (the
exactness proof in debias/ops/knn.py needs that, not just "some" count best). The n x m
matrix never exists: a program owns TILE_M queries, walks its share of the database in tiles
of TILE_N rows (one ``tl.dot`` per tile, over d in TILE_D slices) and keeps a running list.

Selection (float32). A score and its row pack into one int64 key that sorts as (r, j): the
float's bits made order-preserving (negatives: every bit but the sign flipped) in the high
word, j in the low word (j < 2^31). Keys are unique, so the list is plain integers: a tile
whose keys all exceed every row's count-th key is skipped (one compare per element: after the
first tiles almost all are); otherwise the running W keys and the tile's W keys are joined and
``tl.topk`` keeps the W smallest (a bitonic network: O(W log^2 W) per row, against O(count W)
for count rounds of min-and-mask). W = TILE_N >= count; only the first count are exact
(later entries may be stale after a skipped tile), which is all that is written.
-0.0 is taken as +0.0 (equal scores tie on the index), NaN (only from inf - inf, overflow) as
+inf; +inf scores are ordinary keys below the "empty" key, int64 max.

Selection (float64). A score needs all 64 bits, so (score, row) stay two tensors and a merge
is count rounds of a lexicographic min (min score, then min row among the equal) over both
lists, masking out the row taken (rows are unique). Slower, and float64 is the rare case.

Few queries. With fewer query tiles than the GPU has room for, the database is split too:
grid (query tiles, splits), each program writing its split's list, and the launcher merges
the splits' lists (n x splits x count values: one sort by (r, j) in torch). The split comes
from n, m and the SM count (4 "SMs" in the interpreter).

Rounding. float32: ``tl.dot`` runs on tensor cores with input_precision "tf32": each input is
rounded to tf32 (10-bit mantissa, relative error <= 2^-11), the products of those are exact
and the sums are fp32 but may truncate (tensor cores align and cut rather than round), so
    |fl(a.b) - a.b| <= (dot_unit(d) + gamma_d) sum_i |a_i b_i|,  gamma_d = d u / (1 - d u),
with u = 2^-24 and dot_unit(d) = delta + gamma_d(2^-22) (1 + delta) - gamma_d, delta =
2^-10 + 2^-22 (two input roundings), gamma_d(2^-22) covering truncated accumulation with a
factor two to spare. DOT_UNIT = 2^-8 bounds dot_unit(d) for every d <= 16000 (16282). float64: IEEE
("ieee" precision), dot_unit = 0. The score is then (qn + dn) - 2 dot: two more roundings,
fp fusion off. The interpreter multiplies in plain fp32 (no tf32), within the same bound.

Tile, chunk, worker and block mean what csrc/README.md says, in every kernel file.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_COUNT = 128  # the running list is TILE_N = 128 keys wide at most (registers)
DOT_UNIT = 2.0**-8  # float32, d <= 16000; see dot_unit(d, dtype) for any d
_INTERPRETER_SMS = 4
_MAX_ROWS = 2**31 - 1  # row indices live in the low 31 bits of a key
_EMPTY = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # int64 max: the key of "no row"
_NO_ROW = tl.constexpr(0x7FFFFFFF)  # float64 lists: the row of "no row"


def dot_unit(d: int, dtype: torch.dtype) -> float:
    """The DOT_UNIT of the module docstring's bound for dimension d (0 for float64)."""
    if dtype == torch.float64:
        return 0.0

    def gamma(unit: float) -> float:
        return d * unit / (1 - d * unit)

    delta = 2.0**-10 + 2.0**-22
    return delta + gamma(2.0**-22) * (1 + delta) - gamma(2.0**-24)


# ---- helpers ---------------------------------------------------------------------------------


@triton.jit
def _tile_scores(
    q_ptr,
    db_ptr,
    qn,
    dn_ptr,
    o_m,
    m_m,
    start,
    hi,
    d,
    TILE_N: tl.constexpr,
    TILE_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(scores [TILE_M, TILE_N], rows [TILE_N] int32, valid [TILE_M, TILE_N]) of database
    rows start .. start + TILE_N - 1 (those >= hi invalid)."""
    o_n = start + tl.arange(0, TILE_N)
    m_n = o_n < hi
    acc = tl.zeros([o_m.shape[0], TILE_N], qn.dtype)
    for k in range(0, d, TILE_D):
        o_d = k + tl.arange(0, TILE_D)
        m_d = o_d < d
        b_q = tl.load(
            q_ptr + o_m[:, None] * d + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0
        )
        b_y = tl.load(
            db_ptr + o_n[:, None] * d + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0
        )
        acc = tl.dot(b_q, tl.trans(b_y), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    dn = tl.load(dn_ptr + o_n, mask=m_n, other=0.0)
    r = (qn[:, None] + dn[None, :]) - 2.0 * acc
    r = tl.where(r != r, float("inf"), r)  # NaN only from inf - inf: overflow, taken as far
    return r, o_n.to(tl.int32), m_m[:, None] & m_n[None, :]


@triton.jit
def _keys(r, rows, valid):
    """int64 keys ordered as (r, row): order-preserving float bits above, the row below."""
    r = tl.where(r == 0.0, 0.0, r)  # -0.0 -> +0.0: equal scores tie on the row
    bits = r.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (ordered.to(tl.int64) << 32) | rows.to(tl.int64)
    return tl.where(valid, key, _EMPTY)


@triton.jit
def _unkey(key):
    """(score, row int64) of keys; the empty key gives (+inf, int64 max)."""
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    empty = key == _EMPTY
    score = tl.where(empty, float("inf"), bits.to(tl.float32, bitcast=True))
    return score, tl.where(empty, _EMPTY, key - ((key >> 32) << 32))


@triton.jit
def _column(x, col, j, fill):
    """x[:, j] of a [rows, W] tile (col = arange(W)[None, :])."""
    return tl.min(tl.where(col == j, x, fill), axis=1)


# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _knn_keys_kernel(
    q_ptr,  # [n, d] float32 queries
    db_ptr,  # [m, d] float32 database rows
    qn_ptr,  # [n] their squared norms
    dn_ptr,  # [m]
    score_ptr,  # [splits, n, COUNT] float32 out
    index_ptr,  # [splits, n, COUNT] int64 out
    n, m, d,
    split_rows,  # database rows per split, a multiple of TILE_N
    COUNT: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
    TILE_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    o_m = pid_m * TILE_M + tl.arange(0, TILE_M)
    m_m = o_m < n
    qn = tl.load(qn_ptr + o_m, mask=m_m, other=0.0)
    lo = split * split_rows
    hi = tl.minimum(lo + split_rows, m)
    col = tl.arange(0, TILE_N)[None, :]
    run = tl.full([TILE_M, TILE_N], _EMPTY, tl.int64)  # ascending; first COUNT exact
    bar = tl.full([TILE_M], _EMPTY, tl.int64)  # the COUNT-th key of each row
    for start in range(lo, hi, TILE_N):
        r, rows, valid = _tile_scores(
            q_ptr, db_ptr, qn, dn_ptr, o_m, m_m, start, hi, d, TILE_N, TILE_D, PRECISION
        )
        key = _keys(r, rows[None, :], valid)
        if tl.max((key < bar[:, None]).to(tl.int32)) > 0:
            both = tl.reshape(tl.join(run, key), [TILE_M, 2 * TILE_N])
            # ~ reverses the order: topk's W largest of ~key are the W smallest keys, ascending
            run = ~tl.topk(~both, TILE_N)
            bar = _column(run, col, COUNT - 1, _EMPTY)
    score, row = _unkey(run)
    p_out = (split * n + o_m[:, None]) * COUNT + col
    m_out = m_m[:, None] & (col < COUNT)
    tl.store(score_ptr + p_out, score, mask=m_out)
    tl.store(index_ptr + p_out, row, mask=m_out)


@triton.jit
def _knn_pairs_kernel(
    q_ptr, db_ptr, qn_ptr, dn_ptr, score_ptr, index_ptr,  # as _knn_keys_kernel, float64
    n, m, d, split_rows,
    COUNT: tl.constexpr, WIDTH: tl.constexpr,  # WIDTH: COUNT rounded up to a power of two
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    o_m = pid_m * TILE_M + tl.arange(0, TILE_M)
    m_m = o_m < n
    qn = tl.load(qn_ptr + o_m, mask=m_m, other=0.0)
    lo = split * split_rows
    hi = tl.minimum(lo + split_rows, m)
    col = tl.arange(0, WIDTH)[None, :]
    run_s = tl.full([TILE_M, WIDTH], float("inf"), qn.dtype)
    run_i = tl.full([TILE_M, WIDTH], _NO_ROW, tl.int32)
    bar_s = tl.full([TILE_M], float("inf"), qn.dtype)
    bar_i = tl.full([TILE_M], _NO_ROW, tl.int32)
    for start in range(lo, hi, TILE_N):
        r, rows, valid = _tile_scores(
            q_ptr, db_ptr, qn, dn_ptr, o_m, m_m, start, hi, d, TILE_N, TILE_D, PRECISION
        )
        r = tl.where(r == 0.0, 0.0, r)
        t_i = tl.where(valid, rows[None, :], _NO_ROW)
        t_s = tl.where(valid, r, float("inf"))
        beats = (t_s < bar_s[:, None]) | ((t_s == bar_s[:, None]) & (t_i < bar_i[:, None]))
        if tl.max(beats.to(tl.int32)) > 0:
            new_s = tl.full([TILE_M, WIDTH], float("inf"), qn.dtype)
            new_i = tl.full([TILE_M, WIDTH], _NO_ROW, tl.int32)
            for j in range(COUNT):
                s_a = tl.min(run_s, axis=1)
                i_a = tl.min(tl.where(run_s == s_a[:, None], run_i, _NO_ROW), axis=1)
                s_b = tl.min(t_s, axis=1)
                i_b = tl.min(tl.where(t_s == s_b[:, None], t_i, _NO_ROW), axis=1)
                take_a = (s_a < s_b) | ((s_a == s_b) & (i_a < i_b))
                s = tl.where(take_a, s_a, s_b)
                i = tl.where(take_a, i_a, i_b)
                new_s = tl.where(col == j, s[:, None], new_s)
                new_i = tl.where(col == j, i[:, None], new_i)
                # rows are unique: mask the one taken (an empty slot stays empty)
                gone_a = run_i == i[:, None]
                run_s = tl.where(gone_a, float("inf"), run_s)
                run_i = tl.where(gone_a, _NO_ROW, run_i)
                gone_b = t_i == i[:, None]
                t_s = tl.where(gone_b, float("inf"), t_s)
                t_i = tl.where(gone_b, _NO_ROW, t_i)
            run_s, run_i = new_s, new_i
            bar_s = _column(run_s, col, COUNT - 1, float("inf"))
            bar_i = _column(run_i, col, COUNT - 1, _NO_ROW)
    p_out = (split * n + o_m[:, None]) * COUNT + col
    m_out = m_m[:, None] & (col < COUNT)
    row = tl.where(run_i == _NO_ROW, _EMPTY, run_i.to(tl.int64))
    tl.store(score_ptr + p_out, run_s, mask=m_out)
    tl.store(index_ptr + p_out, row, mask=m_out)


# ---- launcher --------------------------------------------------------------------------------


def _tiles(count: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Tile sizes and warps. float32: TILE_N is the list width W (64 or 128 on a GPU); float64:
    a narrower tile, the list rounded up to a power of two. The interpreter gets the smallest
    tiles that hold the list (its topk costs seconds at 64 x 256)."""
    width = max(16, triton.next_power_of_2(count))
    if dtype == torch.float64:
        return dict(TILE_M=32, TILE_N=32, TILE_D=16, WIDTH=width, num_warps=8)
    if device.type != "cuda":
        return dict(TILE_M=16, TILE_N=width, TILE_D=16, num_warps=4)
    # sm_90 builds without spills (ptxas -v): 64 x 64 at 8 warps (wgmma, 240 registers);
    # 64 x 128 spills at 8 or 16 warps, 32 x 128 does not (mma.sync, 255 registers).
    if width <= 64:
        return dict(TILE_M=64, TILE_N=64, TILE_D=32, num_warps=8)
    return dict(TILE_M=32, TILE_N=128, TILE_D=32, num_warps=8)


def _splits(n: int, m: int, tile_m: int, tile_n: int, device: torch.device) -> int:
    """Database splits: enough programs for two waves over the SMs when the queries alone
    give fewer, each split still at least 8 tiles long."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = _INTERPRETER_SMS
    query_tiles = triton.cdiv(n, tile_m)
    want = max(1, triton.cdiv(2 * sms, query_tiles))
    return max(1, min(want, m // (8 * tile_n)))


def _check(queries, database, query_sqnorms, database_sqnorms, count) -> None:
    for name, x in (("queries", queries), ("database", database)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 2-d tensor, got {_describe(x)}")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    if database.dtype != queries.dtype or database.device != queries.device:
        raise ValueError(
            f"database must match the queries' dtype and device ({queries.dtype}, "
            f"{queries.device}), got {database.dtype}, {database.device}"
        )
    n, d = queries.shape
    m = database.shape[0]
    if database.shape[1] != d or d == 0:
        raise ValueError(f"database must be [m, {d}] with d >= 1, got {list(database.shape)}")
    if m > _MAX_ROWS:
        raise ValueError(f"database must have fewer than 2^31 rows, got {m}")
    for name, x, rows in (
        ("query_sqnorms", query_sqnorms, n),
        ("database_sqnorms", database_sqnorms, m),
    ):
        if (
            not isinstance(x, torch.Tensor)
            or tuple(x.shape) != (rows,)
            or not x.is_contiguous()
            or x.dtype != queries.dtype
            or x.device != queries.device
        ):
            raise ValueError(
                f"{name} must be a contiguous [{rows}] {queries.dtype} tensor on "
                f"{queries.device}, got {_describe(x)}"
            )
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"count must be an int, got {type(count).__name__}")
    if not 1 <= count <= min(m, MAX_COUNT):
        raise ValueError(
            f"count must be in [1, min(m, MAX_COUNT)] = [1, {min(m, MAX_COUNT)}], got {count}"
        )


def _describe(x) -> str:
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return f"{list(x.shape)} {x.dtype} on {x.device} (contiguous: {x.is_contiguous()})"


def candidates(
    queries: torch.Tensor,
    database: torch.Tensor,
    query_sqnorms: torch.Tensor,
    database_sqnorms: torch.Tensor,
    count: int,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` smallest r_ij = qn_i + dn_j - 2 <q_i, y_j> of each query.

    Args:
        queries: ``[n, d]`` contiguous float32 (or float64) tensor.
        database: ``[m, d]`` contiguous, same dtype and device, m < 2^31.
        query_sqnorms, database_sqnorms: ``[n]``, ``[m]``, same dtype (the caller's).
        count: 1 <= count <= min(m, MAX_COUNT).
        splits: database splits (default: from n, m and the SM count); tests force it.

    Returns:
        ``(scores [n, count], indices [n, count] int64)``, each row ascending by (score,
        index): the true top-count of the computed scores, ties to the lower index. float32
        scores carry the tf32 rounding of the module docstring (``dot_unit``).
    """
    _check(queries, database, query_sqnorms, database_sqnorms, count)
    n, d = queries.shape
    m = database.shape[0]
    scores = torch.empty((n, count), dtype=queries.dtype, device=queries.device)
    indices = torch.empty((n, count), dtype=torch.int64, device=queries.device)
    if n == 0:
        return scores, indices
    cfg = _tiles(count, queries.dtype, queries.device)
    tm, tn = cfg["TILE_M"], cfg["TILE_N"]
    if splits is None:
        splits = _splits(n, m, tm, tn, queries.device)
    split_rows = triton.cdiv(triton.cdiv(m, max(1, splits)), tn) * tn
    splits = triton.cdiv(m, split_rows)
    if splits > 1:
        scores = torch.empty((splits, n, count), dtype=queries.dtype, device=queries.device)
        indices = torch.empty((splits, n, count), dtype=torch.int64, device=queries.device)
    grid = (triton.cdiv(n, tm), splits)
    if queries.dtype == torch.float64:
        kernel, precision = _knn_pairs_kernel, "ieee"
    else:
        kernel, precision = _knn_keys_kernel, "tf32"
    kernel[grid](
        queries,
        database,
        query_sqnorms,
        database_sqnorms,
        scores,
        indices,
        n,
        m,
        d,
        split_rows,
        COUNT=count,
        PRECISION=precision,
        enable_fp_fusion=False,
        **cfg,
    )
    if splits == 1:
        return scores, indices
    return _merge_splits(scores, indices, count)


def _merge_splits(
    scores: torch.Tensor, indices: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The count best of each query's splits x count entries, by (score, index): a stable
    sort on the index, then on the score (read and write n splits count, small)."""
    splits, n, _ = scores.shape
    s = scores.permute(1, 0, 2).reshape(n, splits * count)
    i = indices.permute(1, 0, 2).reshape(n, splits * count)
    order = torch.argsort(i, dim=1, stable=True)
    s, i = s.gather(1, order), i.gather(1, order)
    order = torch.argsort(s, dim=1, stable=True)[:, :count]
    return s.gather(1, order).contiguous(), i.gather(1, order).contiguous()
