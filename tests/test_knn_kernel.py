"""The raw C++ op torch.ops.debias_C.knn_candidates (csrc/knn.cpp) against a brute force of the
score it states: r_ij = qn_i + yn_j - 2 <q_i, y_j>, the k smallest per query sorted by (r, j),
NaN ranked as +inf. debias.knn (tests/test_knn.py) tests the exact search built on it."""

import pytest
import torch
from conftest import run_avx2_and_portable

from debias.ops import _backend


def _op():
    if _backend.compiled() is None:
        return None
    try:
        return torch.ops.debias_C.knn_candidates
    except (AttributeError, RuntimeError):
        return None


pytestmark = pytest.mark.skipif(
    _op() is None, reason="debias._C is not built or has no knn_candidates op"
)

DTYPES = (torch.float32, torch.float64)
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64"}


def _knn(q, y, k, qn=None, yn=None):
    qn = (q * q).sum(1) if qn is None else qn
    yn = (y * y).sum(1) if yn is None else yn
    return _op()(q, y, qn, yn, k)


def _brute(q, y, k, qn=None, yn=None):
    """The same score in float64 from the same inputs, all m of them, then a stable sort."""
    q64, y64 = q.double(), y.double()
    qn = (q64 * q64).sum(1) if qn is None else qn.double()
    yn = (y64 * y64).sum(1) if yn is None else yn.double()
    r = (qn[:, None] + yn[None, :]) - 2 * (q64 @ y64.T)
    key = torch.where(r.isnan(), torch.inf, r)
    order = torch.sort(key, dim=1, stable=True).indices  # equal keys: lower index first
    return r.gather(1, order[:, :k]), order[:, :k]


def _ints(shape, seed, lo=-3, hi=4):
    """Small integers: every product and score is exact in float32 and float64, and ties are
    plentiful, so the selection can be compared bit for bit."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g)


# (n, m, d, k): odd sizes; m past one product tile (fp64 tiles are ~1.7k rows for n = 600);
# k on both sides of the sorted-insertion limit (32) and k = m.
CASES = [
    (1, 1, 1, 1),
    (1, 10, 2, 10),
    (3, 7, 1, 7),
    (7, 123, 5, 3),
    (33, 1023, 17, 1),
    (5, 300, 3, 300),
    (65, 2049, 7, 32),
    (65, 2049, 7, 33),
    (600, 4099, 3, 1),
    (600, 4099, 7, 5),
    (300, 5000, 1, 120),
    (130, 3001, 9, 3001),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=["n{}-m{}-d{}-k{}".format(*c) for c in CASES])
def test_exact_selection_on_integer_data(case, dtype):
    n, m, d, k = case
    q = _ints((n, d), 1).to(dtype)
    y = _ints((m, d), 2).to(dtype)
    r, idx = _knn(q, y, k)
    r_ref, idx_ref = _brute(q, y, k)
    assert r.dtype == dtype and idx.dtype == torch.int64
    assert r.shape == (n, k) and idx.shape == (n, k)
    assert torch.equal(idx, idx_ref)
    assert torch.equal(r.double(), r_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_random_data_against_float64(dtype):
    """Real-valued data: scores within rounding of the float64 ones, and the same neighbours
    wherever the float64 scores are separated by far more than that rounding."""
    n, m, d, k = 97, 3001, 31, 6
    g = torch.Generator().manual_seed(3)
    q = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
    r, idx = _knn(q, y, k)
    r_ref, _ = _brute(q, y, k + 1)
    eps = torch.finfo(dtype).eps
    scale = (q.double() ** 2).sum(1).max() + (y.double() ** 2).sum(1).max()
    tol = 8 * d * eps * scale.item()
    assert (r.double() - r_ref[:, :k]).abs().max().item() <= tol
    _, idx_all = _brute(q, y, m)
    separated = (r_ref.diff(dim=1) > 4 * tol).all(dim=1)
    assert separated.sum() > n // 2  # the check below must look at most rows
    assert torch.equal(idx[separated], idx_all[separated, :k])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_duplicate_rows_lower_index_first(dtype):
    y = torch.tensor([[1.0, 2.0], [5.0, 5.0], [1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [1.0, 2.0]])
    q = torch.tensor([[1.0, 2.0], [9.0, 9.0], [0.5, 0.5]])
    _, idx = _knn(q.to(dtype), y.to(dtype), 6)
    assert idx[0].tolist() == [0, 2, 3, 5, 4, 1]
    assert idx[1].tolist() == [1, 0, 2, 3, 5, 4]
    assert idx[2].tolist() == [4, 0, 2, 3, 5, 1]
    # all rows equal: the order is the index order, for every k
    same = torch.ones(50, 3, dtype=dtype)
    for k in (1, 7, 33, 50):
        _, idx = _knn(torch.zeros(2, 3, dtype=dtype), same, k)
        assert idx.tolist() == [list(range(k))] * 2


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("k", [1, 4, 40])
def test_nan_rows_never_chosen_over_numbers(k, dtype):
    m, d = 300, 5
    q = _ints((9, d), 4).to(dtype)
    y = _ints((m, d), 5).to(dtype)
    bad = [0, 3, 150, 299]
    y[bad] = float("nan")
    r, idx = _knn(q, y, k)
    assert not set(idx.flatten().tolist()) & set(bad)
    assert not r.isnan().any()
    assert torch.equal(idx, _brute(q, y, k)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_nan_rows_come_last_in_index_order(dtype):
    """k = m takes every row: the NaN scores follow all numbers, ordered by index; a NaN
    norm alone poisons a row the same way."""
    m = 40
    q = _ints((3, 4), 6).to(dtype)
    y = _ints((m, 4), 7).to(dtype)
    yn = (y * y).sum(1)
    y[[2, 30]] = float("nan")
    yn[[2, 30]] = float("nan")
    yn[11] = float("nan")
    r, idx = _knn(q, y, m, yn=yn)
    assert idx[:, -3:].tolist() == [[2, 11, 30]] * 3
    assert r[:, -3:].isnan().all() and not r[:, :-3].isnan().any()
    assert (r[:, 1:-3] >= r[:, :-4]).all()
    assert torch.equal(idx, _brute(q, y, m, yn=yn)[1])


@pytest.mark.parametrize(
    "shape", [(300, 5000, 40, 3), (7, 3000, 3072, 2), (1, 2000, 777, 50), (600, 4099, 64, 40)]
)
def test_independent_of_thread_count(shape):
    """Bit-equal results with 1 and 2 threads on real-valued float32 data. (7, 3000, 3072):
    MKL's sgemm of a 7-row block gives different bits with 1 and 2 threads; the op keeps its
    products single-threaded so that it does not."""
    n, m, d, k = shape
    g = torch.Generator().manual_seed(8)
    q, y = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r1, idx1 = _knn(q, y, k)
        torch.set_num_threads(2)
        r2, idx2 = _knn(q, y, k)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(idx1, idx2)
    assert torch.equal(r1, r2)


_PORTABLE_SCRIPT = """
import sys, torch
from debias.ops import _backend
_backend.compiled()
g = torch.Generator().manual_seed(9)
out = {}
for dtype in (torch.float32, torch.float64):
    q = torch.randn(70, 19, generator=g, dtype=dtype)
    y = torch.randn(2500, 19, generator=g, dtype=dtype)
    y[[4, 1000]] = float("nan")
    qn, yn = (q * q).sum(1), (y * y).sum(1)
    for k in (1, 5, 40, 2500):
        out[(str(dtype), k)] = torch.ops.debias_C.knn_candidates(q, y, qn, yn, k)
