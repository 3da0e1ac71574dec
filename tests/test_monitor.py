"""MemorizationMonitor: scores against direct computations, the drift and best-step detections,
resume, the plot, blank samples and the errors at the door; on scikit-learn's 8x8 digits."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta

from debias.memorization import paired_similarity, split_preference
from debias.pipeline.data import load_digits
from debias.pipeline.monitor import DEFINITIONS, MemorizationMonitor, _exact_interval

N = 100  # samples per measurement
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def split(m, h, seed=0):
    """Disjoint train (m), held-out (h) and fresh (the rest of the 1797) digits."""
    images, _ = load_digits()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[perm[:m]], images[perm[m : m + h]], images[perm[m + h :]]


@pytest.fixture(scope="module")
def digits():
    return split(400, 400)


def copies(train, n=N, seed=0):
    """Rows of ``train`` with noise of 1e-3, and the rows copied."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(train), (n,), generator=gen)
    return train[rows] + 1e-3 * torch.randn(n, *train.shape[1:], generator=gen), rows


def fresh(pool, n=N, seed=0):
    """``n`` images of ``pool`` (digits in neither train nor held-out)."""
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=gen)[:n]]


def rms_distances(x, y):
    """[n, m] float64 ||x_i - y_j|| / sqrt(d), the brute force."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    return torch.cdist(x, y) / math.sqrt(x.shape[1])


def direct_preference(samples, train, held_out):
    """Fraction of samples whose nearest image in [held_out; train] is a training image (the
    first on ties: held-out), from the brute force."""
    union = torch.cat((held_out, train))
    nearest = rms_distances(samples, union).argmin(dim=1)  # the first minimum on ties
    return float((nearest >= len(held_out)).double().mean())


def clopper_pearson(fraction, n, level=0.95):
    """The exact binomial interval, from scipy's beta quantiles."""
    k, tail = round(fraction * n), (1 - level) / 2
    low = 0.0 if k == 0 else beta.ppf(tail, k, n - k + 1)
    high = 1.0 if k == n else beta.ppf(1 - tail, k + 1, n - k)
    return pytest.approx((low, high), abs=1e-12)


def test_memorizing_rows_match_direct_computation_and_drift(digits):
    train, held_out, _ = digits
    monitor = MemorizationMonitor(train, held_out)
    for i, step in enumerate((100, 200, 300, 400)):
        samples, _ = copies(train, seed=i)
        row = monitor.measure(step, samples, held_out_loss=1.0 - 0.1 * i)
        d = rms_distances(samples, train).sort(dim=1).values
        assert row["nn_distance_median"] == pytest.approx(float(np.median(d[:, 0])), rel=1e-9)
        assert float(d[:, 0].max()) < 1e-2
        assert row["gu_memorized_fraction"] == 1.0
        assert row["gu_memorized_fraction_ci_low"] == 1.0
        assert row["train_preference"] == direct_preference(samples, train, held_out) == 1.0
        # The exact interval of n hits out of n: [((1 - level) / 2) ** (1 / n), 1].
        assert row["train_preference_ci_low"] == pytest.approx(0.025 ** (1 / N), rel=1e-12)
        assert row["train_preference_ci_high"] == 1.0
        assert row["train_preference_expected"] == 0.5
        assert row["drifting"] and row["drift_reasons"] == "train_preference,gu"
        assert row["notes"] == ""
        assert row["n"] == N and row["step"] == step
        # Detected at the patience-th drifting row, dated to the run's first.
        assert monitor.should_stop == (i >= 1)
    assert monitor.drift_step == 100
    assert monitor.summary()["drift_detected_at"] == 200
    assert monitor.best_step == 400
    assert len(monitor.history) == 4 and monitor.history[-1] == row


def test_generalizing_rows_match_direct_computation_and_never_drift(digits):
    train, held_out, pool = digits
    monitor = MemorizationMonitor(train, held_out)
    for i, step in enumerate((100, 200, 300, 400)):
        samples = fresh(pool, seed=i)
        row = monitor.measure(step, samples)
        d = rms_distances(samples, train).sort(dim=1).values
        ratio = d[:, 0] / d[:, 1]
        assert row["gu_memorized_fraction"] == float((ratio < 1 / 3).double().mean()) == 0.0
        assert row["gu_memorized_fraction_ci_high"] == 0.0
        expected = direct_preference(samples, train, held_out)
        assert row["train_preference"] == pytest.approx(expected, abs=1e-12)
        ci = (row["train_preference_ci_low"], row["train_preference_ci_high"])
        assert ci == clopper_pearson(expected, N)
        assert ci[0] <= 0.5 <= ci[1] and row["train_preference_expected"] == 0.5
        assert ci[0] <= row["train_preference"] <= ci[1]
        assert not row["drifting"] and row["drift_reasons"] == ""
    assert monitor.drift_step is None and not monitor.should_stop
    assert monitor.best_step is None


