"""Memorization scores on constructed cases with known answers (debias.memorization)."""

import math

import numpy as np
import pytest
import torch

from debias import memorization as M
from debias import reference
from debias.pipeline.data import load_digits


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_digits()[0]  # [1797, 1, 8, 8] in [-1, 1]


@pytest.fixture(scope="module")
def train(digits) -> torch.Tensor:
    return digits[:400]


@pytest.fixture(scope="module")
def copies(train) -> torch.Tensor:
    """A generator that copies training images 0..59, plus tiny noise."""
    g = torch.Generator().manual_seed(1)
    return train[:60] + 0.005 * torch.randn(60, 1, 8, 8, generator=g)


@pytest.fixture(scope="module")
def fresh(digits) -> torch.Tensor:
    """A fresh draw from the same distribution: held-out digits."""
    return digits[1200:1300]


def _neighbours(d1, d2) -> M.Neighbours:
    dist = torch.tensor([d1, d2], dtype=torch.float64).T.contiguous()
    return M.Neighbours(dist, torch.zeros(dist.shape, dtype=torch.int64), 64)


def test_module_is_public():
    import debias.memorization

    assert "memorization" in debias.__all__ and debias.memorization is M


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_distances_is_normalised_brute_force(k):
    g = torch.Generator().manual_seed(0)
    samples, train = torch.randn(7, 3, 5, 5, generator=g), torch.randn(33, 3, 5, 5, generator=g)
    nb = M.nearest_distances(samples, train, k)
    dist, idx = reference.knn(samples, train, k)
    assert nb.dim == 75 and nb.distances.dtype == torch.float64
    torch.testing.assert_close(nb.distances, dist / math.sqrt(75), rtol=1e-12, atol=1e-12)
    assert torch.equal(nb.indices, idx)


def test_copies_score_memorized(train, copies):
    gu = M.gu_ratio(copies, train, resamples=200)
    assert gu.fraction == 1.0 and gu.ci == (1.0, 1.0)
    assert float(gu.ratio.max()) < 0.1
    assert torch.equal(gu.neighbours.indices[:, 0], torch.arange(60))
    carlini = M.carlini_extraction(gu.neighbours, resamples=200)  # reuses the search
    assert carlini.fraction == 1.0 and torch.equal(carlini.indices, torch.arange(60))
    assert float(carlini.distance.max()) < 0.01
    som = M.somepalli_similarity(copies, train)
    assert som.stats["p50"] > 0.999 and som.fraction_above == 1.0
    assert torch.equal(som.nearest, torch.arange(60))
    assert som.stats["p50"] > som.baseline_stats["p50"]  # closer than training images are


def test_fresh_draw_is_not_memorized(train, fresh):
    gu = M.gu_ratio(fresh, train, resamples=200)
    assert gu.fraction == 0.0 and gu.ci == (0.0, 0.0)
    assert float(gu.ratio.median()) > 0.6
    assert M.carlini_extraction(fresh, train, resamples=200).fraction < 0.05
    som = M.somepalli_similarity(fresh, train, metric="standardized")
    assert som.stats["p50"] < 0.99  # not copies ...
    # ... and no closer than training images are to each other
    assert abs(som.stats["p50"] - som.baseline_stats["p50"]) < 0.05


def test_ratio_threshold_and_duplicates():
    gu = M.gu_ratio(_neighbours([1.0, 1.0, 3.0], [2.0, 4.0, 4.0]))
    torch.testing.assert_close(gu.ratio, torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64))
    assert gu.memorized.tolist() == [False, True, False] and gu.fraction == pytest.approx(1 / 3)
    assert M.gu_ratio(
        _neighbours([1.0, 1.0, 3.0], [2.0, 4.0, 4.0]), threshold=0.6
    ).memorized.tolist() == [True, True, False]
    # A sample equal to a training image that appears twice: d1 = d2 = 0, ratio 0, memorized.
    train = torch.randn(10, 1, 4, 4)
    train[7] = train[3]
    gu = M.gu_ratio(train[[3, 5]].clone(), train)
    assert gu.ratio.tolist() == [0.0, 0.0] and gu.memorized.all()
    assert gu.neighbours.indices[0].tolist() == [3, 7]