torch.save(out, sys.argv[1])
"""


def test_portable_scan_matches_avx2(tmp_path):
    """DEBIAS_NO_AVX2=1 selects the portable scan: the same bits as the AVX2 scan."""
    avx2, portable = run_avx2_and_portable(_PORTABLE_SCRIPT, tmp_path)
    assert avx2.keys() == portable.keys()
    for key, (r, idx) in avx2.items():
        r1, idx1 = portable[key]
        assert torch.equal(idx, idx1), key
        assert torch.equal(r.nan_to_num(), r1.nan_to_num()), key


def _bad_inputs():
    q = torch.zeros(4, 3)
    y = torch.zeros(6, 3)
    qn, yn = torch.zeros(4), torch.zeros(6)
    ok = dict(queries=q, database=y, query_sqnorms=qn, database_sqnorms=yn, k=2)
    cases = [
        ("queries", dict(queries=q.half())),
        ("queries", dict(queries=q.long())),
        ("database", dict(database=y.double())),
        ("query_sqnorms", dict(query_sqnorms=qn.double())),
        ("database_sqnorms", dict(database_sqnorms=yn.double())),
        ("database", dict(database=torch.zeros(6, 5))),
        ("queries", dict(queries=torch.zeros(3, 4).t())),
        ("database", dict(database=torch.zeros(6, 6)[:, ::2])),
        ("queries", dict(queries=torch.zeros(12))),
        ("query_sqnorms", dict(query_sqnorms=torch.zeros(5))),
        ("query_sqnorms", dict(query_sqnorms=torch.zeros(4, 1))),
        ("database_sqnorms", dict(database_sqnorms=torch.zeros(4))),
        ("k", dict(k=0)),
        ("k", dict(k=7)),
        ("k", dict(k=-1)),
        ("queries", dict(queries=torch.zeros(0, 3), query_sqnorms=torch.zeros(0))),
        ("database", dict(database=torch.zeros(0, 3), database_sqnorms=torch.zeros(0), k=1)),
        ("queries", dict(queries=torch.zeros(4, 0), database=torch.zeros(6, 0))),
    ]
    return [
        pytest.param(name, {**ok, **change}, id=f"{name}-{i}")
        for i, (name, change) in enumerate(cases)
    ]


@pytest.mark.parametrize(("name", "args"), _bad_inputs())
def test_bad_input_names_the_argument(name, args):
    with pytest.raises((RuntimeError, ValueError), match=rf"\b{name}\b"):
        _op()(
            args["queries"],
            args["database"],
            args["query_sqnorms"],
            args["database_sqnorms"],
            args["k"],
        )
