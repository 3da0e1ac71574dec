"""The package's figures, all of them: each draws the results of one part of the package and
writes a PNG. matplotlib (the pipeline extra) is imported when a figure is drawn,
and only through its object interface (Figure + the Agg canvas): no pyplot, no global state,
no backend switch, so drawing is safe from any thread and inside a user's own matplotlib
session.

    plot_score             debias score: Gu et al.'s ratio histogram and the closest pairs
    plot_monitor           MemorizationMonitor.plot: loss and memorization measures over steps
    plot_timestep_analysis write_timestep_analysis: eps and x0 MSE against t

debias.pipeline.study draws its figures (FD against steps, majority share against depth, the
biased-generalization curves) beside the aggregates they show, on this module's `new_figure`
and `save_figure`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "new_figure",
    "plot_monitor",
    "plot_score",
    "plot_timestep_analysis",
    "save_figure",
]


def new_figure(figsize: tuple[float, float], dpi: int = 100) -> Any:
    """A matplotlib Figure ``figsize`` inches wide and high on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike, dpi: int) -> None:
    """Lay out and write ``fig`` as a PNG, creating the parent folder."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=dpi)


# ---- debias score -------------------------------------------------------------------------


def plot_score(
    path: str | os.PathLike,
    samples: torch.Tensor,
    train: torch.Tensor,
    results: dict[str, Any],
    threshold: float,
) -> None:
    """The histogram of Gu et al.'s d1/d2 ratio with the threshold, and (for image-shaped
    samples: [H, W], or [C, H, W] with C = 1 or 3) the six samples of lowest ratio beside
    their nearest training images, each pair on one grey or colour scale.

    Args:
        samples: ``[n, ...]`` the scored samples; ``train``: ``[m, ...]`` the training set.
        results: :func:`debias.memorization.memorization_report`'s results (``"gu"`` is read).
        threshold: the ratio threshold the scores used.
    """
    gu = results["gu"]
    ratio = gu.ratio.cpu().numpy()
    shape = tuple(samples.shape[1:])
    showable = len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))
    pairs = min(6, len(ratio)) if showable else 0
    fig = new_figure((max(8, 2.0 * pairs), 6.5 if pairs else 3.5))
    grid = fig.add_gridspec(
        2 if pairs else 1, max(1, 2 * pairs), height_ratios=[2, 1.3][: 2 if pairs else 1]
    )
    ax = fig.add_subplot(grid[0, :])
    ax.hist(ratio, bins=min(50, max(10, len(ratio) // 5)), range=(0, 1), color="tab:blue")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("d1 / d2 (nearest over second-nearest training image)")
    ax.set_ylabel("samples")
    ax.set_title(f"memorized fraction {gu.fraction:.3f} (Gu et al. ratio < {threshold:.3g})")
    ax.legend()
    order = gu.ratio.cpu().argsort(stable=True)[:pairs].tolist()
    for col, i in enumerate(order):
        j = int(gu.neighbours.indices[i, 0])
        pair = [samples[i].detach().float().cpu(), train[j].detach().float().cpu()]
        lo = min(float(p.min()) for p in pair)
        span = max(float(p.max()) for p in pair) - lo or 1.0
        for side, (img, title) in enumerate(zip(pair, (f"sample {i}", f"train {j}"), strict=True)):
            img = (img - lo) / span
            img = img[0] if img.dim() == 3 and img.shape[0] == 1 else img
            img = img.permute(1, 2, 0) if img.dim() == 3 else img
            a = fig.add_subplot(grid[1, 2 * col + side])
            a.imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None, vmin=0, vmax=1)
            a.set_title(title + (f"\nratio {ratio[i]:.3f}" if side == 0 else "\n"), fontsize=8)
            a.axis("off")
    save_figure(fig, path, dpi=100)


# ---- the memorization monitor -------------------------------------------------------------

# (row key, colour, label) of the monitor's measures, drawn on the right axis where present.
_MONITOR_CURVES = (
    ("nn_distance_median", "C0", "NN distance (median)"),
    ("gu_memorized_fraction", "C1", "Gu memorized fraction"),
    ("train_preference", "C2", "train preference"),
    ("paired_distance_median", "C3", "paired distance (median)"),
    ("split_preference_a", "C4", "split preference A"),
    ("split_preference_b", "C5", "split preference B"),
)


def _curve(history: Sequence[dict[str, Any]], key: str) -> list[float]:
    """``key`` over the history, None (an undefined measure) as NaN: a gap in the line."""
    return [math.nan if row[key] is None else row[key] for row in history]


def plot_monitor(
    path: str | os.PathLike,
    history: Sequence[dict[str, Any]],
    *,
    expected_preference: float | None = None,
    two_models: bool = False,
    best_step: int | None = None,
    drift_step: int | None = None,
) -> None:
    """A :class:`debias.pipeline.monitor.MemorizationMonitor`'s history (its rows): the
    held-out loss (left axis) and the memorization measures (right axis, bootstrap intervals
    shaded) against the step; dotted lines at the expected train preference (when given) and
    at 1/2 (two models), dashed vertical lines at ``best_step`` and ``drift_step``."""
    history = list(history)
    fig = new_figure((8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    right = ax.twinx()
    right.set_ylabel("memorization measures")
    steps = [row["step"] for row in history]
    lossy = [(row["step"], row["held_out_loss"]) for row in history]
    lossy = [(s, v) for s, v in lossy if v is not None]
    if lossy:
        ax.plot(*zip(*lossy, strict=True), "k-o", ms=3, label="held-out loss")
    for key, color, label in _MONITOR_CURVES:
        if not history or key not in history[0]:
            continue
        right.plot(steps, _curve(history, key), "-o", color=color, ms=3, label=label)
        if f"{key}_ci_low" in history[0]:
            low, high = _curve(history, f"{key}_ci_low"), _curve(history, f"{key}_ci_high")
            right.fill_between(steps, low, high, color=color, alpha=0.15, lw=0)
    if expected_preference is not None:
        right.axhline(expected_preference, color="C2", ls=":", lw=1)
    if two_models:
        right.axhline(0.5, color="grey", ls=":", lw=1)
    if best_step is not None:
        ax.axvline(best_step, color="green", ls="--", label=f"best step {best_step}")
    if drift_step is not None:
        ax.axvline(drift_step, color="red", ls="--", label=f"drift {drift_step}")
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    if handles or more_handles:
        ax.legend(handles + more_handles, labels + more_labels, fontsize=7, loc="best")
    ax.set_title("memorization monitor" + ("" if history else ": no measurements yet"))
    save_figure(fig, path, dpi=100)


# ---- the timestep analysis ----------------------------------------------------------------


def plot_timestep_analysis(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Two panels of :func:`debias.pipeline.evaluate.timestep_analysis` rows: eps MSE and x0
    MSE against t, log y (zero and undefined values are left out)."""
    fig = new_figure((10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, key, title in (
        (axes[0], "eps_mse", "eps MSE  ||eps - eps_hat||^2 / d"),
        (axes[1], "x0_mse", "x0 MSE  ||x0 - x0_hat||^2 / d"),
    ):
        points = [(r["t"], r[key]) for r in rows if r[key] is not None and r[key] > 0]
        if points:
            t, v = zip(*points, strict=True)
            ax.plot(t, v, marker="o", markersize=3)
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("timestep t")
        ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