@pytest.mark.parametrize(
    ("patience", "expected"), [(1, 300), (2, 300), (3, None)], ids=["p1", "p2", "p3"]
)
def test_turning_memorizing_at_300(digits, patience, expected):
    train, held_out, pool = digits
    monitor = MemorizationMonitor(train, held_out, patience=patience)
    for i, step in enumerate((100, 200, 300, 400)):
        samples = fresh(pool, seed=i) if step < 300 else copies(train, seed=i)[0]
        monitor.measure(step, samples)
    assert [r["drifting"] for r in monitor.history] == [False, False, True, True]
    assert monitor.drift_step == expected


def test_drift_is_the_first_run_of_patience_rows(digits):
    train, held_out, pool = digits
    monitor = MemorizationMonitor(train, held_out, patience=2)
    memorizing = [True, False, True, True, False, True]
    for i, mem in enumerate(memorizing):
        samples = copies(train, seed=i)[0] if mem else fresh(pool, seed=i)
        monitor.measure(10 * (i + 1), samples)
        assert monitor.should_stop == (i >= 3)
    assert [r["drifting"] for r in monitor.history] == memorizing
    assert monitor.drift_step == 30
    assert monitor.summary()["drift_detected_at"] == 40


def test_best_step_follows_the_held_out_minimum(digits):
    train, held_out, pool = digits
    monitor = MemorizationMonitor(train, held_out, resamples=20)
    losses = [3.0, 2.0, None, 2.5, 2.0, 1.5, torch.tensor(1.7), np.float32(1.9)]
    best = [10, 20, 20, 20, 20, 60, 60, 60]  # ties keep the earliest step
    for i, (loss, want) in enumerate(zip(losses, best, strict=True)):
        row = monitor.measure(10 * (i + 1), fresh(pool, n=8, seed=i), held_out_loss=loss)
        assert monitor.best_step == want
        assert row["held_out_loss"] == (None if loss is None else pytest.approx(float(loss)))
    assert monitor.summary()["best_held_out_loss"] == 1.5


def test_state_dict_round_trip_resumes_exactly(digits, tmp_path):
    train, held_out, pool = digits
    kw = dict(patience=2, resamples=50, seed=3)
    first = MemorizationMonitor(train, held_out, **kw)
    first.measure(100, fresh(pool, seed=0), held_out_loss=2.0)
    first.measure(200, copies(train, seed=1)[0], held_out_loss=1.0)  # a run of 1 so far
    state = json.loads(json.dumps(first.state_dict()))

    second = MemorizationMonitor(train, held_out, **kw)
    second.load_state_dict(state)
    assert second.history == first.history
    assert second.best_step == first.best_step == 200
    assert second.drift_step is None and not second.should_stop
    assert set(state) == {"version", "config", "history"}

    samples = copies(train, seed=2)[0]
    row_first = first.measure(300, samples, held_out_loss=1.5)
    row_second = second.measure(300, samples, held_out_loss=1.5)
    assert row_first == row_second
    assert first.drift_step == second.drift_step == 200
    assert first.summary() == second.summary()
    with pytest.raises(ValueError, match="step"):
        second.measure(300, samples)

    other = MemorizationMonitor(train, held_out, **{**kw, "margin": 0.1})
    with pytest.raises(ValueError, match="margin"):
        other.load_state_dict(state)
    assert other.history == []
    with pytest.raises(ValueError, match="held_out_shape"):
        MemorizationMonitor(train, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**state, "version": 1})


def test_equal_rows_from_equal_inputs_regardless_of_earlier_calls(digits):
    train, held_out, pool = digits
    samples = fresh(pool, seed=5)
    a = MemorizationMonitor(train, held_out)
    b = MemorizationMonitor(train, held_out)
    a.measure(1, fresh(pool, seed=6))
    assert a.measure(7, samples) == b.measure(7, samples)


