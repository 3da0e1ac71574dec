"""`debias train` end to end on tiny configurations: files written, exact resume, Ctrl-C, NaN
stop, broken checkpoints, DDP with gloo, and the monitor on a run forced to memorize."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from debias.pipeline import checkpoint as ckpt
from debias.pipeline import cli
from debias.pipeline.train import NonFiniteLoss, TrainConfig, Trainer, load_model, train

# A UNet small enough for dozens of steps a second on a 2-core CPU.
TINY = dict(
    base_channels=16, channel_mult=[1, 2], attention_resolutions=[4], num_timesteps=100,
    batch_size=16, warmup=5, sample_steps=5, monitor_samples=16, eval_size=64,
)  # fmt: skip
TINY_ARGS = [
    "--base-channels", "16", "--channel-mult", "1,2", "--attention-resolutions", "4",
    "--num-timesteps", "100", "--batch-size", "16", "--warmup", "5", "--sample-steps", "5",
    "--monitor-samples", "16", "--eval-size", "64", "--no-progress",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(run: Path, name: str = "metrics") -> list[dict]:
    return [json.loads(line) for line in (run / f"{name}.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run) if "loss" in r}


def test_cli_train_writes_a_complete_run(tmp_path, capsys):
    args = [
        "train",
        "--out",
        str(tmp_path),
        "--name",
        "r",
        "--steps",
        "20",
        "--log-every",
        "5",
        "--eval-every",
        "10",
        "--sample-every",
        "10",
        "--checkpoint-every",
        "10",
        "--monitor-every",
        "10",
        *TINY_ARGS,
    ]
    assert cli.main(args) == 0
    run = tmp_path / "r"
    expected = [
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
        "monitor.csv",
        "monitor.json",
        "monitor.png",
        "summary.json",
        "samples/step_0000010.png",
        "samples/step_0000020.png",
        "checkpoints/last.safetensors",
        "checkpoints/step_0000010.safetensors",
        "checkpoints/step_0000020.safetensors",
    ]
    for name in expected:
        assert (run / name).is_file(), name
    rows = _rows(run)
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20]
    held = [r for r in rows if "held_out_loss" in r]
    assert [r["step"] for r in held] == [10, 20]
    assert all(torch.isfinite(torch.tensor(r["held_out_loss"])) for r in held)
    row = rows[-1]
    assert set(f"loss_t{b}" for b in range(10)) <= set(row) and row["img_per_s"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 20
    assert summary["held_out_loss_min"]["step"] in (10, 20)
    assert "wrote" in capsys.readouterr().out

    model, schedule, meta = load_model(run)
    assert meta["step"] == 20 and schedule.num_timesteps == 100
    assert not model.training

    grid = tmp_path / "grid.png"
    assert (
        cli.main(
            [
                "sample",
                "--ckpt",
                str(run),
                "--steps",
                "4",
                "--n",
                "9",
                "--out",
                str(grid),
                "--no-progress",
            ]
        )
        == 0
    )
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = torch.from_numpy(__import__("numpy").load(grid.with_suffix(".npz"))["samples"])
    assert first.shape == (9, 1, 8, 8) and torch.isfinite(first).all()
    assert (
        cli.main(
            [
                "sample",
                "--ckpt",
                str(run),
                "--steps",
                "4",
                "--n",
                "9",
                "--out",
                str(grid),
                "--no-progress",
            ]
        )
        == 0
    )
    again = torch.from_numpy(__import__("numpy").load(grid.with_suffix(".npz"))["samples"])
    assert torch.equal(first, again), "the same seed must give the same samples"


def test_resume_gives_the_uninterrupted_loss_sequence(tmp_path):
    common = dict(
        TINY, steps=16, log_every=1, eval_every=4, sample_every=0, monitor_every=0, dropout=0.1
    )
    train(TrainConfig(**common, checkpoint_every=8), tmp_path / "full", progress=False)
    train(TrainConfig(**{**common, "steps": 8}), tmp_path / "cut", progress=False)
    train(TrainConfig(**common), tmp_path / "cut", resume=True, progress=False)
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert list(full) == list(range(1, 17)) and list(cut) == list(range(1, 17))
    assert full == cut, "losses after a resume must equal those of the uninterrupted run"
    held = lambda run: [r["held_out_loss"] for r in _rows(run) if "held_out_loss" in r]  # noqa: E731
    assert held(tmp_path / "full") == held(tmp_path / "cut")
    a, _ = ckpt.load_checkpoint(tmp_path / "full")
    b, _ = ckpt.load_checkpoint(tmp_path / "cut")
    for name in a:
        if name.startswith(("model.", "ema.", "optim.")):
            assert torch.equal(a[name], b[name]), name


def test_two_model_run_resumes_exactly(tmp_path):
    common = dict(
        TINY, steps=6, log_every=1, eval_every=3, sample_every=0, monitor_every=3, two_models=True
    )
    train(TrainConfig(**common), tmp_path / "full", progress=False)
    train(TrainConfig(**{**common, "steps": 3}), tmp_path / "cut", progress=False)
    train(TrainConfig(**common), tmp_path / "cut", resume=True, progress=False)
    key = lambda run: [(r["step"], r["model"], r.get("loss")) for r in _rows(run)]  # noqa: E731
    assert key(tmp_path / "full") == key(tmp_path / "cut")
    assert {r["model"] for r in _rows(tmp_path / "full")} == {"a", "b"}
    monitor = _rows(tmp_path / "full", "monitor")
    assert [r["step"] for r in monitor] == [3, 6]
    assert all("paired_distance_median" in r for r in monitor)
    assert _rows(tmp_path / "cut", "monitor") == monitor
    with pytest.raises(ValueError, match="member"):
        load_model(tmp_path / "full")
    load_model(tmp_path / "full", member="b")


def test_ctrl_c_saves_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "debias.pipeline.cli",
        "train",
        "--out",
        str(tmp_path),
        "--name",
        "run",
        "--steps",
        "100000",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--monitor-every",
        "0",
        "--checkpoint-every",
        "0",
        *TINY_ARGS,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and len(_rows(run)) >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in out and "--resume" in out
    _, meta = ckpt.load_checkpoint(run)
    stopped = meta["step"]
    assert stopped >= 3 and max(_losses(run)) == stopped
    config = TrainConfig.from_dict({**meta["config"], "steps": stopped + 3})
    train(config, run, resume=True, progress=False)
    assert list(_losses(run)) == list(range(1, stopped + 4))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = TrainConfig(
        **TINY, steps=12, checkpoint_every=5, eval_every=0, sample_every=0, monitor_every=0
    )
    trainer = Trainer(config, tmp_path, progress=False)
    model = trainer.members[0].model
    forward = model.forward
    calls = {"n": 0}

    def poisoned(x, t, *args, **kwargs):
        calls["n"] += 1
        out = forward(x, t, *args, **kwargs)
        return out * float("nan") if calls["n"] == 8 else out

    monkeypatch.setattr(model, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"step 8.*last good checkpoint"):
        trainer.run()
    _, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["step"] == 5
    tensors, _ = ckpt.load_checkpoint(tmp_path)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_nan_stop_through_the_cli_exits_1(tmp_path, monkeypatch, capsys):
    import debias

    real = debias.fused_loss

    def nan_loss(*args, **kwargs):
        return real(*args, **kwargs) * float("nan")

    monkeypatch.setattr(debias, "fused_loss", nan_loss)
    code = cli.main(["train", "--out", str(tmp_path), "--name", "n", "--steps", "3", *TINY_ARGS])
    assert code == 1
    err = capsys.readouterr().err
    assert "nan" in err and "no checkpoint had been written" in err


def test_broken_and_mismatched_checkpoints_are_clear_errors(tmp_path, capsys):
    config = TrainConfig(**TINY, steps=2, eval_every=0, sample_every=0, monitor_every=0)
    train(config, tmp_path / "ok", progress=False)
    last = tmp_path / "ok" / "checkpoints" / "last.safetensors"

    with pytest.raises(ValueError, match="already holds a checkpoint"):
        Trainer(config, tmp_path / "ok", progress=False)
    with pytest.raises(ValueError, match="base_channels"):
        Trainer(TrainConfig(**{**TINY, "base_channels": 32}), tmp_path / "ok", resume=True)
    assert cli.main(["train", "--resume", str(tmp_path / "ok"), "--lr", "0.5"]) == 2
    assert "lr" in capsys.readouterr().err

    broken = tmp_path / "broken" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "last.safetensors").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(config, tmp_path / "broken", resume=True)
    (broken / "last.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(broken / "last.safetensors")
    with pytest.raises(ValueError, match=r"no last\.safetensors"):
        load_model(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(broken / "other.safetensors"))
    with pytest.raises(ValueError, match="not a debias-checkpoint"):
        load_model(broken / "other.safetensors")


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(path, {"w": torch.ones(3)}, {"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"w": torch.zeros(3)}, {"step": 2})
    tensors, meta = ckpt.load_checkpoint(path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(steps=0), "steps"),
        (dict(weighting="nope"), "weighting"),
        (dict(held_out=1.0), "held_out"),
        (dict(split="c"), "split"),
        (dict(two_models=True, split="a"), "two_models"),
        (dict(batch_size=True), "batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(held_out=0.0), "held_out=0"),
    ],
)
def test_config_errors_name_the_field(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig(**bad)


def test_train_size_larger_than_the_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="train_size"):
        Trainer(TrainConfig(**TINY, train_size=10**6), tmp_path)


def _monitor_run(tmp_path: Path, name: str, **overrides) -> dict:
    config = TrainConfig(
        **{
            **TINY,
            "num_timesteps": 1000,
            "steps": 600,
            "lr": 2e-3,
            "log_every": 100,
            "eval_every": 200,
            "sample_every": 0,
            "checkpoint_every": 0,
            "monitor_every": 200,
            "monitor_samples": 32,
            "sample_steps": 20,
            **overrides,
        }
    )
    return train(config, tmp_path / name, progress=False)


@pytest.mark.slow
def test_monitor_flags_a_run_forced_to_memorize(tmp_path):
    memorizing = _monitor_run(tmp_path, "four", train_size=4)["monitor"]
    generalizing = _monitor_run(tmp_path, "all")["monitor"]
    rows_m = _rows(tmp_path / "four", "monitor")
    rows_g = _rows(tmp_path / "all", "monitor")
    assert memorizing["drift_step"] is not None
    assert rows_m[-1]["gu_memorized_fraction"] >= 0.5
    assert generalizing["drift_step"] is None
    assert rows_g[-1]["gu_memorized_fraction"] <= 0.1
    assert rows_m[-1]["nn_distance_median"] < rows_g[-1]["nn_distance_median"]


def test_stop_on_memorization_stops_the_run(tmp_path):
    config = TrainConfig(
        **{
            **TINY,
            "steps": 400,
            "train_size": 2,
            "lr": 3e-3,
            "log_every": 50,
            "eval_every": 50,
            "monitor_every": 50,
            "sample_every": 0,
            "checkpoint_every": 0,
            "sample_steps": 10,
            "stop_on_memorization": True,
        }
    )
    summary = train(config, tmp_path / "stop", progress=False)
    assert summary["status"].startswith("memorization detected")
    assert summary["step"] < 400
    _, meta = ckpt.load_checkpoint(tmp_path / "stop")
    assert meta["step"] == summary["step"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_gloo_and_two_processes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "debias.pipeline.cli",
        "train",
        "--out",
        str(tmp_path),
        "--name",
        "ddp",
        "--steps",
        "6",
        "--log-every",
        "2",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        "--monitor-every",
        "3",
        "--sample-every",
        "3",
        "--device",
        "cpu",
        *TINY_ARGS,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ONE_THREAD, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "ddp"
    rows = _rows(run)
    assert [r["step"] for r in rows if "loss" in r] == [2, 3, 4, 6]
    assert all(r["img_per_s"] > 0 for r in rows if "loss" in r)
    tensors, meta = ckpt.load_checkpoint(run)
    assert meta["world"] == 2 and meta["step"] == 6
    assert {"rng.gen.-.0", "rng.gen.-.1"} <= set(tensors)
    assert not torch.equal(tensors["rng.gen.-.0"], tensors["rng.gen.-.1"])
    assert [r["step"] for r in _rows(run, "monitor")] == [3, 6]


def test_cli_evaluate_and_two_model_sampling(tmp_path, capsys):
    args = [
        "train",
        "--out",
        str(tmp_path),
        "--name",
        "ab",
        "--steps",
        "4",
        "--two-models",
        "--bf16",
        "--eval-every",
        "0",
        "--monitor-every",
        "0",
        "--sample-every",
        "0",
        *TINY_ARGS,
    ]
    assert cli.main(args) == 0
    run = tmp_path / "ab"
    assert (run / "checkpoints" / "last.safetensors").is_file()
    grid = tmp_path / "a.png"
    base = ["sample", "--ckpt", str(run), "--steps", "3", "--n", "4", "--no-progress"]
    assert cli.main([*base, "--out", str(grid)]) == 2
    assert "member" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(grid), "--member", "a"]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "b.png"), "--member", "b"]) == 0
    import numpy as np

    a = np.load(grid.with_suffix(".npz"))["samples"]
    b = np.load(tmp_path / "b.npz")["samples"]
    assert a.shape == b.shape == (4, 1, 8, 8) and not np.array_equal(a, b)

    out = tmp_path / "eval"
    assert (
        cli.main(
            [
                "evaluate",
                "--ckpt",
                str(run),
                "--member",
                "b",
                "--n",
                "24",
                "--steps",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n_samples"] == 24 and report["fd"] is not None and report["fd"] >= 0
    assert set(report["prdc"]) >= {"precision", "recall", "density", "coverage"}
    assert len(report["channel_shift"]["mean_shift"]) == 1
    assert len(report["class_proportions"]["data"]) == 10
    rows = (out / "timesteps.csv").read_text().splitlines()
    assert rows[0].startswith("t,") and len(rows) > 5
    printed = capsys.readouterr().out
    assert "Fréchet distance" in printed and "class shares" in printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_training_on_a_gpu_with_bf16_autocast(tmp_path, prediction):
    config = TrainConfig(
        **{
            **TINY,
            "steps": 12,
            "log_every": 1,
            "eval_every": 6,
            "monitor_every": 6,
            "sample_every": 6,
            "checkpoint_every": 6,
            "prediction": prediction,
        }
    )
    cut = {**config.to_dict(), "steps": 6}
    trainer = Trainer(TrainConfig(**cut), tmp_path, device="cuda", progress=False)
    assert trainer.bf16 and next(trainer.members[0].model.parameters()).is_cuda
    trainer.run()
    summary = train(config, tmp_path, resume=True, device="cuda", progress=False)
    assert summary["status"] == "completed" and summary["step"] == 12
    losses = _losses(tmp_path)
    assert list(losses) == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    model, schedule, _ = load_model(tmp_path)
    from debias.pipeline.sampling import sample

    images = sample(model.cuda(), schedule, (8, 1, 8, 8), steps=5, generator=0)
    assert images.is_cuda and torch.isfinite(images).all()


def test_prepare_data_composes_the_splits():
    from debias.pipeline.train import prepare_data

    (train_,), held = prepare_data(TrainConfig(classes=[3, 8], proportions=[0.9, 0.1]))
    counts = torch.bincount(torch.cat((train_.labels, held.labels)), minlength=9)
    total = int(counts.sum())
    assert total == counts[3] + counts[8] and abs(counts[3] / total - 0.9) <= 1 / total
    assert len(held) == round(0.1 * total)
    a, b = prepare_data(TrainConfig(two_models=True))[0]
    (only_a,), _ = prepare_data(TrainConfig(split="a"))
    assert torch.equal(a.images, only_a.images) and len(a) == len(b)
    (gmm,), held = prepare_data(TrainConfig(data="gmm", train_size=7))
    assert len(gmm) == 7 and gmm.images.shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="proportions"):
        prepare_data(TrainConfig(classes=[1, 2, 3], proportions=[0.5, 0.5]))
