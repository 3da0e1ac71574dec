"""`debias score`: inputs in every format, the report, the figure, and errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import debias
from debias.pipeline.cli import main
from debias.pipeline.data import load_digits, load_samples

FAST = ["--resamples", "50", "--no-progress"]


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """Train: 200 digits; samples: 10 copies of training images + 20 held-out digits."""
    root = tmp_path_factory.mktemp("arrays")
    x = load_digits()[0].numpy()
    train, held = x[:200], x[1000:1020]
    rng = np.random.default_rng(0)
    samples = np.concatenate([train[:10] + 0.01 * rng.standard_normal((10, 1, 8, 8)), held])
    samples = samples.astype(np.float32)
    np.save(root / "train.npy", train)
    np.savez(root / "samples.npz", other=np.zeros(3), samples=samples)
    torch.save(torch.from_numpy(samples), root / "samples.pt")
    np.save(root / "train_b.npy", x[200:400])
    np.save(root / "samples_b.npy", (x[200:230] + 0.01).astype(np.float32))
    return root


def _report(out) -> dict:
    assert (out / "score.png").stat().st_size > 0
    return json.loads((out / "score.json").read_text())


def test_score_arrays(arrays, tmp_path, capsys):
    out = tmp_path / "a"
    samples = f"{arrays / 'samples.npz'}:samples"
    argv = ["score", "--samples", samples, "--train", str(arrays / "train.npy"), "--out", str(out)]
    assert main([*argv, "--k", "3", *FAST]) == 0
    report = _report(out)
    assert report["version"] == debias.__version__
    assert report["inputs"]["samples"]["shape"] == [30, 1, 8, 8]
    assert report["inputs"]["train"] == {"path": str(arrays / "train.npy"), "shape": [200, 1, 8, 8]}
    assert report["nearest"]["k"] == 3 and report["nearest"]["dim"] == 64
    assert report["gu"]["count"] == 10 and report["gu"]["threshold"] == pytest.approx(1 / 3)
    assert report["gu"]["ci"][0] <= report["gu"]["fraction"] <= report["gu"]["ci"][1]
    assert report["carlini"]["extracted_samples"] == list(range(10))
    assert set(report["somepalli"]) == {
        "metric",
        "threshold",
        "similarity",
        "fraction_above",
        "baseline",
    }
    assert report["most_memorized"][0]["sample"] < 10
    assert "model_b" not in report and "biased_generalization" not in report
    printed = capsys.readouterr().out
    assert "Gu et al." in printed and "score.json" in printed


def test_score_pt_and_two_models(arrays, tmp_path):
    out = tmp_path / "b"
    argv = [
        "score",
        "--samples",
        str(arrays / "samples.pt"),
        "--train",
        str(arrays / "train.npy"),
        "--samples-b",
        str(arrays / "samples_b.npy"),
        "--train-b",
        str(arrays / "train_b.npy"),
        "--out",
        str(out),
        "--threshold",
        "0.5",
        "--delta",
        "0.3",
        "--metric",
        "standardized",
    ]
    assert main(argv + FAST) == 0
    report = _report(out)
    assert report["gu"]["threshold"] == 0.5 and report["carlini"]["delta"] == 0.3
    assert report["somepalli"]["metric"] == "standardized"
    assert report["model_b"]["gu"]["fraction"] == 1.0  # B's samples copy train B
    split = report["biased_generalization"]["split"]
    assert split["fraction_own_b"] == 1.0 and split["metric"] == "standardized"
    assert set(report["inputs"]) == {"samples", "train", "samples_b", "train_b"}


def _write_images(folder, images, mode="L"):
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img, mode=mode).save(folder / f"{i:03d}.png")


def test_score_image_folders(tmp_path):
    x = ((load_digits()[0][:60, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    _write_images(tmp_path / "train", x[:50])
    _write_images(tmp_path / "samples", x[:5])  # exact copies
    loaded = load_samples(str(tmp_path / "train"), "--train")
    assert loaded.shape == (50, 1, 8, 8) and loaded.dtype == torch.float32
    torch.testing.assert_close(loaded[7, 0], torch.from_numpy(x[7]).float() / 127.5 - 1)
    out = tmp_path / "out"
    argv = ["score", "--samples", str(tmp_path / "samples"), "--train", str(tmp_path / "train")]
    assert main([*argv, "--out", str(out), *FAST]) == 0
    report = _report(out)
    assert report["inputs"]["samples"]["shape"] == [5, 1, 8, 8]
    assert report["carlini"]["fraction"] == 1.0


def test_rgb_images_and_sizes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
    _write_images(tmp_path / "rgb", rgb, mode="RGB")
    loaded = load_samples(str(tmp_path / "rgb"), "--samples")
    assert loaded.shape == (3, 3, 6, 5) and float(loaded.min()) >= -1 and float(loaded.max()) <= 1
    torch.testing.assert_close(loaded[1], torch.from_numpy(rgb[1]).permute(2, 0, 1) / 127.5 - 1)
    Image.fromarray(rgb[0, :4], mode="RGB").save(tmp_path / "rgb" / "999.png")
    with pytest.raises(ValueError, match=r"--samples: .*999\.png.* is 5x4 but"):
        load_samples(str(tmp_path / "rgb"), "--samples")


def test_bad_path_exits_2():
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "debias.pipeline.cli",
            "score",
            "--samples",
            "missing.npy",
            "--train",
            "x.npy",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip() == "debias score: error: --samples: no such file or folder: missing.npy"
    )


@pytest.mark.parametrize(
    "case, words",
    [
        ("npz-key", "no array 'nope'"),
        ("pt-dict", "one tensor"),
        ("shape", "--train: samples have shape"),
        ("suffix", "not .npy, .npz, .pt"),
        ("corrupt", "cannot read"),
        ("b-alone", "go together"),
        ("empty-folder", "holds no images"),
    ],
)
def test_errors_exit_2(arrays, tmp_path, capsys, case, words):
    samples, train = str(arrays / "samples.pt"), str(arrays / "train.npy")
    extra = []
    if case == "npz-key":
        samples = f"{arrays / 'samples.npz'}:nope"
    elif case == "pt-dict":
        torch.save({"x": torch.zeros(2, 2)}, tmp_path / "d.pt")
        samples = str(tmp_path / "d.pt")
    elif case == "shape":
        np.save(tmp_path / "t.npy", np.zeros((5, 1, 4, 4), dtype=np.float32))
        train = str(tmp_path / "t.npy")
    elif case == "suffix":
        (tmp_path / "t.csv").write_text("1,2\n")
        train = str(tmp_path / "t.csv")
    elif case == "corrupt":
        (tmp_path / "t.npy").write_bytes(b"not an array")
        train = str(tmp_path / "t.npy")
    elif case == "b-alone":
        extra = ["--samples-b", samples]
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        train = str(tmp_path / "empty")
    argv = ["score", "--samples", samples, "--train", train, "--out", str(tmp_path / "o"), *extra]
    assert main(argv + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("debias score: error:") and words in err and "\n" not in err


# ---- a user's mistake exits 2 on one line naming the flag; a bug keeps its traceback ----------


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["score", "--samples", "s.npy", "--train", "t.npy", "--threshold", "2"], "--threshold"),
        (["score", "--samples", "s.npy", "--train", "t.npy", "--delta", "nan"], "--delta"),
        (["score", "--samples", "s.npy", "--train", "t.npy", "--k", "0"], "--k"),
        (["score", "--samples", "s.npy"], "--train"),
        (["sample", "--ckpt", "c", "--steps", "0"], "--steps"),
        (["sample", "--ckpt", "c", "--device", "gpu7"], "--device"),
        (["sample", "--ckpt", "c", "--eta", "-1"], "--eta"),
        (["train", "--weighting", "nope"], "--weighting"),
        (["train", "--lr", "fast"], "--lr"),
        (["study", "depth-bias", "--seeds", "0"], "--seeds"),
        (["study", "depth-bias", "--max-cells", "-1"], "--max-cells"),
    ],
)
def test_bad_flag_values_exit_2_on_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"debias {argv[0]}: error: ") and words in line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--steps", "0"], "debias train: error: --steps must be at least 1, got 0"),
        (
            ["train", "--held-out", "0", "--monitor-every", "0"],
            "debias train: error: --held-out=0 leaves no held-out images",
        ),
        (["train", "--data", "missing.npy"], "debias train: error: --data: source 'missing.npy'"),
        (["train", "--resume", "missing"], "debias train: error: --resume: checkpoint: no "),
        (["sample", "--ckpt", "missing"], "debias sample: error: --ckpt: checkpoint: no such file"),
        (["evaluate", "--ckpt", "c", "--feature-weights", "no.pt"], "--feature-weights: no such"),
    ],
)
def test_checks_name_the_flag(tmp_path, monkeypatch, capsys, argv, expected):
    """The commands' own checks and the library's checks of a flag's value, mapped to it."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("debias ") and expected in line