@pytest.mark.parametrize(("m", "h"), [(1600, 180), (4, 180)], ids=["m1600-h180", "m4-h180"])
def test_copies_of_any_training_image_drift_with_a_small_held_out_set(m, h):
    train, held_out, _ = split(m, h)
    # Gu off (threshold ~0): only the train preference can fire.
    monitor = MemorizationMonitor(train, held_out, threshold=1e-12)
    for i, step in enumerate((1, 2)):
        samples, rows = copies(train, seed=i)
        assert len(rows.unique()) >= min(m, 90)  # copies of images all over train
        row = monitor.measure(step, samples)
        assert row["train_preference"] == direct_preference(samples, train, held_out) == 1.0
        assert row["train_preference_expected"] == m / (m + h)
        assert row["train_preference_ci_low"] == pytest.approx(0.025 ** (1 / N), rel=1e-12)
        assert row["drift_reasons"] == "train_preference"
    assert monitor.drift_step == 1
    e = m / (m + h)
    assert f"{e + 0.05 * (1 - e):.4g}" in monitor.drift_rule()


def test_fresh_draws_do_not_drift_with_four_training_images():
    train, held_out, pool = split(4, 180)
    monitor = MemorizationMonitor(train, held_out)
    for i, step in enumerate((1, 2)):
        samples = fresh(pool, n=200, seed=i)
        row = monitor.measure(step, samples)
        expected = direct_preference(samples, train, held_out)
        assert row["train_preference"] == pytest.approx(expected, abs=1e-12)
        ci = (row["train_preference_ci_low"], row["train_preference_ci_high"])
        assert ci == clopper_pearson(expected, 200)
        assert ci[0] <= 4 / 184 <= ci[1]
        assert not row["drifting"]
    assert monitor.drift_step is None


def test_fresh_draws_do_not_drift_with_a_small_held_out_set():
    # 1600 + 180 of the 1797 digits leave 17 fresh ones per split: five splits, 85 draws.
    hits = 0
    for seed in range(5):
        train, held_out, pool = split(1600, 180, seed=seed)
        monitor = MemorizationMonitor(train, held_out)
        row = monitor.measure(1, pool)
        expected = direct_preference(pool, train, held_out)
        assert row["train_preference"] == pytest.approx(expected, abs=1e-12)
        assert (row["train_preference_ci_low"], row["train_preference_ci_high"]) == (
            clopper_pearson(expected, len(pool))
        )
        assert not row["drifting"], (seed, row)
        hits += round(expected * len(pool))
        if seed == 1:
            # All of a round nearest a training image, as 17 fresh draws are with probability
            # 0.9 ** 17 = 0.17, is no evidence: the exact bound for 16 of 16 is 0.025 ** (1 / 16)
            # = 0.79 (a percentile bootstrap would say [1, 1], a drift).
            lucky = pool[rms_distances(pool, torch.cat((held_out, train))).argmin(1) >= 180]
            row = monitor.measure(2, lucky)
            assert len(lucky) == 16 and row["train_preference"] == 1.0
            assert row["train_preference_ci_low"] == pytest.approx(0.025 ** (1 / 16))
            assert not row["drifting"]
    low, high = clopper_pearson(hits / 85, 85).expected
    assert low <= 1600 / 1780 <= high


def test_a_tie_between_a_training_and_a_held_out_image_counts_as_held_out(digits):
    train, held_out, _ = digits
    twin = torch.cat((held_out[:-1], train[:1]))  # the last held-out image is train[0]
    monitor = MemorizationMonitor(train, twin)
    assert monitor.measure(1, train[:3].clone())["train_preference"] == pytest.approx(2 / 3)
    assert monitor.measure(2, train[:1].clone())["train_preference"] == 0.0


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (0, 7), (3, 17), (62, 64), (500, 1023)])
def test_exact_interval_matches_scipy(k, n):
    assert _exact_interval(k, n, 0.95) == clopper_pearson(k / n, n)
    assert _exact_interval(k, n, 0.5) == clopper_pearson(k / n, n, level=0.5)


def test_without_held_out_only_gu_applies(digits):
    train, _, pool = digits
    monitor = MemorizationMonitor(train)
    row = monitor.measure(1, fresh(pool))
    assert "train_preference" not in row and not row["drifting"]
    monitor.measure(2, copies(train)[0])
    row = monitor.measure(3, copies(train, seed=1)[0])
    assert row["drift_reasons"] == "gu" and monitor.drift_step == 2
    summary = monitor.summary()
    assert "train_preference" not in summary["definitions"]
    assert any("only the Gu rule" in note for note in summary["notes"])
    assert "train_preference" not in summary["drift_rule"]


