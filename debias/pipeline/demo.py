"""`debias demo`: the loss side of diffusion training on the bundled digits, end to end.

Writes to ``out_dir``: weights.png (every weighting per target), noising.png (one digit
noised across t), loss.png + metrics.csv (a small epsilon network trained with the fused
loss), and summary.json (agreement with the reference loss and per-step timings).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import debias
from debias import reference
from debias.pipeline.data import load_digits


class TinyEpsNet(nn.Module):
    """A small convolutional epsilon-predictor with a sinusoidal timestep embedding."""

    def __init__(self, channels: int = 1, width: int = 48, num_timesteps: int = 1000):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.embed = nn.Sequential(nn.Linear(32, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
            for _ in range(3)
        )
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(1e4) * torch.arange(16, device=x.device) / 16)
        angle = t.float()[:, None] * freqs[None]
        emb = self.embed(torch.cat((angle.sin(), angle.cos()), dim=1))[:, :, None, None]
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


def run_demo(
    out_dir: str | Path = "runs/demo",
    steps: int = 400,
    batch_size: int = 128,
    weighting: str = "debias",
    seed: int = 0,
) -> dict:
    """Runs the demonstration and returns its summary (also written as summary.json)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    images, _ = load_digits()
    schedule = debias.NoiseSchedule.linear(1000)

    _plot_weights(schedule, out / "weights.png")
    _plot_noising(images[:1], schedule, out / "noising.png")
    agreement = _check_against_reference(images[:batch_size], schedule, weighting)
    history = _train(images, schedule, weighting, steps, batch_size, out / "metrics.csv")
    _plot_loss(history, weighting, out / "loss.png")
    timing = _time_loss_side(images[:batch_size], schedule, weighting)

    summary = {
        "data": f"sklearn digits {tuple(images.shape)}",
        "schedule": repr(schedule),
        "weighting": weighting,
        "steps": steps,
        "final_loss": history[-1][1],
        "reference_agreement": agreement,
        "loss_side_ms": timing,
        "files": sorted({p.name for p in out.iterdir()} | {"summary.json"}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _train(images, schedule, weighting, steps, batch_size, csv_path):
    model = TinyEpsNet(num_timesteps=schedule.num_timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "unweighted_mse"])
        bar = tqdm(range(1, steps + 1), desc=f"training ({weighting})", unit="step")
        for step in bar:
            x0 = images[torch.randint(0, images.shape[0], (batch_size,))]
            t = torch.randint(0, schedule.num_timesteps, (batch_size,))
            x_t, noise = debias.add_noise(x0, t, schedule)
            pred = model(x_t, t)
            loss = debias.fused_loss(pred, noise, t, schedule, weighting)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                mse = debias.fused_loss(pred, noise, t, schedule, "constant").item()
            history.append((step, loss.item(), mse))
            writer.writerow(history[-1])
            bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{mse:.4f}")
    return history


def _check_against_reference(x0, schedule, weighting) -> dict:
    """Max relative difference of the fused loss and gradient from the reference."""
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],))
    _, noise = debias.add_noise(x0, t, schedule)
    eps = noise.materialize()
    pred = torch.randn_like(x0)
    a, b = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    fused = debias.fused_loss(a, noise, t, schedule, weighting)
    fused.backward()
    ref = reference.noise_loss(b, eps, t, debias.weight_table(schedule, weighting).float())
    ref.backward()
    return {
        "loss_rel_diff": abs(fused.item() - ref.item()) / abs(ref.item()),
        "grad_max_rel_diff": ((a.grad - b.grad).abs().max() / b.grad.abs().max()).item(),
    }


def _time_loss_side(x0, schedule, weighting, repeats: int = 30) -> dict:
    """Median ms of noising + loss + backward, reference code against the fused ops."""
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],))
    weights = debias.weight_table(schedule, weighting).float()
    abar = schedule.alphas_cumprod.float()
    pred = torch.randn_like(x0, requires_grad=True)

    def eager():
        noise = torch.randn_like(x0)
        reference.add_noise(x0, t, abar, noise)
        reference.noise_loss(pred, noise, t, weights).backward()

    def fused():
        _, noise = debias.add_noise(x0, t, schedule)
        debias.fused_loss(pred, noise, t, schedule, weighting).backward()

    result = {}
    for name, fn in (("reference", eager), ("fused", fused)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        result[name] = sorted(times)[repeats // 2]
    return result


def _plot_weights(schedule, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.arange(schedule.num_timesteps)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, prediction in zip(axes, ("epsilon", "v_prediction", "sample"), strict=False):
        for name, label in (
            ("constant", "constant"),
            ("debias", "debias 1/sqrt(snr)"),
            ("p2", "p2 (k=1, gamma=1)"),
            ("min_snr", "min_snr (gamma=5)"),
        ):
            w = debias.weight_table(schedule, name, prediction)
            ax.plot(t.numpy(), w.clamp(min=1e-8).numpy(), label=label)
        ax.set_yscale("log")
        ax.set_title(f"prediction = {prediction}")
        ax.set_xlabel("timestep t")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss weight (same objective in every panel)")
    axes[0].legend()
    fig.suptitle(f"Weightings on {schedule!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_noising(x0, schedule, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [0, 100, 250, 400, 600, 800, 999]
    t = torch.tensor(steps)
    x_t, _ = debias.add_noise(x0.expand(len(steps), -1, -1, -1).contiguous(), t, schedule)
    fig, axes = plt.subplots(1, len(steps), figsize=(1.6 * len(steps), 2))
    for ax, img, step in zip(axes, x_t, steps, strict=False):
        ax.imshow(img[0].numpy(), cmap="gray", vmin=-2, vmax=2)
        ax.set_title(f"t={step}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_loss(history, weighting, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss, mse = zip(*history, strict=False)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, label=f"{weighting}-weighted loss (optimised)", alpha=0.8)
    ax.plot(steps, mse, label="unweighted epsilon MSE", alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
