"""debias.knn against the float64 brute force (debias.reference.knn) on data built to break the
fast pass: duplicates, ties, near-duplicates, a large common offset, tiny and odd dimensions,
streamed and memory-mapped databases."""

import sys

import numpy as np
import pytest
import torch
from conftest import CPU, skip_unless_backend

import debias
from debias import reference
from debias.ops import knn as knn_ops

KNN_BACKENDS = ("torch", "cpu", "triton")
METRICS = ("l2", "cosine", "standardized")


@pytest.fixture(params=KNN_BACKENDS)
def backend(request):
    if request.param not in knn_ops.supported_backends(CPU):
        pytest.skip(f"backend {request.param!r} has no knn kernel in this build")
    return request.param


def _check(queries, database, k, metric="l2", backend=None, **kwargs):
    got_d, got_i = debias.knn(queries, database, k, metric, backend=backend, **kwargs)
    want_d, want_i = reference.knn(queries, database, k, metric)
    assert got_i.dtype == torch.int64 and got_d.dtype == torch.float64
    assert torch.equal(got_i, want_i), (got_i, want_i)
    torch.testing.assert_close(got_d, want_d, rtol=1e-12, atol=1e-12)
    return got_d, got_i


def _hard(n, m, d, seed=0, offset=0.0):
    """Random data plus exact duplicates, a query copied into the database, a near-duplicate
    one ulp away and an exact tie (two points at the same distance)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g) + offset
    db = torch.randn(m, d, generator=g) + offset
    db[m // 2] = db[1]  # duplicate rows: the lower index comes first
    db[m - 1] = q[0]  # a query's exact copy, last in the database
    db[2] = torch.nextafter(q[1], torch.full_like(q[1], np.inf))  # one ulp from a query
    db[3] = 2 * q[2] - db[4]  # db[3] and db[4] mirror each other about q[2]: a tie (l2)
    return q, db


_SHAPES = [(7, 50, 3, 3), (5, 301, 33, 5), (9, 40, 1, 4), (4, 129, 17, 1), (3, 25, 6, 25)]


# One value per sample (d = 1) has no direction for cosine or standardized to compare.
@pytest.mark.parametrize(
    "metric, n, m, d, k",
    [(metric, *shape) for metric in METRICS for shape in _SHAPES if metric == "l2" or shape[2] > 1],
)
def test_matches_float64_brute_force(backend, metric, n, m, d, k):
    q, db = _hard(n, m, d)
    if metric == "standardized":
        q, db = q.view(n, 1, d), db.view(m, 1, d)
    _check(q, db, k, metric, backend)


def test_large_common_offset_breaks_the_expansion_not_the_answer(backend):
    """||x||^2 + ||y||^2 - 2 x.y at an offset of 1e4 cancels catastrophically in float32."""
    q, db = _hard(16, 400, 24, offset=1e4)
    dist, _ = _check(q, db, 6, backend=backend)
    assert (dist >= 0).all()
    naive = (q.square().sum(1)[:, None] + db.square().sum(1)[None] - 2 * q @ db.T).clamp(min=0)
    naive_i = naive.sqrt().topk(6, largest=False).indices
    assert not torch.equal(naive_i, reference.knn(q, db, 6)[1])  # the naive pass does fail


def test_many_exact_duplicates_fall_back_to_the_exhaustive_search(backend):
    """More copies of the nearest point than the fast pass keeps candidates: the bound cannot
    separate them, so the query is searched exhaustively; the lowest indices win."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 8, generator=g)
    db = torch.randn(200, 8, generator=g)
    db[50:90] = q[0]
    d, i = _check(q, db, 2, backend=backend)
    assert i[0].tolist() == [50, 51] and d[0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("k", [1, 7, 96])
def test_streamed_chunks_equal_one_tensor(backend, monkeypatch, k):
    """Chunks of a few rows (the chunk size forced down) and an iterable of uneven chunks."""
    q, db = _hard(6, 96, 10)
    monkeypatch.setattr(knn_ops, "_CHUNK_BYTES", 8 * 10 * 13)  # 13 rows per chunk
    _check(q, db, k, backend=backend)
    pieces = [db[:5], db[5:5], db[5:60], db[60:]]
    got = debias.knn(q, iter(pieces), k, backend=backend)
    want = reference.knn(q, db, k)
    assert torch.equal(got[1], want[1])


def test_memory_mapped_npy(backend, tmp_path, monkeypatch):
    q, db = _hard(5, 70, 12)
    path = tmp_path / "train.npy"
    np.save(path, db.numpy())
    monkeypatch.setattr(knn_ops, "_CHUNK_BYTES", 8 * 12 * 16)
    got = debias.knn(q, str(path), 3, backend=backend)
    assert torch.equal(got[1], reference.knn(q, db, 3)[1])
    assert torch.equal(debias.knn(q, path, 3, backend=backend)[1], got[1])  # a Path works too


def test_low_precision_and_float64_inputs(backend):
    q, db = _hard(6, 80, 9)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        _check(q.to(dtype), db.to(dtype), 4, backend=backend)


def test_exclude_self(backend):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, generator=g)
    x[7] = x[30]  # a duplicate pair: each finds the other at distance 0
    d, i = debias.knn(x, x, 3, exclude_self=True, backend=backend)
    assert not (i == torch.arange(40)[:, None]).any()
    assert i[7, 0] == 30 and i[30, 0] == 7 and d[7, 0] == 0
    _, full_i = reference.knn(x, x, 4)
    for row in range(40):
        keep = full_i[row] != row
        assert torch.equal(i[row], full_i[row][keep][:3])
    x[:5] = x[5]  # six copies: row 0's own index is among the first k + 1, row 5's is not
    d, i = debias.knn(x, x, 2, exclude_self=True, backend=backend)
    assert i[0].tolist() == [1, 2] and i[5].tolist() == [0, 1]