def test_two_models_copying_their_own_split(digits):
    train, _, _ = digits
    train_a, train_b = train[:200], train[200:]
    # Gu off (threshold ~0) and no held-out set: only the split rule can fire.
    monitor = MemorizationMonitor(train_a, train_b=train_b, threshold=1e-12)
    for i, step in enumerate((1, 2)):
        samples_a, _ = copies(train_a, seed=i)
        samples_b, _ = copies(train_b, seed=10 + i)
        row = monitor.measure(step, samples_a, samples_b=samples_b)
        assert row["split_preference_a"] == row["split_preference_b"] == 1.0
        assert row["split_preference_a_ci_low"] == 1.0
        assert row["gu_memorized_fraction"] == 0.0
        assert row["drift_reasons"] == "split_preference_a,split_preference_b"
        expected = paired_similarity(samples_a, samples_b).median_distance
        assert row["paired_distance_median"] == pytest.approx(expected, rel=1e-12)
        assert row["paired_distance_median"] > 0.1
        assert row["paired_valid"] == N and row["notes"] == ""
    assert monitor.drift_step == 1
    summary = monitor.summary()
    assert {"paired_distance_median", "split_preference_a"} <= set(summary["definitions"])
    assert "split-preference" in summary["notes"][0]


def test_two_models_with_the_same_samples(digits):
    train, held_out, pool = digits
    monitor = MemorizationMonitor(train[:200], held_out, train_b=train[200:])
    samples = fresh(pool)
    row = monitor.measure(1, samples, samples_b=samples.clone())
    assert abs(row["paired_distance_median"]) < 1e-12
    # Standardized 1 - cos by hand: per-channel standardisation, then unit vectors.
    x = samples.double().flatten(2)
    x = (x - x.mean(dim=2, keepdim=True)) / x.std(dim=2, unbiased=False, keepdim=True)
    x = x.flatten(1) / x.flatten(1).norm(dim=1, keepdim=True)
    assert float((1 - (x * x).sum(1)).abs().max()) < 1e-12
    # The same samples: A prefers train exactly where B prefers train_b not (ties 1/2 each).
    assert row["split_preference_a"] + row["split_preference_b"] == pytest.approx(1.0, abs=1e-12)
    assert not row["drifting"]


def test_blank_samples_are_left_out_never_raise(digits, tmp_path):
    train, held_out, pool = digits
    train_a, train_b = train[:200], train[200:]
    monitor = MemorizationMonitor(train_a, held_out, train_b=train_b, resamples=50)
    a, b = fresh(pool, n=20), fresh(pool, n=20, seed=1)
    a[:3] = -1.0  # every channel constant, as after clipping early in training
    b[2:5] = 1.0
    row = monitor.measure(1, a, samples_b=b)
    assert row["paired_valid"] == 15
    expected = paired_similarity(a[5:], b[5:]).median_distance
    assert row["paired_distance_median"] == pytest.approx(expected, rel=1e-12)
    assert row["train_preference"] == pytest.approx(direct_preference(a[3:], train_a, held_out))
    sp = split_preference(a[3:], torch.cat((b[:2], b[5:])), train_a, train_b)
    for key, own, other in (("a", sp.own_a, sp.other_a), ("b", sp.own_b, sp.other_b)):
        want = float(((own > other).double() + 0.5 * (own == other).double()).mean())
        assert row[f"split_preference_{key}"] == pytest.approx(want, abs=1e-12)
    for part in (
        "train_preference over 17 of 20",
        "paired_distance_median over 15 of 20",
        "split_preference_a over 17 of 20",
        "split_preference_b over 17 of 20",
    ):
        assert part in row["notes"]

    # All blank: no exception, None for the measures without a sample, and no drift from them.
    for step in (2, 3):
        row = monitor.measure(step, torch.full_like(a, -1.0), samples_b=torch.full_like(b, -1.0))
        assert row["paired_valid"] == 0 and row["paired_distance_median"] is None
        for key in ("train_preference", "split_preference_a", "split_preference_b"):
            assert row[key] is row[f"{key}_ci_low"] is row[f"{key}_ci_high"] is None
        assert row["train_preference_expected"] == 200 / 600
        assert "no split preference" in row["notes"] and not row["drifting"]
        assert row["nn_distance_median"] > 0.5  # the L2 measures still score blanks
    assert monitor.drift_step is None
    json.loads(json.dumps(monitor.state_dict()))
    monitor.plot(tmp_path / "blank.png")
    assert (tmp_path / "blank.png").read_bytes()[:8] == PNG_SIGNATURE

    # One model blank, the other not: the split preference of the other is still measured.
    row = monitor.measure(4, torch.full_like(a, -1.0), samples_b=b)
    assert row["split_preference_a"] is None and row["split_preference_b"] is not None
    assert row["paired_valid"] == 0 and row["paired_distance_median"] is None


