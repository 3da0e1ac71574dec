"""Evaluation (debias.pipeline.evaluate) against brute force, scipy and closed forms."""

import csv
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from debias import NoiseSchedule
from debias.pipeline import evaluate as E

NO_MM = "donot_use_mm_for_euclid_dist"


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def two_class_images(n: int, seed: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 is bright in the top half, class 1 in the bottom half, plus noise."""
    labels = torch.arange(n) % 2
    top = (torch.arange(size) < size // 2).float()[None, None, :, None]
    pattern = torch.where(labels[:, None, None, None] == 0, top, 1.0 - top)
    noise = 0.3 * _randn(n, 1, size, size, seed=seed, dtype=torch.float32)
    return (pattern - 0.5 + noise).clamp(-1, 1), labels


# ---- PRDC ---------------------------------------------------------------------------------


def prdc_brute(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict:
    """The definitions with whole distance matrices, float64 differences."""
    real, fake = real.double(), fake.double()
    r = torch.cdist(real, real, compute_mode=NO_MM).sort(dim=1).values[:, k]  # [:, 0] is self
    s = torch.cdist(fake, fake, compute_mode=NO_MM).sort(dim=1).values[:, k]
    d = torch.cdist(real, fake, compute_mode=NO_MM)  # [n, m]
    inside_real = d <= r[:, None]
    return {
        "precision": inside_real.any(0).double().mean().item(),
        "recall": (d <= s[None, :]).any(1).double().mean().item(),
        "density": inside_real.sum().item() / (k * fake.shape[0]),
        "coverage": (d.min(1).values <= r).double().mean().item(),
    }


@pytest.mark.parametrize("chunk", [1024, 7, 1], ids=["chunk1024", "chunk7", "chunk1"])
def test_prdc_matches_brute_force(monkeypatch, chunk):
    monkeypatch.setattr(E, "_CHUNK", chunk)
    real = _randn(37, 5, seed=1)
    fake = 0.6 + 1.3 * _randn(53, 5, seed=2)
    got = E.prdc(real.float(), fake.float(), k=3)
    want = prdc_brute(real.float(), fake.float(), k=3)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # A test that can fail: none of the four is trivially 0 or 1 on this data.
    assert all(0 < got[key] < 1 for key in ("precision", "recall", "coverage"))
    assert got["density"] > 0
    assert (got["k"], got["n_real"], got["n_fake"]) == (3, 37, 53)


def test_prdc_identical_and_far_apart():
    x = _randn(40, 6, seed=3)
    same = E.prdc(x, x.clone(), k=4)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = E.prdc(x, x + 100.0, k=4)
    assert far["precision"] == far["recall"] == far["coverage"] == far["density"] == 0.0


@pytest.mark.parametrize(
    "real, fake, k, error, match",
    [
        (torch.randn(5, 3), torch.randn(9, 3), 5, ValueError, "k must be smaller"),
        (torch.randn(9, 3), torch.randn(5, 3), 5, ValueError, "fake_features"),
        (torch.randn(0, 3), torch.randn(9, 3), 2, ValueError, "non-empty"),
        (torch.randn(9, 3), torch.randn(9, 4), 2, ValueError, "same feature size"),
        (torch.randn(9), torch.randn(9, 3), 2, ValueError, "real_features"),
        (torch.randn(9, 3), torch.ones(9, 3, dtype=torch.int64), 2, TypeError, "float"),
        (torch.full((9, 3), math.nan), torch.randn(9, 3), 2, ValueError, "NaN"),
        (torch.randn(9, 3), torch.randn(9, 3), 0, ValueError, "k must be at least 1"),
    ],
    ids=["k-real", "k-fake", "empty", "dims", "1d", "int", "nan", "k0"],
)
def test_prdc_errors(real, fake, k, error, match):
    with pytest.raises(error, match=match):
        E.prdc(real, fake, k=k)


# ---- Fréchet distance ---------------------------------------------------------------------


def fd_scipy(a: torch.Tensor, b: torch.Tensor) -> float:
    """pytorch-fid's formula: scipy.linalg.sqrtm of the covariance product."""
    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def test_frechet_matches_scipy():
    a = _randn(41, 7, seed=4) @ _randn(7, 7, seed=5)
    b = 0.3 + _randn(53, 7, seed=6) @ _randn(7, 7, seed=7)
    got = E.frechet_distance(a.float(), b.float())
    assert got == pytest.approx(fd_scipy(a.float(), b.float()), rel=1e-9)
    assert got > 1.0


def test_frechet_same_distribution_is_near_zero():
    x = _randn(30, 5, seed=8)
    assert E.frechet_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-10)
    a, b = _randn(4000, 3, seed=9), _randn(4000, 3, seed=10)
    assert E.frechet_distance(a, b) < 0.01