def test_an_existing_run_names_the_flag(tmp_path, capsys):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "last.safetensors").write_bytes(b"")
    assert main(["train", "--out", str(tmp_path), "--name", "r"]) == 2
    assert _one_line(capsys.readouterr().err).startswith("debias train: error: --name: ")


@pytest.mark.parametrize("message", ["internal: boom", "k must be at most 2"])
def test_a_bug_propagates(arrays, tmp_path, monkeypatch, message):
    """A ValueError from inside is not a user's mistake, even one that names an argument no
    flag of the call is mapped to: it propagates."""
    import debias.memorization

    def broken(*args, **kwargs):
        raise ValueError(message)

    monkeypatch.setattr(debias.memorization, "memorization_report", broken)
    argv = ["score", "--samples", str(arrays / "samples.pt"), "--train", str(arrays / "train.npy")]
    with pytest.raises(ValueError, match=message):
        main([*argv, "--out", str(tmp_path), *FAST])


def test_a_bug_exits_1_with_its_traceback(arrays, tmp_path):
    code = (
        "import sys, debias.memorization as m\n"
        "def broken(*args, **kwargs):\n"
        "    raise ValueError('internal: boom')\n"
        "m.memorization_report = broken\n"
        "from debias.pipeline.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["score", "--samples", str(arrays / "samples.pt"), "--train", str(arrays / "train.npy")]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv, "--out", str(tmp_path), *FAST],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: internal: boom" in done.stderr
    assert "debias score: error" not in done.stderr


def test_score_data_defects_name_the_flag(arrays, tmp_path, capsys):
    bad = np.load(arrays / "train.npy")
    bad[3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    argv = ["score", "--samples", str(arrays / "samples.pt"), "--train", str(tmp_path / "nan.npy")]
    assert main([*argv, "--out", str(tmp_path / "o"), *FAST]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == "debias score: error: --train: database row 3 contains NaN or infinity"
    small = ["score", "--samples", str(arrays / "samples.pt"), "--train", str(arrays / "train.npy")]
    assert main([*small, "--k", "201", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "--k 201 needs --train to hold at least 201" in capsys.readouterr().err