def test_repeatable_and_independent_of_threads(backend):
    q, db = _hard(12, 300, 24)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = debias.knn(q, db, 5, backend=backend)
        torch.set_num_threads(2)
        two = debias.knn(q, db, 5, backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


# ---- the int8 pass (cpu backend) ----------------------------------------------------------


@pytest.fixture
def int8(monkeypatch):
    """DEBIAS_KNN_FAST=int8 for one test, on any CPU where the kernel is built and torch._int_mm
    is exact; a spy counts the chunks the int8 pass searched (None: sent to the float32 pass)."""
    if "cpu" not in knn_ops.supported_backends(CPU):
        pytest.skip("this build has no knn_candidates kernel")
    if not knn_ops._backend.has_kernel("knn_candidates_int8", "CPU"):
        pytest.skip("this build has no knn_candidates_int8 kernel")
    if not knn_ops._int_mm_exact():
        pytest.skip("torch._int_mm is not exact on this CPU: the int8 pass is never used")
    monkeypatch.setenv("DEBIAS_KNN_FAST", "int8")
    chunks = {"int8": 0, "float32": 0}
    original = knn_ops._Search._candidates_int8

    def spy(self, db, count):
        out = original(self, db, count)
        chunks["int8" if out is not None else "float32"] += 1
        return out

    monkeypatch.setattr(knn_ops._Search, "_candidates_int8", spy)
    return chunks


def _gauss(n, m, d, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + offset, torch.randn(m, d, generator=g) + offset


# n, m, d, k: odd d; k = 1, and k = m (no fast pass: every row is a candidate); (70, 8500, 7):
# two query chunks of the kernel (64 + 6) and two database tiles (8192 + 308).
_INT8_SHAPES = [
    (5, 301, 1, 3),
    (7, 123, 7, 1),
    (9, 250, 33, 5),
    (4, 77, 130, 77),
    (3, 40, 130, 40),
    (70, 8500, 7, 4),
]


@pytest.mark.parametrize(
    "n, m, d, k", [pytest.param(*c, id="n{}-m{}-d{}-k{}".format(*c)) for c in _INT8_SHAPES]
)
def test_int8_pass_gaussian_and_hard_data(int8, n, m, d, k):
    _check(*_gauss(n, m, d), k, backend="cpu")
    if m >= 8:
        _check(*_hard(n, m, d, seed=1), k, backend="cpu")  # duplicates, one ulp, a tie
    fast = k + max(k, knn_ops._MARGIN) < m  # else every row is a candidate: no fast pass
    assert (int8["int8"] >= 1) == fast and int8["float32"] == 0


def test_int8_pass_large_offset_and_duplicates(int8):
    q, db = _hard(16, 400, 24, offset=1e4)
    _check(q, db, 6, backend="cpu")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 8, generator=g)
    db = torch.randn(200, 8, generator=g)
    db[50:90] = q[0]  # 40 copies: more than the candidates kept, the exhaustive search decides
    d, i = _check(q, db, 2, backend="cpu")
    assert i[0].tolist() == [50, 51] and d[0].tolist() == [0.0, 0.0]
    assert int8["int8"] == 2


def test_int8_pass_huge_coordinate_falls_back_exactly(int8, monkeypatch):
    """Rows with one huge coordinate and tiny others: each row's scale is set by the huge one,
    the tiny ones quantise to 0, and the bound is far wider than the differences between the
    rows. The bound must send the queries to the exhaustive search, not return wrong rows."""
    g = torch.Generator().manual_seed(5)
    q, db = torch.randn(6, 40, generator=g) * 1e-3, torch.randn(300, 40, generator=g) * 1e-3
    q[:, 0] += 1e4
    db[:, 0] += 1e4
    db[::7, 3] = 1e5  # and some rows far larger still: the chunk's largest scale
    exhaustive = []
    original = knn_ops._Search._exhaustive
    monkeypatch.setattr(
        knn_ops._Search, "_exhaustive", lambda s, r, x: exhaustive.append(r) or original(s, r, x)
    )
    _check(q, db, 3, backend="cpu")
    assert int8["int8"] == 1 and len(exhaustive) > 0


def test_int8_pass_zero_rows_and_a_single_query(int8):
    """A single query is its own centre (all codes 0, scale 0); zero rows in the database."""
    q, db = _gauss(1, 90, 17)
    _check(q, db, 5, backend="cpu")
    q, db = _gauss(5, 90, 17)
    db[[3, 40]] = 0.0
    db[7] = q.mean(0)  # zero after centring
    _check(q, db, 4, backend="cpu")
    assert int8["int8"] == 2


@pytest.mark.parametrize("metric", ["cosine", "standardized"])
def test_int8_pass_other_metrics(int8, metric):
    q, db = _hard(7, 301, 33)
    if metric == "standardized":
        q, db = q.view(7, 3, 11), db.view(301, 3, 11)
    _check(q, db, 5, metric, backend="cpu")
    assert int8["int8"] == 1


def test_int8_pass_low_precision_and_float64_inputs(int8):
    """bfloat16 / float16 data: the int8 pass (their float32 values are exact). float64 data
    keeps its float64 pass: int8 codes could only add error to it. float32 queries against a
    float64 database: the int8 pass, the database's float64 difference rounded once."""
    q, db = _hard(6, 80, 9)
    for dtype in (torch.bfloat16, torch.float16):
        _check(q.to(dtype), db.to(dtype), 4, backend="cpu")
    assert int8["int8"] == 2
    _check(q.double(), db.double(), 4, backend="cpu")
    assert int8["int8"] == 2 and not knn_ops._use_int8("cpu", torch.float64, 9)
    _check(q, db.double(), 4, backend="cpu")
    assert int8["int8"] == 3


@pytest.mark.parametrize("k", [1, 7, 96])
def test_int8_pass_streamed_chunks(int8, monkeypatch, k):
    q, db = _hard(6, 96, 10)
    monkeypatch.setattr(knn_ops, "_CHUNK_BYTES", 2 * 10 * 20)  # 20 rows of codes per chunk
    _check(q, db, k, backend="cpu")
    pieces = [db[:5].double(), db[5:5], db[5:60].numpy(), db[60:]]  # 55 numpy rows: 2 chunks
    got = debias.knn(q, iter(pieces), k, backend="cpu")
    assert torch.equal(got[1], reference.knn(q, db, k)[1])
    if k + max(k, knn_ops._MARGIN) < 20:  # else every row of a chunk is a candidate
        assert int8["int8"] >= 5 + 2


def test_int8_pass_exclude_self_and_threads(int8):
    x, _ = _gauss(40, 1, 5)
    x[7] = x[30]
    _, i = debias.knn(x, x, 3, exclude_self=True, backend="cpu")
    _, full_i = reference.knn(x, x, 4)
    for row in range(40):
        assert torch.equal(i[row], full_i[row][full_i[row] != row][:3])
    q, db = _hard(12, 300, 24)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = debias.knn(q, db, 5, backend="cpu")
        torch.set_num_threads(2)
        two = debias.knn(q, db, 5, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def _bound_cases():
    """(name, queries, database) float32: random, and vectors built against the bound."""
    g = torch.Generator().manual_seed(7)
    cases = [(f"gauss-d{d}", *_gauss(9, 60, d, seed=d)) for d in (2, 7, 130, 1000)]
    x = torch.randn(20, 64, generator=g)
    cases.append(("equal-rows", x, x.clone()))  # l_a = l_b: the lo . lo term at its largest
    spike = torch.randn(20, 64, generator=g)
    spike[:, 0] = 1e3 + torch.rand(20, generator=g)
    cases.append(("one-huge-coordinate", spike[:10], spike[10:]))
    s = 2.0**-3  # coordinates halfway between two codes (X rounds half to even) and at 127 s
    half = (torch.randint(-32000, 32000, (20, 33), generator=g) + 0.5) * s / 256
    half[:, 0] = 127 * s
    cases.append(("halfway-codes", half[:10], -half[10:]))
    # magnitudes 1e-12 .. 1e10 within a row, every row's scale within the kernel's 2^+-40
    mixed = torch.randn(20, 16, generator=g) * torch.logspace(-12, 10, 16)
    cases.append(("mixed-magnitudes", mixed[:10], mixed[10:]))
    return cases


@pytest.mark.parametrize("case", _bound_cases(), ids=lambda c: c[0])
def test_int8_dot_bound_holds_for_every_pair(int8, case):
    """|a . b - s_a s_b (G1 + G2 / 256)| <= _int8_dot_error for every pair, the codes from
    knn_quantize, G1 and G2 in int64 and the truth in float64 (float32 values: exact products,
    and a float64 summation error of at most d 2^-53 sum |a_k b_k|, allowed for)."""
    name, a, b = case
    d = a.shape[1]
    quantize = torch.ops.debias_C.knn_quantize
    codes_a = torch.empty(a.shape[0], 2 * d, dtype=torch.int8)
    codes_b = torch.empty(b.shape[0], 2 * d, dtype=torch.int8)
    zero = torch.zeros(d)
    stats_a = quantize(a.contiguous(), zero, False, codes_a)  # [h | l]
    stats_b = quantize(b.contiguous(), zero, True, codes_b)  # [l | h]
    assert bool(torch.isfinite(stats_a).all() and torch.isfinite(stats_b).all())
    h_a, l_a = codes_a[:, :d].long(), codes_a[:, d:].long()
    l_b, h_b = codes_b[:, :d].long(), codes_b[:, d:].long()
    assert int(h_a.abs().max()) <= 127 and int(l_a.min()) >= -128 and int(l_a.max()) <= 127
    scale_a, scale_b = stats_a[:, 1], stats_b[:, 1]
    # the codes: |a - s (h + l / 256)| <= s / 512 coordinate by coordinate, exactly in float64
    approx_a = scale_a[:, None] * (h_a + l_a / 256.0)
    assert bool(((a.double() - approx_a).abs() <= scale_a[:, None] / 512).all())
    g1 = (h_a @ h_b.T).double()
    g2 = (h_a @ l_b.T + l_a @ h_b.T).double()
    approx = scale_a[:, None] * scale_b[None, :] * (g1 + g2 / 256)
    truth = a.double() @ b.double().T
    slack = d * 2.0**-53 * (a.double().abs() @ b.double().abs().T)
    terms_a = [t[:, None] for t in knn_ops._int8_terms(stats_a)]
    terms_b = [t[None, :] for t in knn_ops._int8_terms(stats_b)]
    bound = knn_ops._int8_dot_error(terms_a, terms_b, d)
    assert bool(((truth - approx).abs() <= bound + slack).all())
    if name.startswith("gauss") or name == "equal-rows":  # and not loose beyond reason
        assert float(((truth - approx).abs() / bound).max()) > 0.01


def test_int8_codes_mark_rows_out_of_range(int8):
    """A row whose scale would leave 2^-40 .. 2^40, or with a NaN, gets scale NaN and zero
    codes: its chunk goes to the float32 pass, which still answers exactly."""
    x = torch.randn(4, 5)
    x[1, 2], x[2, 0], x[3] = 1e30, float("nan"), 0.0
    codes = torch.full((4, 10), 7, dtype=torch.int8)
    stats = torch.ops.debias_C.knn_quantize(x, torch.zeros(5), False, codes)
    assert stats[:, 1].isnan().tolist() == [False, True, True, False]
    assert stats[3].tolist() == [0.0, 0.0, 0.0] and not codes[1:].any()
    q, db = _gauss(6, 90, 5)
    db[40, 1] = 1e30
    _check(q, db, 3, backend="cpu")
    assert int8 == {"int8": 0, "float32": 1}


def test_int8_distance_bounds_hold_for_every_pair(int8):
    """The kernel's scores of every pair (count = m), turned into distance bounds: every float64
    brute-force distance lies within its pair's [low, high]."""
    for q, db in (_hard(8, 200, 33, offset=50.0), _gauss(5, 150, 300)):
        search = knn_ops._Search(q, "l2", 3, "cpu")
        assert search.int8
        low, high, cand = search._candidates_int8(db, db.shape[0])
        want = reference.knn_distance(search.exact[:, None, :], db.double()[cand], "l2")
        assert bool(((low <= want) & (want <= high)).all())
        # and tight: the squared distances' interval (the sqrt widens it near 0)
        assert float((high.square() - low.square()).max()) < 1e-2 * float(want.median()) ** 2


def test_int8_kernel_scores_match_their_definition(int8):
    """knn_candidates_int8: the k smallest r_ij = (qn_i + yn_j) - qs_i (ys_j (G1 + G2 / 256)) in
    float32, left to right, ordered by (r, j), against the same arithmetic in torch."""
    q, db = _gauss(40, 500, 33)
    zero = torch.zeros(33)
    codes_q = torch.empty(40, 66, dtype=torch.int8)
    codes_db = torch.empty(500, 66, dtype=torch.int8)
    stats_q = torch.ops.debias_C.knn_quantize(q, zero, False, codes_q)
    stats_db = torch.ops.debias_C.knn_quantize(db, zero, True, codes_db)
    qn, yn = stats_q[:, 0].float(), stats_db[:, 0].float()
    qs, ys = (2 * stats_q[:, 1]).float(), stats_db[:, 1].float()
    g1 = codes_q[:, :33].long() @ codes_db[:, 33:].long().T
    g2 = codes_q.long() @ codes_db.long().T
    r = (qn[:, None] + yn[None, :]) - qs[:, None] * (ys[None, :] * (g1.float() + g2.float() / 256))
    order = torch.argsort(r, dim=1, stable=True)
    for k in (1, 9, 40):  # sorted insertion, and the buffer above 32
        score, index = torch.ops.debias_C.knn_candidates_int8(codes_q, codes_db, qn, yn, qs, ys, k)
        assert torch.equal(index, order[:, :k]) and torch.equal(score, r.gather(1, order[:, :k]))


def test_fast_pass_choice_from_the_environment(monkeypatch):
    monkeypatch.setenv("DEBIAS_KNN_FAST", "float32")
    assert not knn_ops._use_int8("cpu", torch.float32, 3072)
    monkeypatch.setenv("DEBIAS_KNN_FAST", "int16")
    with pytest.raises(ValueError, match="DEBIAS_KNN_FAST must be one of"):
        debias.knn(torch.randn(3, 4), torch.randn(5, 4), 1)
    monkeypatch.setenv("DEBIAS_KNN_FAST", "int8")
    for backend in ("torch", "triton", "cuda"):  # the int8 pass is the cpu kernel's
        assert not knn_ops._use_int8(backend, torch.float32, 64)
    assert not knn_ops._use_int8("cpu", torch.float32, 2**16 + 1)  # int32 sums could overflow
    monkeypatch.setenv("DEBIAS_KNN_FAST", "auto")
    assert not knn_ops._use_int8("cpu", torch.float32, knn_ops._INT8_MIN_D - 1)


# ---- bad input ----------------------------------------------------------------------------


def _bad_cases():
    q, db = torch.randn(4, 6), torch.randn(10, 6)
    nan_db = db.clone()
    nan_db[3, 2] = float("nan")
    inf_q = q.clone()
    inf_q[1, 0] = float("inf")
    return [
        ("dim-mismatch", dict(queries=q, database=torch.randn(10, 7), k=2), ValueError, "database"),
        ("k-zero", dict(queries=q, database=db, k=0), ValueError, "k must be at least 1"),
        ("k-too-big", dict(queries=q, database=db, k=11), ValueError, "k must be at most"),
        (
            "k-too-big-stream",
            dict(queries=q, database=iter([db[:5], db[5:]]), k=11),
            ValueError,
            "k must be at most",
        ),
        ("k-float", dict(queries=q, database=db, k=2.0), TypeError, "k must be an int"),
        ("empty-queries", dict(queries=q[:0], database=db, k=1), ValueError, "queries"),
        ("empty-database", dict(queries=q, database=iter([]), k=1), ValueError, "database"),
        ("nan-database", dict(queries=q, database=nan_db, k=2), ValueError, "database row 3"),
        ("inf-queries", dict(queries=inf_q, database=db, k=2), ValueError, "queries row 1"),
        ("int-database", dict(queries=q, database=db.long(), k=2), TypeError, "database"),
        ("int-queries", dict(queries=q.long(), database=db, k=2), TypeError, "queries"),
        ("numpy-queries", dict(queries=q.numpy(), database=db, k=2), TypeError, "queries"),
        ("0d-database", dict(queries=q, database=torch.tensor(1.0), k=2), ValueError, "database"),
        ("1d-database", dict(queries=q, database=torch.randn(10), k=2), ValueError, "database"),
        ("meta-queries", dict(queries=q.to("meta"), database=db, k=2), ValueError, "queries"),
        ("meta-database", dict(queries=q, database=db.to("meta"), k=2), ValueError, "database"),
        ("metric", dict(queries=q, database=db, k=2, metric="l1"), ValueError, "metric"),
        (
            "zero-vector-cosine",
            dict(queries=q, database=torch.zeros(3, 6), k=1, metric="cosine"),
            ValueError,
            "database row 0 is zero",
        ),
        (
            "constant-standardized",
            dict(
                queries=torch.ones(2, 1, 6),
                database=torch.randn(3, 1, 6),
                k=1,
                metric="standardized",
            ),
            ValueError,
            "queries row 0",
        ),
        ("not-npy", dict(queries=q, database="train.txt", k=1), ValueError, ".npy"),
        ("bad-source", dict(queries=q, database=3, k=1), TypeError, "database"),
        (
            "exclude-self-other",
            dict(queries=q, database=db, k=2, exclude_self=True),
            ValueError,
            "exclude_self",
        ),
        ("backend", dict(queries=q, database=db, k=2, backend="cuda"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_rejects_bad_input(case):
    _, kwargs, err, match = case
    with pytest.raises(err, match=match):
        debias.knn(**kwargs)


def test_environment_backend_without_a_knn_kernel_is_ignored(monkeypatch):
    """DEBIAS_BACKEND is process-wide: a backend that knn has no kernel for on this device
    (cuda, for CPU tensors) leaves knn on its default instead of failing."""
    monkeypatch.setenv("DEBIAS_BACKEND", "cuda")
    q, db = _hard(3, 30, 4)
    assert torch.equal(debias.knn(q, db, 2)[1], reference.knn(q, db, 2)[1])


def test_cpu_backend_is_the_default_when_built():
    skip_unless_backend("cpu")
    if "cpu" not in knn_ops.supported_backends(CPU):
        pytest.skip("this build has no knn_candidates kernel")
    from debias.ops import _backend

    assert _backend.resolve(None, CPU, supported=knn_ops.supported_backends(CPU)) == "cpu"


# ---- several processes --------------------------------------------------------------------

_SHARD_WORKER = r"""
import os, sys
import torch
import torch.distributed as dist
import debias

rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=sys.argv[4], rank=rank, world_size=world)
data = torch.load(sys.argv[5])
q, db = data["queries"], data["database"]
bounds = data["bounds"]
shard = db[bounds[rank]:bounds[rank + 1]]
# rank 1 streams its shard in pieces: the shards need not share a source type
source = shard if rank == 0 else iter(shard.split(7))
result = {
    "plain": debias.knn(q, source, 5, sharded=True),
    "self": debias.knn(db, db[bounds[rank]:bounds[rank + 1]], 3, sharded=True,
                       exclude_self=True),
}
torch.save(result, f"{out}.{rank}")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("bounds", [[0, 37, 90], [0, 3, 90]], ids=["even", "short-shard"])
def test_sharded_over_two_processes_with_gloo(tmp_path, bounds):
    """Two ranks, each holding a shard (the second one streamed, and in one case shorter
    than k): both get the whole database's answer."""
    import subprocess
    import sys

    q, db = _hard(6, 90, 8)
    db[60] = db[2]  # a duplicate across the shards: the lower (rank 0) index wins
    data = tmp_path / "data.pt"
    torch.save({"queries": q, "database": db, "bounds": bounds}, data)
    script = tmp_path / "worker.py"
    script.write_text(_SHARD_WORKER)
    out = tmp_path / "result"
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", str(out), init, str(data)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    want = reference.knn(q, db, 5)
    full_i = reference.knn(db, db, 4)[1]
    for r in range(2):
        got = torch.load(f"{out}.{r}")
        assert torch.equal(got["plain"][1], want[1])
        torch.testing.assert_close(got["plain"][0], want[0], rtol=1e-12, atol=1e-12)
        for row in range(db.shape[0]):
            keep = full_i[row] != row
            assert torch.equal(got["self"][1][row], full_i[row][keep][:3])


def test_sharded_needs_torch_distributed():
    q, db = _hard(3, 20, 4)
    with pytest.raises(ValueError, match=r"sharded=True needs torch\.distributed"):
        debias.knn(q, db, 2, sharded=True)


def test_reduced_precision_products_widen_the_bound(backend):
    """With float32 products allowed to round their inputs (TF32 / bf16), the bound widens
    and the answer stays exact."""
    q, db = _hard(8, 300, 40, offset=3.0)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        if backend != "triton":
            assert knn_ops._dot_unit(backend, torch.float32, 40) == 2.0**-7
        _check(q, db, 4, backend=backend)
    finally:
        torch.set_float32_matmul_precision(previous)
    if backend == "triton":  # TF32 tensor cores whatever torch's setting: the kernel's bound
        assert knn_ops._dot_unit(backend, torch.float32, 40) == knn_ops._triton_knn().dot_unit(
            40, torch.float32
        )
    else:
        assert knn_ops._dot_unit(backend, torch.float32, 40) == 0.0


# ---- the Triton kernel


def _triton_knn():
    """debias.triton_kernels.knn and the device it runs on: a GPU, or the interpreter on CPU
    (TRITON_INTERPRET, set by conftest); a skip otherwise."""
    from debias.ops import _backend

    if torch.cuda.is_available() and _backend._triton():
        device = torch.device("cuda")
    elif _backend.triton_interpreted():
        device = CPU
    else:
        pytest.skip("Triton is not installed, or runs neither on a GPU nor in its interpreter")
    from debias.triton_kernels import knn as kernels

    return kernels, device


def _fast_scores(q, db, qn, dn):
    """The kernel's score r_ij = qn_i + dn_j - 2 q_i.y_j in float64, and its rows ordered by
    (r, j)."""
    r = (qn.double()[:, None] + dn.double()[None, :]) - 2 * (q.double() @ db.double().T)
    return r, torch.argsort(r, dim=1, stable=True)


def _small_ints(shape, seed, dtype, device):
    """Values in -3..3: every product, norm and score is exact in fp32 and tf32 (d < 50), and
    scores tie often."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).to(dtype).to(device)


_TRITON_EXACT = [
    # n, m, d, count, splits
    (5, 70, 3, 4, None),
    (3, 37, 1, 1, None),  # d = 1, count 1
    (4, 13, 7, 13, None),  # count = m
    (17, 50, 33, 16, None),  # odd d over two TILE_D slices, queries over two tiles
    (1, 300, 5, 9, 6),  # one query, the database in 6 splits merged
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "n, m, d, count, splits",
    [pytest.param(*c, id="n{}-m{}-d{}-c{}-s{}".format(*c)) for c in _TRITON_EXACT],
)
def test_triton_candidates_exact_on_small_integers(n, m, d, count, splits, dtype):
    """Exact scores: the list is the float64 order by (r, j), ties to the lower index; rows
    whose squared norm overflowed (+inf) come last, by index."""
    kernels, device = _triton_knn()
    q = _small_ints((n, d), 1, dtype, device)
    db = _small_ints((m, d), 2, dtype, device)
    qn, dn = q.square().sum(1), db.square().sum(1)
    dn[[0, m // 2]] = torch.inf
    score, index = kernels.candidates(q, db, qn, dn, count, splits=splits)
    r, order = _fast_scores(q.cpu(), db.cpu(), qn.cpu(), dn.cpu())
    assert index.dtype == torch.int64 and score.dtype == dtype
    assert torch.equal(index.cpu(), order[:, :count])
    assert torch.equal(score.cpu().double(), r.gather(1, order[:, :count]))


def test_triton_candidates_duplicate_rows_lower_index_first():
    """Copies of one row (and of a query) tie exactly: they come in index order, also across
    tiles and splits."""
    kernels, device = _triton_knn()
    g = torch.Generator().manual_seed(3)
    db = torch.randn(90, 6, generator=g)
    db[[7, 40, 41, 85]] = db[63].clone()
    q = torch.cat((db[63:64], torch.randn(2, 6, generator=g)))
    q, db = q.to(device), db.to(device)
    qn, dn = q.square().sum(1), db.square().sum(1)
    for splits in (1, 3):
        score, index = kernels.candidates(q, db, qn, dn, 6, splits=splits)
        assert index[0, :5].tolist() == [7, 40, 41, 63, 85]
        assert torch.equal(score[0, :5], score[0, :1].expand(5))
        s, i = score.cpu().double(), index.cpu()
        ordered = (s[:, 1:] > s[:, :-1]) | ((s[:, 1:] == s[:, :-1]) & (i[:, 1:] > i[:, :-1]))
        assert bool(ordered.all())


def test_triton_candidates_random_floats_within_the_rounding_bound():
    """Floats (tf32 products on a GPU): each score is within the documented bound of the
    float64 score of its row, and no row left out beats the list by more than twice that."""
    kernels, device = _triton_knn()
    n, m, d, count = 9, 201, 21, 5
    g = torch.Generator().manual_seed(4)
    q, db = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    qn, dn = q.square().sum(1), db.square().sum(1)
    score, index = kernels.candidates(
        q.to(device), db.to(device), qn.to(device), dn.to(device), count
    )
    score, index = score.cpu().double(), index.cpu()
    r, order = _fast_scores(q, db, qn, dn)
    u = 2.0**-24
    gamma = d * u / (1 - d * u)
    span = (qn.double().sqrt() + dn.double().sqrt().max())[:, None] ** 2
    tol = (kernels.dot_unit(d, torch.float32) + gamma + 4 * u) * 2 * span
    assert bool(((score - r.gather(1, index)).abs() <= tol).all())
    assert bool((r.gather(1, order[:, count - 1 : count]) >= score[:, -1:] - 2 * tol).all())
    assert kernels.dot_unit(d, torch.float64) == 0.0
    assert kernels.dot_unit(16000, torch.float32) <= kernels.DOT_UNIT


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(count=0), "count"),
        (dict(count=11), "count"),
        (dict(queries=torch.ones(3, 4, dtype=torch.float16)), "queries"),
        (dict(database=torch.ones(10, 5)), "database"),
        (dict(database=torch.ones(10, 4, dtype=torch.float64)), "database"),
        (dict(query_sqnorms=torch.ones(4)), "query_sqnorms"),
        (dict(database_sqnorms=torch.ones(10, dtype=torch.float64)), "database_sqnorms"),
        (dict(queries=torch.ones(4, 3).T), "queries"),
    ],
)
def test_triton_candidates_rejects_bad_input(change, match):
    kernels, _ = _triton_knn()
    args = dict(
        queries=torch.ones(3, 4),
        database=torch.ones(10, 4),
        query_sqnorms=torch.ones(3),
        database_sqnorms=torch.ones(10),
        count=2,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        kernels.candidates(**args)


def test_progress_bar_is_tqdm_on_request_only(monkeypatch, capsys):
    """progress=True draws tqdm's bar (imported then, not before); without tqdm it is an
    ImportError that says what to install, and progress=False never needs it."""
    q, db = torch.randn(4, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    expected = debias.knn(q, db, 2)
    for got in (debias.knn(q, db, 2, progress=True), debias.knn(q, [db[:5], db[5:]], 2)):
        torch.testing.assert_close(got, expected)
    assert "knn" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    torch.testing.assert_close(debias.knn(q, db, 2), expected)
    with pytest.raises(ImportError, match="pip install tqdm"):
        debias.knn(q, db, 2, progress=True)