def _exact_gaussian_sample(n: int, mean, var, seed: int) -> torch.Tensor:
    """n rows whose sample mean and (n - 1) covariance are exactly mean and diag(var)."""
    z = _randn(n, len(mean), seed=seed)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    return torch.tensor(mean, dtype=torch.float64) + z * torch.tensor(var).double().sqrt()


def test_frechet_closed_form_for_diagonal_gaussians():
    mu_a, var_a = [0.0, 1.0, -2.0], [1.0, 4.0, 0.25]
    mu_b, var_b = [0.5, 1.0, 0.0], [9.0, 1.0, 0.25]
    a = _exact_gaussian_sample(101, mu_a, var_a, seed=11)
    b = _exact_gaussian_sample(77, mu_b, var_b, seed=12)
    want = sum((x - y) ** 2 for x, y in zip(mu_a, mu_b, strict=True)) + sum(
        (math.sqrt(x) - math.sqrt(y)) ** 2 for x, y in zip(var_a, var_b, strict=True)
    )
    assert E.frechet_distance(a, b) == pytest.approx(want, rel=1e-10)
    # The distance is invariant to a common rotation, which makes the covariances full.
    q = torch.linalg.qr(_randn(3, 3, seed=13))[0]
    assert E.frechet_distance(a @ q, b @ q) == pytest.approx(want, rel=1e-10)


def test_frechet_errors():
    with pytest.raises(ValueError, match="at least 2 rows"):
        E.frechet_distance(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="same feature size"):
        E.frechet_distance(torch.randn(5, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="NaN"):
        E.frechet_distance(torch.randn(5, 3), torch.full((5, 3), math.inf))


# ---- feature network ----------------------------------------------------------------------


def test_feature_net_learns_and_is_deterministic(one_thread):
    images, labels = two_class_images(300)
    rng = torch.random.get_rng_state()
    net, accuracy = E.train_feature_net(images, labels, steps=60, batch_size=64, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng), "the global RNG was used"
    assert accuracy > 0.8
    assert not net.training
    assert net.features(images[:5]).shape == (5, net.feature_dim)
    assert 64 <= net.feature_dim <= 128
    again, accuracy_again = E.train_feature_net(images, labels, steps=60, batch_size=64, seed=3)
    assert accuracy_again == accuracy
    for (name, p), q in zip(net.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    other, _ = E.train_feature_net(images, labels, steps=5, batch_size=64, seed=4)
    assert not torch.equal(other.head.weight, net.head.weight)


def test_feature_net_ignores_unlabelled_rows(one_thread):
    images, labels = two_class_images(120)
    labels = labels.clone()
    labels[::3] = -1
    _, accuracy = E.train_feature_net(images, labels, steps=40, batch_size=32)
    assert accuracy > 0.8


@pytest.mark.parametrize(
    "labels",
    [None, torch.full((20,), -1), torch.zeros(20, dtype=torch.int64)],
    ids=["none", "all-minus-one", "one-class"],
)
def test_feature_net_needs_labels(labels):
    with pytest.raises(ValueError, match=r"^labels"):
        E.train_feature_net(torch.zeros(20, 1, 8, 8), labels, steps=1)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_inception_features_runs_a_local_torchscript_file(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1))
    path = tmp_path / "extractor.pt"
    torch.jit.script(module).save(str(path))
    images = torch.rand(5, 1, 6, 6) * 2 - 1
    got = E.inception_features(
        images, path, batch_size=2, size=10, channels=3, input_range=(0.0, 255.0)
    )
    x = nn.functional.interpolate(images.expand(-1, 3, -1, -1), size=(10, 10), mode="bilinear")
    with torch.no_grad():
        want = module((x + 1) * 127.5).flatten(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="no such file"):
        E.inception_features(images, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="channels"):
        E.inception_features(torch.zeros(2, 2, 4, 4), path, channels=3)


# ---- colour shift -------------------------------------------------------------------------


def test_channel_mean_shift_on_constructed_shifts():
    data = _randn(20, 3, 4, 5, seed=14, dtype=torch.float32)
    shift = torch.tensor([0.1, -0.2, 0.3])
    out = E.channel_mean_shift(data + shift[:, None, None], data)
    assert out["mean_shift"] == pytest.approx(shift.tolist(), abs=1e-6)
    assert out["max_abs_shift"] == pytest.approx(0.3, abs=1e-6)
    assert out["std_ratio"] == pytest.approx([1.0] * 3, abs=1e-6)
    scaled = E.channel_mean_shift(2.0 * (data - data.mean()), data - data.mean())
    assert scaled["std_ratio"] == pytest.approx([2.0] * 3, rel=1e-6)
    flat = torch.zeros(4, 2, 3, 3)
    out = E.channel_mean_shift(torch.ones(4, 2, 3, 3), flat)
    assert out["std_ratio"] == [None, None] and out["mean_shift"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="same channels"):
        E.channel_mean_shift(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4))