def test_carlini_delta_is_adjustable():
    nb = _neighbours([0.05, 0.1, 0.2, 0.4], [1.0, 1.0, 1.0, 1.0])
    assert M.carlini_extraction(nb).indices.tolist() == [0, 1]  # delta 0.15
    wide = M.carlini_extraction(nb, delta=0.3)
    assert wide.indices.tolist() == [0, 1, 2] and wide.fraction == 0.75


def _mixed(n: int) -> M.Neighbours:
    """n samples, 30% memorized (ratio 0.1), the rest not (ratio 0.9)."""
    memorized = torch.arange(n) < round(0.3 * n)
    return _neighbours(torch.where(memorized, 0.1, 0.9).tolist(), [1.0] * n)


def test_bootstrap_interval():
    small, large = M.gu_ratio(_mixed(40)), M.gu_ratio(_mixed(1000))
    for gu in (small, large):
        assert gu.ci[0] < gu.fraction < gu.ci[1]
    assert large.ci[1] - large.ci[0] < (small.ci[1] - small.ci[0]) / 3  # ~ 1/sqrt(n)
    # seeded: the same seed gives the same interval; level and resamples are honoured
    assert M.gu_ratio(_mixed(40), generator=0).ci == small.ci
    gen = torch.Generator().manual_seed(0)
    assert M.gu_ratio(_mixed(40), generator=gen).ci == small.ci
    narrow = M.gu_ratio(_mixed(40), level=0.5, resamples=300)
    assert narrow.ci[1] - narrow.ci[0] < small.ci[1] - small.ci[0] and narrow.resamples == 300
    # the interval of a binomial proportion: 0.3 +- 1.96 sqrt(0.3 * 0.7 / 1000) ~ +-0.028
    assert large.ci[0] == pytest.approx(0.272, abs=0.01) and large.ci[1] == pytest.approx(
        0.328, abs=0.01
    )
    # the same interval for any [n] values, as the monitor reports its preferences
    assert M.bootstrap_interval(small.memorized) == small.ci
    assert M.bootstrap_interval(small.memorized.double(), 300, 0.5) == narrow.ci
    with pytest.raises(ValueError, match="values"):
        M.bootstrap_interval(torch.zeros(2, 2))


def test_baseline_excludes_self_and_subset_matches(train):
    db = train[:120].clone()
    db[100] = db[10]  # a duplicate: its nearest other row is at similarity 1
    full = M.somepalli_similarity(train[:5], db)
    assert full.baseline_similarity.shape == (120,)
    assert full.baseline_similarity[10] == pytest.approx(1.0, abs=1e-12)
    others = full.baseline_similarity[torch.arange(120) != 10]
    assert float(others[:99].max()) < 1 - 1e-6  # not itself
    sub = M.somepalli_similarity(train[:5], db, baseline_size=40, generator=3)
    assert sub.baseline_rows.shape == (40,) and len(set(sub.baseline_rows.tolist())) == 40
    torch.testing.assert_close(
        sub.baseline_similarity, full.baseline_similarity[sub.baseline_rows], rtol=0, atol=1e-12
    )
    again = M.somepalli_similarity(train[:5], db, baseline_size=40, generator=3)
    assert torch.equal(again.baseline_rows, sub.baseline_rows)
    assert M.somepalli_similarity(train[:5], db, baseline=False).baseline_stats is None
    stats = M.somepalli_similarity(train[:5], db, percentiles=(10, 90)).stats
    assert set(stats) == {"p10", "p90", "max", "mean"}


def test_sources_agree(tmp_path, train, copies):
    """A tensor, a .npy path, a list of chunks and a one-shot generator give one answer."""
    path = tmp_path / "train.npy"
    np.save(path, train.numpy())
    want = M.nearest_distances(copies, train, 3)
    for source in (
        str(path),
        path,
        [train[:150], train[150:].numpy()],
        iter([train[:99], train[99:]]),
    ):
        got = M.nearest_distances(copies, source, 3)
        assert torch.equal(got.indices, want.indices)
        torch.testing.assert_close(got.distances, want.distances, rtol=1e-12, atol=0)


class _Counting:
    """A feature extractor that records its calls: a fixed random projection to 16 values."""

    def __init__(self):
        self.batches: list[int] = []
        self.grad: list[bool] = []
        self.weight = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        self.grad.append(torch.is_grad_enabled())
        return x.reshape(x.shape[0], -1) @ self.weight


