"""`debias train` beyond fixed-variance DDPM: rectified flow, learned variance (the hybrid
loss), the colored digits, TensorBoard logging, and a training step that reads nothing back
from the device between log steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_pipeline import TINY

import debias
from debias.pipeline import train as train_mod
from debias.pipeline.data import PALETTE, colored_digits, load_data
from debias.pipeline.train import TrainConfig, Trainer, load_model, train

QUIET = dict(eval_every=0, sample_every=0, monitor_every=0, checkpoint_every=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(family="edm"), "family"),
        (dict(family="flow", learn_sigma=True), "learn_sigma"),
        (dict(shift=3.0), "shift"),
        (dict(family="flow", shift=0.0), "shift"),
        (dict(timestep_sampling="logit_normal"), "timestep_sampling"),
        (dict(family="flow", prediction="epsilon"), "prediction"),
        (dict(family="flow", schedule="linear"), "schedule"),
        (dict(weighting="cosmap"), "weighting"),
        (dict(report_to="wandb"), "report_to"),
        (dict(family="flow", sample_method="ddim"), "sample_method"),
    ],
)
def test_family_options_are_checked_together(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig(**bad)


def test_family_defaults_are_resolved_and_stored():
    flow = TrainConfig(family="flow")
    assert (flow.schedule, flow.prediction) == ("flow_matching", "flow")
    ddpm = TrainConfig()
    assert (ddpm.schedule, ddpm.prediction) == ("linear", "epsilon")
    assert TrainConfig.from_dict(flow.to_dict()) == flow


# ---- flow matching ----------------------------------------------------------------------------


def test_flow_training_uses_the_flow_schedule_and_resumes_exactly(tmp_path):
    common = dict(
        TINY,
        **{**QUIET, "eval_every": 4},
        family="flow",
        shift=3.0,
        timestep_sampling="logit_normal",
        steps=8,
        log_every=1,
    )
    train(TrainConfig(**{**common, "checkpoint_every": 4}), tmp_path / "full", progress=False)
    train(TrainConfig(**{**common, "steps": 4}), tmp_path / "cut", progress=False)
    train(TrainConfig(**common), tmp_path / "cut", resume=True, progress=False)
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r.get("loss") for r in full] == [r.get("loss") for r in cut]
    assert all(math.isfinite(r["held_out_loss"]) for r in full if "held_out_loss" in r)
    _, schedule, meta = load_model(tmp_path / "full")
    reference_schedule = debias.NoiseSchedule.flow_matching(100, shift=3.0)
    assert schedule.family == "flow" and torch.equal(schedule.sigmas, reference_schedule.sigmas)
    assert meta["config"]["timestep_sampling"] == "logit_normal"


def test_flow_step_is_the_sd3_loss_lines(tmp_path):
    """One flow step's per-sample loss equals the SD3 script's lines on the same draw."""
    config = TrainConfig(**TINY, **QUIET, family="flow", weighting="cosmap", steps=1)
    trainer = Trainer(config, tmp_path, progress=False)
    member = trainer.members[0]
    x0 = member.images[:8]
    gen = torch.Generator().manual_seed(3)
    t = debias.sample_timesteps(8, trainer.schedule, "uniform", generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t, _ = debias.add_noise(x0, t, trainer.schedule, noise=noise)
    out = member.model(x_t, t)
    got = trainer._losses(out, noise, x0, x_t, t, "cosmap")
    sigma = (t / 100.0).double().view(-1, 1, 1, 1)
    weight = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    want = (weight * (out.double() - (noise - x0).double()) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ---- learned variance -------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_learned_variance_is_the_hybrid_loss(tmp_path, prediction):
    """fused_loss on the first C channels + vb(last C, mean detached) x T/1000; the vb term
    sends no gradient into the mean channels."""
    from debias.pipeline.variance import vb_loss

    config = TrainConfig(**TINY, **QUIET, learn_sigma=True, prediction=prediction, steps=1)
    trainer = Trainer(config, tmp_path, progress=False)
    member = trainer.members[0]
    assert member.model.out_channels == 2
    x0 = member.images[:7]
    t = torch.tensor([0, 1, 5, 33, 50, 98, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_t, _ = debias.add_noise(x0, t, trainer.schedule, noise=noise)
    out = torch.randn(7, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    out.requires_grad_(True)
    got = trainer._losses(out, noise, x0, x_t, t, "debias")

    mean = out[:, :1]
    abar = trainer.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    if prediction == "epsilon":
        target = noise.double()
    else:  # diffusers' get_velocity
        target = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()
    weight = debias.loss_weight(t, trainer.schedule, "debias", prediction=prediction)
    mse = ((mean.double() - target.double()) ** 2).flatten(1).mean(1) * weight.double()
    vb = vb_loss(out[:, 1:], out[:, :1], x0, x_t, t, trainer.schedule, prediction)
    torch.testing.assert_close(got.double(), mse + vb.double() * 0.1, rtol=1e-5, atol=1e-6)

    (grad,) = torch.autograd.grad(got.sum(), out)
    (grad_mse,) = torch.autograd.grad(mse.sum(), out)
    torch.testing.assert_close(grad[:, :1], grad_mse[:, :1], rtol=1e-5, atol=1e-7)
    assert grad[:, 1:].abs().sum() > 0


def test_learned_variance_trains_samples_and_resumes(tmp_path):
    common = dict(
        TINY,
        learn_sigma=True,
        steps=6,
        log_every=1,
        eval_every=3,
        sample_every=6,
        monitor_every=0,
        checkpoint_every=3,
    )
    train(TrainConfig(**common), tmp_path / "full", progress=False)
    train(TrainConfig(**{**common, "steps": 3}), tmp_path / "cut", progress=False)
    train(TrainConfig(**common), tmp_path / "cut", resume=True, progress=False)
    assert [r.get("loss") for r in _rows(tmp_path / "full")] == [
        r.get("loss") for r in _rows(tmp_path / "cut")
    ]
    assert (tmp_path / "full" / "samples" / "step_0000006.png").is_file()
    model, _, _ = load_model(tmp_path / "full")
    assert model.out_channels == 2 * model.in_channels


# ---- data -------------------------------------------------------------------------------------


def test_colored_digits_are_the_digits_inked_from_the_palette():
    images, labels, colours = colored_digits()
    gray = load_data("digits")
    assert images.shape == (1797, 3, 8, 8) and images.dtype == torch.float32
    assert torch.equal(labels, gray.labels)
    assert images.min() >= -1 and images.max() <= 1
    ink = (gray.images + 1) / 2
    rgb = torch.tensor(PALETTE)[colours]
    torch.testing.assert_close(images, 2 * ink * rgb[:, :, None, None] - 1)
    counts = torch.bincount(colours, minlength=len(PALETTE))
    assert counts.min() > 1797 / len(PALETTE) / 2  # every colour well represented
    again, _, _ = colored_digits()
    assert torch.equal(images, again)  # fixed seed: the same set everywhere
    data = load_data("colored-digits", size=16)
    assert data.images.shape == (1797, 3, 16, 16) and data.name == "colored-digits"


# ---- logging and the hot path -----------------------------------------------------------------


def test_report_to_tensorboard_writes_scalars_and_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(
        **TINY,
        steps=4,
        log_every=2,
        eval_every=2,
        sample_every=4,
        monitor_every=0,
        checkpoint_every=0,
        report_to="tensorboard",
    )
    train(config, tmp_path, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/held_out_loss", "train/lr", "train/loss_t0"} <= set(
        tags["scalars"]
    )
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in _rows(tmp_path) if "loss" in r])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert "samples" in tags["images"]
    assert (tmp_path / "metrics.csv").is_file()  # the CSV stays


def test_the_step_reads_nothing_back_between_log_steps(tmp_path, monkeypatch):
    """No `.item()` / `.tolist()` / `bool(tensor)` from the trainer between log steps: the
    statistics and the NaN check stay on the device until the log step reads them."""
    config = TrainConfig(**TINY, **QUIET, steps=12, log_every=6)
    trainer = Trainer(config, tmp_path, progress=False)
    reads: list[int] = []
    source = Path(train_mod.__file__).resolve()

    def spy(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            import inspect

            caller = inspect.stack()[1]
            if Path(caller.filename).resolve() == source:
                reads.append(trainer.step)
            return real(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    trainer.run()
    assert reads and set(reads) <= {6, 12}, f"device reads at steps {sorted(set(reads))}"


# ---- evaluation of the new models -------------------------------------------------------------


@pytest.mark.parametrize("family", ["ddpm", "flow"])
def test_timestep_analysis_reads_flow_and_learned_variance_models(family):
    """An oracle model (it knows the noise) gives zero eps and x0 errors on a flow schedule
    and through 2C-channel (learned-variance) outputs."""
    from debias.pipeline.evaluate import timestep_analysis

    x0 = load_data("digits").images[:9]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=x0.dtype)
    if family == "flow":
        schedule = debias.NoiseSchedule.flow_matching(100, shift=3.0)

        def oracle(x_t, t):
            return noise - x0  # u = eps - x0

    else:
        schedule = debias.NoiseSchedule.linear(100)

        def oracle(x_t, t):
            return torch.cat([noise, torch.full_like(noise, 0.3)], 1)  # eps, then variance

    rows = timestep_analysis(oracle, schedule, x0, [0, 17, 50, 99], seed=4)
    for row in rows:
        assert row["eps_mse"] < 1e-10 and row["x0_mse"] < 1e-8, row