# ---- timestep analysis --------------------------------------------------------------------

MU, SIGMA = 0.3, 0.5


def mmse_eps(schedule):
    """E[eps | x_t] for x0 ~ N(MU, SIGMA^2) per pixel: x_t = a x0 + b eps is Gaussian with
    Cov(eps, x_t) = b and Var(x_t) = a^2 SIGMA^2 + b^2, so
    E[eps | x_t] = b (x_t - a MU) / (abar SIGMA^2 + 1 - abar), with error variance
    1 - (1 - abar) / (abar SIGMA^2 + 1 - abar)."""

    def model(x_t, t):
        abar = schedule.alphas_cumprod[t][:, None, None, None]
        a, b = abar.sqrt(), (1 - abar).sqrt()
        return b * (x_t.double() - a * MU) / (abar * SIGMA**2 + 1 - abar)

    return model


def as_v(schedule, eps_model):
    def model(x_t, t):
        abar = schedule.alphas_cumprod[t][:, None, None, None]
        a, b = abar.sqrt(), (1 - abar).sqrt()
        eps = eps_model(x_t, t)
        return a * eps - b * (x_t.double() - b * eps) / a

    return model


def as_sample(schedule, eps_model):
    def model(x_t, t):
        abar = schedule.alphas_cumprod[t][:, None, None, None]
        a, b = abar.sqrt(), (1 - abar).sqrt()
        return (x_t.double() - b * eps_model(x_t, t)) / a

    return model


TIMESTEPS = [0, 99, 333, 700, 999]


def test_timestep_analysis_matches_the_mmse_predictor():
    schedule = NoiseSchedule.linear(1000)
    x0 = (MU + SIGMA * _randn(512, 1, 8, 8, seed=15)).float()
    rows = E.timestep_analysis(mmse_eps(schedule), schedule, x0, TIMESTEPS, seed=2, batch_size=100)
    tol = 5 * math.sqrt(2 / x0.numel())  # the error is Gaussian: relative sd sqrt(2 / N)
    for row, t in zip(rows, TIMESTEPS, strict=True):
        abar = float(schedule.alphas_cumprod[t])
        want = 1 - (1 - abar) / (abar * SIGMA**2 + 1 - abar)
        assert row["t"] == t and row["abar"] == abar
        assert row["eps_mse"] == pytest.approx(want, rel=tol), t
        # With x_t fixed, x0 - x0_hat = (eps_hat - eps) / sqrt(snr).
        assert row["x0_mse"] == pytest.approx(row["eps_mse"] / row["snr"], rel=1e-4), t
        assert len(row["x0_channel_mean_errors"]) == 1
    # The Debias paper's point: eps error falls with t while the x0 error grows.
    assert rows[-1]["eps_mse"] < rows[0]["eps_mse"] and rows[-1]["x0_mse"] > rows[0]["x0_mse"]


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_timestep_analysis_converts_v_and_sample(prediction):
    schedule = NoiseSchedule.linear(1000, prediction_type=prediction)
    x0 = (MU + SIGMA * _randn(64, 1, 5, 3, seed=16)).float()
    eps_model = mmse_eps(schedule)
    wrapped = (as_v if prediction == "v_prediction" else as_sample)(schedule, eps_model)
    want = E.timestep_analysis(eps_model, schedule, x0, TIMESTEPS, prediction="epsilon")
    got = E.timestep_analysis(wrapped, schedule, x0, TIMESTEPS)  # the schedule's type
    for g, w in zip(got, want, strict=True):
        for key in ("eps_mse", "x0_mse", "x0_channel_mean_error"):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-12), (g["t"], key)