def test_feature_extractor_is_batched(train, copies):
    extractor = _Counting()
    nb = M.nearest_distances(copies[:10], train[:25], 2, features=extractor, batch_size=4)
    assert extractor.batches == [4, 4, 2] + [4] * 6 + [1]  # samples, then training rows
    assert not any(extractor.grad)
    want = reference.knn(
        copies[:10].reshape(10, 64) @ extractor.weight,
        train[:25].reshape(25, 64) @ extractor.weight,
        2,
    )
    assert nb.dim == 16 and torch.equal(nb.indices, want[1])
    torch.testing.assert_close(nb.distances, want[0] / 4, rtol=1e-6, atol=1e-9)
    # a streamed training set: the extractor is mapped over each chunk
    extractor.batches.clear()
    M.nearest_distances(
        copies[:10], iter([train[:10], train[10:25]]), features=extractor, batch_size=4
    )
    assert extractor.batches == [4, 4, 2, 4, 4, 2, 4, 4, 4, 3]
    extractor.batches.clear()
    som = M.somepalli_similarity(copies[:10], train[:25], features=extractor, batch_size=8)
    assert extractor.batches == [8, 2, 8, 8, 8, 1] and som.baseline_similarity.shape == (25,)
    assert torch.equal(
        M.extract_features(copies[:3], extractor), copies[:3].reshape(3, 64) @ extractor.weight
    )
    # with the network behind the extractor: evaluated in eval mode, its mode restored after
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9)).train()
    assert torch.equal(M.extract_features(copies[:3], net, module=net), copies[:3].reshape(3, 64))
    assert net.training


def test_paired_similarity_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 3, 4, 5, generator=g)
    b = torch.randn(9, 3, 4, 5, generator=g)
    got = M.paired_similarity(a, b)

    def standardise(x):
        x = x.double()
        mean, std = x.mean((2, 3), keepdim=True), x.std((2, 3), unbiased=False, keepdim=True)
        v = ((x - mean) / std).reshape(len(x), -1)
        return v / v.norm(dim=1, keepdim=True)

    want = (standardise(a) * standardise(b)).sum(1)
    torch.testing.assert_close(got.similarity, want, rtol=0, atol=1e-12)
    assert got.median_distance == pytest.approx(float(np.median((1 - want).numpy())))
    # per-channel affine changes of a sample do not change it
    scaled = (
        a * torch.tensor([2.0, 0.5, 3.0])[:, None, None]
        + torch.tensor([1.0, -4.0, 0.0])[:, None, None]
    )
    assert M.paired_similarity(a, scaled).median_distance == pytest.approx(0.0, abs=1e-12)


def test_biased_generalization_own_split_vs_shared_generator(digits):
    train_a, train_b = digits[:300], digits[300:600]  # disjoint splits
    g = torch.Generator().manual_seed(2)
    noise = 0.01 * torch.randn(2, 80, 1, 8, 8, generator=g)
    memorizing = M.biased_generalization(
        train_a[:80] + noise[0], train_b[:80] + noise[1], train_a, train_b
    )
    split = memorizing.split
    assert split.fraction_own_a == 1.0 and split.fraction_own_b == 1.0
    assert bool((split.own_a > split.other_a).all()) and float(split.own_a.min()) > 0.99
    assert memorizing.paired.median_distance > 0.1  # the two models disagree
    # One shared generator (both models emit the same held-out digits): no preference.
    shared = digits[1000:1080]
    same = M.biased_generalization(shared, shared.clone(), train_a, train_b)
    assert same.split.fraction_own == pytest.approx(0.5)
    assert 0.2 < same.split.fraction_own_a < 0.8
    assert same.paired.median_distance == pytest.approx(0.0, abs=1e-12)
    assert set(same.summary()) == {"paired", "split"}