def test_plot_writes_a_png(digits, tmp_path):
    train, held_out, pool = digits
    monitor = MemorizationMonitor(train[:200], held_out, train_b=train[200:], resamples=20)
    empty = tmp_path / "empty.png"
    monitor.plot(empty)
    assert empty.read_bytes()[:8] == PNG_SIGNATURE
    for i, step in enumerate((100, 200, 300, 400)):
        a = fresh(pool, n=32, seed=i) if step < 300 else copies(train[:200], n=32, seed=i)[0]
        b = fresh(pool, n=32, seed=9 + i) if step < 300 else copies(train[200:], n=32, seed=i)[0]
        monitor.measure(step, a, samples_b=b, held_out_loss=[2.0, 1.0, 1.2, 1.5][i])
    assert monitor.best_step == 200 and monitor.drift_step == 300
    path = tmp_path / "sub" / "monitor.png"
    monitor.plot(path)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000


def test_summary_is_json_and_defines_every_row_key(digits):
    train, held_out, pool = digits
    monitor = MemorizationMonitor(train[:200], held_out, train_b=train[200:], resamples=20)
    row = monitor.measure(5, fresh(pool, n=16), samples_b=fresh(pool, n=16, seed=1))
    summary = json.loads(json.dumps(monitor.summary()))
    assert summary["last"] == row and summary["measurements"] == 1
    stems = {k for k in row if not k.endswith(("_ci_low", "_ci_high"))}
    assert stems <= set(summary["definitions"]) <= set(DEFINITIONS)
    assert summary["config"]["patience"] == 2 and "0.55" in summary["drift_rule"]
    json.dumps(monitor.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(train=[[0.0]]), TypeError, "train"),
        (dict(train=torch.zeros(4, 8, 8)), ValueError, "train"),
        (dict(train=torch.zeros(1, 1, 8, 8)), ValueError, "train"),
        (dict(held_out=torch.zeros(4, 1, 7, 8)), ValueError, "held_out"),
        (dict(train_b=torch.zeros(4, 3, 8, 8)), ValueError, "train_b"),
        (dict(train_b=torch.full((4, 1, 8, 8), -1.0)), ValueError, "train_b row 0"),
        (dict(threshold=0.0), ValueError, "threshold"),
        (dict(margin=0.5), ValueError, "margin"),
        (dict(patience=0), ValueError, "patience"),
        (dict(resamples=1.5), TypeError, "resamples"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_constructor_errors_name_the_argument(digits, kwargs, error, name):
    train, held_out, _ = digits
    args = {"train": train, "held_out": held_out, **kwargs}
    with pytest.raises(error, match=name):
        MemorizationMonitor(args.pop("train"), args.pop("held_out"), **args)


def test_measure_errors_name_the_argument_and_leave_history_alone(digits):
    train, held_out, pool = digits
    samples = fresh(pool, n=8)
    one = MemorizationMonitor(train, held_out, resamples=10)
    one.measure(10, samples)
    with pytest.raises(ValueError, match="step"):
        one.measure(10, samples)
    with pytest.raises(ValueError, match="step"):
        one.measure(5, samples)
    with pytest.raises(TypeError, match="step"):
        one.measure(11.0, samples)
    with pytest.raises(ValueError, match="samples"):
        one.measure(11, torch.zeros(8, 1, 8, 7))
    with pytest.raises(ValueError, match="samples"):
        one.measure(11, torch.zeros(8, 64))
    with pytest.raises(ValueError, match="samples row 3"):
        one.measure(11, samples.clone().index_fill_(0, torch.tensor([3]), math.nan))
    with pytest.raises(ValueError, match="held_out_loss"):
        one.measure(11, samples, held_out_loss=math.inf)
    with pytest.raises(ValueError, match="held_out_loss"):
        one.measure(11, samples, held_out_loss=torch.tensor(math.nan))
    with pytest.raises(TypeError, match="held_out_loss"):
        one.measure(11, samples, held_out_loss="1.0")
    with pytest.raises(ValueError, match="samples_b"):
        one.measure(11, samples, samples_b=samples)
    two = MemorizationMonitor(train[:200], held_out, train_b=train[200:], resamples=10)
    with pytest.raises(ValueError, match="samples_b"):
        two.measure(11, samples)
    with pytest.raises(ValueError, match="samples_b"):
        two.measure(11, samples, samples_b=samples[:4])
    assert len(one.history) == 1 and two.history == []
    assert one.measure(11, samples)["step"] == 11