def _truth(x0, seed):
    return torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype)


def test_timestep_analysis_of_the_true_noise_is_zero():
    schedule = NoiseSchedule.cosine(200)
    x0 = _randn(12, 3, 4, 4, seed=17, dtype=torch.float32).clamp(-1, 1)
    noise = _truth(x0, seed=5)
    batch, calls = 5, []

    def oracle(x_t, t):  # the batches arrive in order, once per timestep
        lo = (len(calls) % 3) * batch
        calls.append(t)
        return noise[lo : lo + batch]

    rows = E.timestep_analysis(oracle, schedule, x0, seed=5, batch_size=batch)
    assert [r["t"] for r in rows] == sorted({round(i * 199 / 19) for i in range(20)})
    assert len(calls) == 3 * len(rows) and calls[0].dtype == torch.int64
    for r in rows:
        assert r["eps_mse"] == 0.0
        # x0_hat = (x_t - b eps) / a only carries the float32 rounding of x_t, over a.
        assert math.sqrt(r["x0_mse"]) <= 2**-24 * 8 / math.sqrt(r["abar"])

    def v_truth(x_t, t):
        abar = schedule.alphas_cumprod[t][:, None, None, None]
        return abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()

    for prediction, model in (("v_prediction", v_truth), ("sample", lambda x_t, t: x0)):
        rows = E.timestep_analysis(model, schedule, x0, prediction=prediction, seed=5)
        assert max(r["eps_mse"] for r in rows) < 1e-8, prediction
        assert max(r["x0_mse"] for r in rows) < 1e-8, prediction


def test_timestep_analysis_restores_train_mode_and_flags_undefined_x0():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(()))
            self.modes = []

        def forward(self, x, t):
            self.modes.append(self.training)
            return x * self.scale

    net = Net().train()
    zero_snr = NoiseSchedule.linear(50).rescale_zero_terminal_snr()
    rows = E.timestep_analysis(net, zero_snr, torch.zeros(4, 1, 2, 2), [0, 49])
    assert net.training and net.modes == [False, False]
    assert rows[1]["x0_mse"] is None and rows[0]["x0_mse"] is not None
    assert rows[0]["eps_mse"] == pytest.approx(1.0, rel=0.6)


def test_timestep_analysis_errors():
    schedule = NoiseSchedule.cosine(10)
    x0 = torch.zeros(3, 1, 2, 2)
    zeros = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="timesteps"):
        E.timestep_analysis(zeros, schedule, x0, [10])
    with pytest.raises(ValueError, match="prediction"):
        E.timestep_analysis(zeros, schedule, x0, prediction="x0")
    with pytest.raises(ValueError, match="model must return"):
        E.timestep_analysis(lambda x, t: x[:, :, :1], schedule, x0, [0])
    with pytest.raises(ValueError, match="x0"):
        E.timestep_analysis(zeros, schedule, torch.zeros(3, 4))