def test_report_has_every_measure(train, copies, digits):
    summary, results = M.memorization_report(copies, train, k=3, resamples=50)
    assert set(summary) == {"nearest", "gu", "carlini", "somepalli", "most_memorized"}
    assert summary["nearest"]["k"] == 3 and summary["gu"]["fraction"] == 1.0
    assert len(summary["most_memorized"]) == 8 and results["gu"].neighbours.distances.shape == (
        60,
        3,
    )
    two, results = M.memorization_report(
        copies, train, samples_b=digits[500:560], train_b=digits[400:800], resamples=50
    )
    assert {"model_b", "biased_generalization"} <= set(two)
    assert two["biased_generalization"]["split"]["fraction_own_a"] == 1.0
    assert isinstance(results["biased_generalization"], M.BiasedGeneralization)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda s, t: M.nearest_distances(s.numpy().tolist(), t), TypeError, "samples"),
        (lambda s, t: M.nearest_distances(s.long(), t), TypeError, "samples"),
        (lambda s, t: M.nearest_distances(s[:0], t), ValueError, "samples"),
        (lambda s, t: M.nearest_distances(s.reshape(len(s), -1), t), ValueError, "train"),
        (lambda s, t: M.nearest_distances(s, t, k=0), ValueError, "k"),
        (lambda s, t: M.nearest_distances(s, t, k=2.0), TypeError, "k"),
        (lambda s, t: M.nearest_distances(s, t, k=len(t) + 1), ValueError, "train"),
        (lambda s, t: M.nearest_distances(s, "train.csv"), ValueError, "train"),
        (lambda s, t: M.nearest_distances(s, 3), TypeError, "train"),
        (lambda s, t: M.nearest_distances(s, t, features="dino"), TypeError, "features"),
        (lambda s, t: M.nearest_distances(s, t, batch_size=0), ValueError, "batch_size"),
        (lambda s, t: M.nearest_distances(s, t, features=lambda x: x), ValueError, "features"),
        (lambda s, t: M.gu_ratio(s, t, threshold=0), ValueError, "threshold"),
        (lambda s, t: M.gu_ratio(s, t, level=1.0), ValueError, "level"),
        (lambda s, t: M.gu_ratio(s, t, resamples=0), ValueError, "resamples"),
        (lambda s, t: M.gu_ratio(s, t, generator="seed"), TypeError, "generator"),
        (lambda s, t: M.gu_ratio(s), ValueError, "train"),
        (lambda s, t: M.gu_ratio(M.nearest_distances(s, t, 1)), ValueError, "k=1"),
        (lambda s, t: M.gu_ratio(M.nearest_distances(s, t), t), ValueError, "train"),
        (lambda s, t: M.carlini_extraction(s, t, delta=-1), ValueError, "delta"),
        (lambda s, t: M.somepalli_similarity(s, t, metric="l2"), ValueError, "metric"),
        (lambda s, t: M.somepalli_similarity(s, t, threshold=2), ValueError, "threshold"),
        (lambda s, t: M.somepalli_similarity(s, t, baseline_size=0), ValueError, "baseline_size"),
        (lambda s, t: M.paired_similarity(s, s[:3]), ValueError, "samples_b"),
        (lambda s, t: M.paired_similarity(s, torch.zeros_like(s)), ValueError, "samples_b row 0"),
        (lambda s, t: M.split_preference(s, s.reshape(len(s), -1), t, t), ValueError, "samples_b"),
        (lambda s, t: M.split_preference(s, s, t, t[:, :, :4]), ValueError, "train_b"),
        (lambda s, t: M.memorization_report(s, t, samples_b=s), ValueError, "train_b"),
        (lambda s, t: M.nearest_distances(s, torch.tensor(1.0)), ValueError, "train"),
        (lambda s, t: M.nearest_distances(s.to("meta"), t), ValueError, "samples"),
        (lambda s, t: M.gu_ratio(s, t.to("meta")), ValueError, "train"),
        (lambda s, t: M.somepalli_similarity(s, t.to("meta")), ValueError, "train"),
        (lambda s, t: M.paired_similarity(s, s.to("meta")), ValueError, "samples_b"),
        (lambda s, t: M.extract_features(s.numpy().astype("int32")), TypeError, "x"),
    ],
)
def test_bad_input(call, error, words):
    samples, train = torch.randn(4, 1, 8, 8), torch.randn(12, 1, 8, 8)
    with pytest.raises(error, match=words):
        call(samples, train)


def test_nan_sample_is_named():
    samples = torch.randn(4, 1, 8, 8)
    samples[2, 0, 1, 1] = math.nan
    with pytest.raises(ValueError, match="samples row 2"):
        M.gu_ratio(samples, torch.randn(12, 1, 8, 8))