def test_write_timestep_analysis(tmp_path):
    schedule = NoiseSchedule.linear(100)
    x0 = (MU + SIGMA * _randn(16, 2, 3, 3, seed=18)).float()
    rows = E.timestep_analysis(mmse_eps(schedule), schedule, x0)
    E.write_timestep_analysis(rows, tmp_path / "t.csv", tmp_path / "t.png")
    with open(tmp_path / "t.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows)
    assert list(table[0]) == [
        *E._CSV_COLUMNS,
        "x0_channel_mean_error_c0",
        "x0_channel_mean_error_c1",
    ]
    assert float(table[3]["x0_mse"]) == pytest.approx(rows[3]["x0_mse"])
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


# ---- evaluate -----------------------------------------------------------------------------


def _zero_model(x, t):
    return torch.zeros_like(x)


KEYS = {
    "n_samples",
    "n_data",
    "image_shape",
    "seed",
    "prediction",
    "feature_net",
    "feature_space",
    "fd",
    "prdc",
    "channel_shift",
    "timesteps",
    "files",
}


def test_evaluate_end_to_end(tmp_path, one_thread):
    data, labels = two_class_images(200, seed=1)
    samples = (data[:60] + 0.1).clamp(-1, 1)
    report = E.evaluate(_zero_model, NoiseSchedule.linear(100), data, labels, samples, tmp_path)
    assert KEYS <= report.keys() and "fd_unavailable" not in report
    assert {p.name for p in tmp_path.iterdir()} == {
        "evaluation.json",
        "timesteps.csv",
        "timesteps.png",
    }
    assert json.loads((tmp_path / "evaluation.json").read_text()) == report
    assert report["feature_space"] == "feature_net"
    assert report["feature_net"]["held_out_accuracy"] > 0.8
    assert report["fd"] > 0
    assert report["prdc"]["n_real"] == report["prdc"]["n_fake"] == 60
    assert report["channel_shift"]["mean_shift"][0] > 0.05
    shares = report["class_proportions"]
    assert shares["data"] == [0.5, 0.5] and sum(shares["samples"]) == pytest.approx(1.0)
    assert shares["total_variation"] == pytest.approx(abs(shares["samples"][0] - 0.5))
    assert len(report["timesteps"]) == 20
    # A zero epsilon prediction misses all of eps: error 1 per value.
    assert all(r["eps_mse"] == pytest.approx(1.0, abs=0.05) for r in report["timesteps"])


def test_evaluate_with_a_given_extractor_and_unlabelled_data(tmp_path):
    data, _ = two_class_images(50, seed=2)
    samples = data[:20].flip(-1)
    extractor = lambda x: x.flatten(1)[:, :6] * 2  # noqa: E731
    report = E.evaluate(
        _zero_model,
        NoiseSchedule.linear(30),
        data,
        None,
        samples,
        tmp_path / "given",
        feature_net=extractor,
        k=3,
        timesteps=[0, 29],
    )
    want = E.frechet_distance(extractor(data), extractor(samples))
    assert report["fd"] == pytest.approx(want, rel=1e-9)
    assert report["feature_net"]["source"] == "given"
    assert report["class_proportions"] is None and report["class_proportions_unavailable"]

    unlabelled = torch.full((50,), -1)
    report = E.evaluate(
        _zero_model,
        NoiseSchedule.linear(30),
        data,
        unlabelled,
        samples,
        tmp_path / "none",
        k=3,
        timesteps=[0, 29],
    )
    assert report["fd"] is None and "labels" in report["fd_unavailable"]
    assert report["feature_space"] == report["prdc"]["space"] == "pixels"
    assert (tmp_path / "none" / "timesteps.png").is_file()

    report = E.evaluate(
        _zero_model,
        NoiseSchedule.linear(30),
        data,
        None,
        samples[:3],
        tmp_path / "few",
        k=3,
        timesteps=[0],
    )
    assert report["prdc"] is None and "k=3" in report["prdc_unavailable"]
    with pytest.raises(ValueError, match="samples must be shaped"):
        E.evaluate(_zero_model, NoiseSchedule.linear(30), data, None, data[:, :, :4], tmp_path)


def test_class_proportions_measure_majority_amplification(one_thread):
    images, labels = two_class_images(400, seed=5)
    net, accuracy = E.train_feature_net(images, labels, steps=150, seed=0)
    assert accuracy > 0.9
    # the data: 180 of class 0 and 20 of class 1 (90/10)
    data_labels = torch.cat((labels[labels == 0][:180], labels[labels == 1][:20]))
    fresh, fresh_labels = two_class_images(64, seed=6)
    samples = fresh[fresh_labels == 0]  # a model that only draws the majority class
    shares = E.class_proportions(net, samples, data_labels)
    assert shares["data"] == pytest.approx([0.9, 0.1])
    assert shares["majority"] == 0 and shares["samples"][0] >= 0.95
    assert shares["majority_shift"] == pytest.approx(shares["samples"][0] - 0.9)
    assert shares["total_variation"] == pytest.approx(shares["samples"][0] - 0.9)
    assert not net.training
    balanced = E.class_proportions(net, fresh, data_labels)
    assert balanced["majority_shift"] == pytest.approx(balanced["samples"][0] - 0.9)
    assert balanced["majority_shift"] < -0.3  # a balanced model under-represents the majority
    with pytest.raises(TypeError, match="classifier"):
        E.class_proportions(lambda x: x, samples, data_labels)
    with pytest.raises(ValueError, match="labels"):
        E.class_proportions(net, samples, torch.full((5,), -1))
    with pytest.raises(ValueError, match="samples"):
        E.class_proportions(net, samples[:, :, :, :0], data_labels)
