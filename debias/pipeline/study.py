"""`debias study NAME`: each seed paper's claim as one command.

A study trains a grid of cells (one :class:`~debias.pipeline.train.TrainConfig` and seed
each), evaluates every cell, and writes under ``<out>/study-<NAME>/`` (``-flow`` appended for
``family="flow"``):

    study.json       the study's settings, every cell's result, the aggregates and the findings
    study.md         the tables and "what it showed", computed from the numbers
    *.png            the study's plots (matplotlib, Agg)
    timing.json      wall time per cell (kept out of study.json, which depends on numbers only)
    feature_nets/    the FeatureNet of each data set, trained once per study (seeded), reused
    cells/<key>/     run/ (the training run folder), result.json, samples.png

Studies:

    debias-weighting        Yu et al. 2023 (arXiv 2310.08442): weightings constant / p2 /
                            min_snr / debias, fixed and learned variance (ddpm), Fréchet
                            distance and PRDC (FeatureNet space) and channel mean shift at
                            several sampling steps and samplers, and the per-timestep eps /
                            one-step x0 errors.
    depth-bias              arXiv 2505.17560: data at 90/10 (Gaussian mixture; two digit
                            classes), several depths (num_res_blocks): the majority share of the
                            samples against the data's, and the memorization measures per depth.
    biased-generalization   arXiv 2603.03469: two models on disjoint halves (paired samples)
                            and the same forced to memorize (train_size small): the curves of
                            median (1 - paired cosine), own-split preference and held-out loss,
                            and the held-out-loss minimum against the drift step.

Resuming: a cell is finished when its result.json (written atomically after its evaluation)
holds the same fingerprint (training config + evaluation settings); it is then read, not
trained again. A cell whose run folder holds a checkpoint resumes from it (the Trainer's exact
resume); a run folder that cannot be resumed (no or a broken checkpoint) is removed and the
cell restarts. A cell whose training stopped on a NaN loss records the error as its result.

Sizes. ``quick=True`` (``--quick``) trains a two-level 16-channel UNet without attention for
150 (debias-weighting), 200 (depth-bias) or 400 (biased-generalization, two models, batch 16)
steps and evaluates on 128 / 300 samples: each study finishes in under 10 minutes on a 2-core
CPU (one thread, other jobs on the machine, 2026-12-03: debias-weighting 4 min 4 s, depth-bias
3 min 49 s, biased-generalization 3 min 1 s, debias-weighting --family flow 1 min 35 s). It
shows the machinery and the direction of the larger effects, not the papers' numbers (quick
models are undertrained: their samples over-represent the majority at every depth). The full
size is the pipeline's default UNet (32 channels, attention at 4x4) for 3000 steps of batch
64, 2000 samples at 5, 10, 20, 50 and 100 steps (debias-weighting), depths 1, 2 and 4 with 2000
samples (depth-bias), 8 images per half for the memorizing pair (biased-generalization): hours
on a 2-core CPU, minutes per cell on a GPU. ``options`` / ``overrides`` change any of it.

Aggregates: for every group of cells that differ only by seed, and every measure, the mean
over seeds and a 95% Student t interval, ``mean +- t_{0.975, n-1} s / sqrt(n)`` with ``s`` the
sample standard deviation (n - 1 denominator); no interval for n < 2. Seeds whose measure is
undefined (None) are left out of n.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from debias.checks import check_int
from debias.memorization import extract_features
from debias.pipeline import sampling
from debias.pipeline.plotting import new_figure, save_figure
from debias.pipeline.train import TrainConfig, prepare_data

__all__ = ["STUDIES", "Cell", "add_arguments", "mean_interval", "plan", "run", "run_study"]

STUDIES = ("debias-weighting", "depth-bias", "biased-generalization")
FAMILIES = ("ddpm", "flow")
LEVEL = 0.95
_VERSION = 1

# The --quick model: two levels, no attention, ~60 ms a step of batch 32 on one thread of a
# busy 2-core CPU, so that each quick study fits in 10 minutes there.
_SMALL_MODEL = dict(base_channels=16, channel_mult=[1, 2], attention_resolutions=[])
_QUIET = dict(sample_every=0, monitor_every=0, log_every=50)


# ---- intervals ----------------------------------------------------------------------------


def mean_interval(values: Sequence[float | None], level: float = LEVEL) -> dict[str, Any]:
    """Mean and Student t interval over seeds: ``mean +- t_{(1+level)/2, n-1} s / sqrt(n)``.

    Args:
        values: one number per seed; None (an undefined measure) is left out.
        level: the coverage (default 0.95).

    Returns:
        ``{"n", "mean", "std", "ci_low", "ci_high", "level"}``; std and the interval are None
        for n < 2, everything but n and level for n = 0.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    out: dict[str, Any] = {
        "n": n,
        "mean": None,
        "std": None,
        "ci_low": None,
        "ci_high": None,
        "level": level,
    }
    if n == 0:
        return out
    mean = math.fsum(xs) / n
    out["mean"] = mean
    if n < 2:
        return out
    from scipy.stats import t as student_t  # scipy comes with scikit-learn

    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(student_t.ppf((1.0 + level) / 2.0, n - 1)) * std / math.sqrt(n)
    out.update(std=std, ci_low=mean - half, ci_high=mean + half)
    return out


def _fmt(stats: dict[str, Any] | None, digits: int = 4) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    if stats.get("ci_low") is None:
        return f"{stats['mean']:.{digits}g} (n={stats['n']})"
    return (
        f"{stats['mean']:.{digits}g} [{stats['ci_low']:.{digits}g}, {stats['ci_high']:.{digits}g}]"
    )


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    if a.get("ci_low") is None or b.get("ci_low") is None:
        return None
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


def _compare(
    name_a: str, a: dict, name_b: str, b: dict, lower_is: str, paired: dict | None = None
) -> str:
    """One sentence comparing two aggregated measures. Without ``paired``: by the overlap of
    their intervals. With ``paired`` (the mean and interval of the per-seed differences a - b,
    for groups that share each seed's data and noise): the verdict is whether that interval
    holds 0, the sharper test, and the overlap is stated beside it."""
    text = f"{name_a} {_fmt(a)} vs {name_b} {_fmt(b)}"
    overlap = _overlap(a, b)
    if overlap is None:
        return text + " (no interval: fewer than 2 seeds)"
    if paired is not None and paired.get("ci_low") is not None:
        text += "; the intervals " + ("overlap" if overlap else "are disjoint")
        text += f"; paired by seed, {name_a} - {name_b} = {_fmt(paired)}"
        if paired["ci_low"] <= 0.0 <= paired["ci_high"]:
            return text + " holds 0 → no effect at this scale"
        lower = name_a if paired["mean"] < 0 else name_b
        return text + f" excludes 0 → {lower} {lower_is}"
    if overlap:
        return text + ": the intervals overlap → no effect at this scale"
    lower = name_a if a["mean"] < b["mean"] else name_b
    return text + f": the intervals are disjoint → {lower} {lower_is}"


def _paired(cells: list[dict], group_a: str, group_b: str, metric: str) -> dict[str, Any]:
    """Mean and t interval of the per-seed differences of ``metric``, group a minus b."""
    by_seed: dict[str, dict[int, float]] = {group_a: {}, group_b: {}}
    for c in cells:
        if c["group_key"] in by_seed and (c.get("metrics") or {}).get(metric) is not None:
            by_seed[c["group_key"]][c["seed"]] = c["metrics"][metric]
    a, b = by_seed[group_a], by_seed[group_b]
    return mean_interval([a[s] - b[s] for s in sorted(set(a) & set(b))])


# ---- cells --------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    """One training run of a study's grid: its coordinates, seed and config."""

    group: dict[str, Any]  # the grid coordinates without the seed
    seed: int
    config: TrainConfig
    evaluation: dict[str, Any]  # the evaluation settings (part of the result's fingerprint)

    @property
    def group_key(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.group.items())

    @property
    def key(self) -> str:
        """The cell's folder: readable coordinates and a hash of the training config."""
        label = "-".join(str(v) for v in self.group.values()) + f"-s{self.seed}"
        return f"{label}-{_digest(self.config.to_dict())}"

    @property
    def fingerprint(self) -> str:
        return _digest(
            {"config": self.config.to_dict(), "evaluation": self.evaluation, "version": _VERSION}
        )


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


# ---- the studies --------------------------------------------------------------------------


class _Study:
    """A study's grid, per-cell evaluation, report and plots."""

    name = ""
    defaults: ClassVar[dict[str, Any]] = {}  # full size
    quick: ClassVar[dict[str, Any]] = {}  # what --quick changes

    def __init__(self, options: dict[str, Any], family: str, seeds: list[int]) -> None:
        self.o = options
        self.family = family
        self.seeds = seeds
        self.notes: list[str] = []

    def cells(self, overrides: dict[str, Any]) -> list[Cell]:
        raise NotImplementedError

    def evaluate(self, cell: Cell, run_dir: Path, ctx: _Context) -> dict[str, Any]:
        raise NotImplementedError

    def report(self, study: dict[str, Any]) -> tuple[list[str], list[str]]:
        """``(markdown lines of the tables, findings)``."""
        raise NotImplementedError

    def plot(self, study: dict[str, Any], folder: Path) -> list[str]:
        raise NotImplementedError

    def _base(self, overrides: dict[str, Any], **values: Any) -> dict[str, Any]:
        base = {**self.o["train"], **values}
        if self.family != "ddpm":
            base["family"] = self.family
        return {**base, **overrides}


class _Context:
    """What the cells of a study share: the FeatureNet of each data set, trained once."""

    def __init__(self, folder: Path, feature_steps: int, device: str | None) -> None:
        self.folder = folder
        self.feature_steps = feature_steps
        self.device = device
        self._nets: dict[str, Any] = {}

    def feature_net(self, config: TrainConfig):
        """The FeatureNet for ``config``'s data (its classes and proportions), trained on the
        training and held-out images of seed 0, stored in feature_nets/ and reused."""
        from safetensors.torch import load_file, save_file

        from debias.pipeline.evaluate import FeatureNet, train_feature_net

        spec = {
            "data": config.data,
            "image_size": config.image_size,
            "classes": config.classes,
            "proportions": config.proportions,
            "steps": self.feature_steps,
        }
        key = _digest(spec)
        if key in self._nets:
            return self._nets[key]
        path = self.folder / "feature_nets" / f"{key}.safetensors"
        data = _reference(config, seed=0)
        if path.exists():
            meta = json.loads(path.with_suffix(".json").read_text())
            net = FeatureNet(data.images.shape[1], meta["num_classes"])
            net.load_state_dict(load_file(str(path)))
            net.eval()
        else:
            net, accuracy = train_feature_net(
                data.images, data.labels, steps=self.feature_steps, seed=0
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(
                path.with_suffix(".json"),
                {**spec, "num_classes": net.num_classes, "held_out_accuracy": accuracy},
            )
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
            os.replace(tmp, path)
        self._nets[key] = net
        return net

    def feature_accuracy(self) -> dict[str, float]:
        out = {}
        for meta in sorted((self.folder / "feature_nets").glob("*.json")):
            out[meta.stem] = json.loads(meta.read_text())["held_out_accuracy"]
        return out


def _reference(config: TrainConfig, seed: int):
    """The data of ``config`` (classes and proportions applied) at ``seed``, all of it."""
    from debias.pipeline.data import ImageData

    values = {
        **config.to_dict(),
        "seed": seed,
        "two_models": False,
        "split": "full",
        "train_size": None,
    }
    parts, held = prepare_data(TrainConfig(**values))
    images = torch.cat([parts[0].images, held.images])
    labels = torch.cat([parts[0].labels, held.labels])
    return ImageData(images, labels, parts[0].name)


class _FirstChannels(torch.nn.Module):
    """A learned-variance model's epsilon half (the first C of 2C output channels)."""

    def __init__(self, model: torch.nn.Module, channels: int) -> None:
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t)[:, : self.channels]


def _load(run_dir: Path, device: str | None):
    """The run's EMA model on ``device`` (default: a GPU if there is one), and its schedule."""
    from debias.pipeline.train import load_model

    model, schedule, meta = load_model(run_dir)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), schedule, meta


def _features(net, images: torch.Tensor) -> torch.Tensor:
    return extract_features(images.float(), net.features, 512, module=net).double()


def _sample(model, schedule, shape, *, steps: int, method: str, seed: int) -> torch.Tensor:
    """Samples on the model's device, returned on the CPU (where the measures run); the noise
    comes from ``seed`` on the CPU, so it does not depend on the device."""
    x = sampling.sample(model, schedule, shape, steps=steps, method=method, generator=seed)
    return x.cpu()


# ---- 1. debias-weighting ------------------------------------------------------------------


class _Weighting(_Study):
    name = "debias-weighting"
    defaults: ClassVar[dict[str, Any]] = {
        "weightings": ["constant", "p2", "min_snr", "debias"],
        "variances": None,  # None: fixed, and learned where TrainConfig has learn_sigma (ddpm)
        "methods": None,  # None: ddpm, ddim, dpm++2m (flow: euler, heun) where available
        "sample_steps": [5, 10, 20, 50, 100],
        "n_samples": 2000,
        "timestep_images": 512,
        "timesteps": 20,
        "data": None,  # None: colored-digits where the data module has it, else digits
        "feature_steps": 300,
        "train": {
            "steps": 3000,
            "batch_size": 64,
            "checkpoint_every": 500,
            "eval_every": 0,  # the study reads samples, not the held-out loss
            **_QUIET,
        },
    }
    quick: ClassVar[dict[str, Any]] = {
        "sample_steps": [5, 10, 20],
        "n_samples": 128,
        "timestep_images": 128,
        "timesteps": 10,
        "feature_steps": 200,
        "train": {
            **_SMALL_MODEL,
            "steps": 150,
            "batch_size": 32,
            "lr": 2e-3,
            "warmup": 20,
            "checkpoint_every": 50,
            "eval_every": 0,
            "eval_size": 64,
            **_QUIET,
        },
    }
    _METHODS: ClassVar[dict[str, list[str]]] = {
        "ddpm": ["ddpm", "ddim", "dpm++2m"],
        "flow": ["euler", "heun"],
    }

    def cells(self, overrides: dict[str, Any]) -> list[Cell]:
        o = self.o
        variances = o["variances"]
        if variances is None:
            variances = ["fixed", "learned"] if self.family == "ddpm" else ["fixed"]
        for v in variances:
            if v not in ("fixed", "learned"):
                raise ValueError(f"variances: each must be 'fixed' or 'learned', got {v!r}")
            if v == "learned" and self.family != "ddpm":
                raise ValueError("variances: 'learned' is a DDPM option (family='ddpm')")
        methods = o["methods"]
        available = sampling.FAMILY_METHODS[self.family]
        if methods is None:
            methods = self._METHODS[self.family]
        for m in methods:
            if m not in available:
                raise ValueError(f"methods: {m!r} is not a {self.family} sampler {available}")
        data = o["data"]
        if data is None:
            data = "colored-digits"
        self.methods, self.variances, self.data = list(methods), list(variances), data
        self.o = {**o, "methods": self.methods, "variances": self.variances, "data": data}
        evaluation = {
            k: o[k]
            for k in ("sample_steps", "n_samples", "timestep_images", "timesteps", "feature_steps")
        }
        evaluation["methods"] = self.methods
        cells = []
        for variance in self.variances:
            for weighting in o["weightings"]:
                for seed in self.seeds:
                    values = self._base(overrides, data=data, weighting=weighting, seed=seed)
                    if variance == "learned":
                        values["learn_sigma"] = True
                    config = TrainConfig(**values)
                    group = {"variance": variance, "weighting": weighting}
                    cells.append(Cell(group, seed, config, evaluation))
        return cells

    def evaluate(self, cell: Cell, run_dir: Path, ctx: _Context) -> dict[str, Any]:
        from debias.pipeline.evaluate import (
            channel_mean_shift,
            frechet_distance,
            prdc,
            timestep_analysis,
        )

        o = self.o
        net = ctx.feature_net(cell.config)
        model, schedule, _ = _load(run_dir, ctx.device)
        parts, _ = prepare_data(cell.config)
        ref = parts[0].images
        ref_feat = _features(net, ref)
        shape = (o["n_samples"], *ref.shape[1:])
        seed = 10_000 + cell.seed  # the same noise for every weighting of one seed
        metrics: dict[str, Any] = {}
        extra: dict[str, Any] = {"channel_mean_shift": {}}
        for method in self.methods:
            for steps in o["sample_steps"]:
                x = _sample(model, schedule, shape, steps=steps, method=method, seed=seed)
                feat = _features(net, x)
                prefix = f"{method}/{steps}/"
                metrics[prefix + "fd"] = frechet_distance(ref_feat, feat)
                count = min(len(ref_feat), len(feat))
                gen = torch.Generator().manual_seed(seed)
                real = ref_feat[torch.randperm(len(ref_feat), generator=gen)[:count]]
                scores = prdc(real, feat[torch.randperm(len(feat), generator=gen)[:count]])
                for k in ("precision", "recall", "density", "coverage"):
                    metrics[prefix + k] = scores[k]
                shift = channel_mean_shift(x, ref)
                metrics[prefix + "channel_shift"] = shift["max_abs_shift"]
                extra["channel_mean_shift"][f"{method}/{steps}"] = shift["mean_shift"]
        gen = torch.Generator().manual_seed(seed)
        x0 = ref[torch.randperm(len(ref), generator=gen)[: o["timestep_images"]]]
        T = cell.config.num_timesteps
        grid = torch.linspace(0, T - 1, min(o["timesteps"], T), dtype=torch.float64)
        timesteps = sorted(set(grid.round().long().tolist()))
        eps_model = _FirstChannels(model, ref.shape[1])
        try:
            rows = timestep_analysis(eps_model, schedule, x0, timesteps, seed=seed)
        except ValueError as err:  # e.g. a target the analysis does not invert
            extra["timesteps_unavailable"] = str(err)
            rows = []
        for r in rows:
            metrics[f"timesteps/{r['t']}/eps_mse"] = r["eps_mse"]
            metrics[f"timesteps/{r['t']}/x0_mse"] = r["x0_mse"]
        extra["timesteps"] = timesteps if rows else []
        extra["timestep_snr"] = {str(r["t"]): r["snr"] for r in rows}
        return {"metrics": metrics, "extra": extra}

    def _steps_for_claim(self) -> int:
        steps = self.o["sample_steps"]
        return 10 if 10 in steps else min(steps, key=lambda s: abs(s - 10))

    def report(self, study: dict[str, Any]) -> tuple[list[str], list[str]]:
        agg = study["aggregates"]
        lines, findings = [], []
        steps_list = self.o["sample_steps"]
        for variance in self.variances:
            for method in self.methods:
                lines += [
                    f"### Fréchet distance, {method}, {variance} variance "
                    "(mean [95% t interval] over seeds)",
                    "",
                    "| weighting | " + " | ".join(f"{s} steps" for s in steps_list) + " |",
                    "|---|" + "---:|" * len(steps_list),
                ]
                for w in self.o["weightings"]:
                    g = agg.get(f"variance={variance},weighting={w}", {})
                    cells = [_fmt(g.get(f"{method}/{s}/fd")) for s in steps_list]
                    lines.append(f"| {w} | " + " | ".join(cells) + " |")
                lines.append("")
        s = self._steps_for_claim()
        m0 = self.methods[0]
        lines += [
            f"### PRDC and channel mean shift at {s} steps ({m0})",
            "",
            "| variance | weighting | precision | recall | density | coverage | "
            "max abs channel shift |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for variance in self.variances:
            for w in self.o["weightings"]:
                g = agg.get(f"variance={variance},weighting={w}", {})
                vals = [
                    _fmt(g.get(f"{m0}/{s}/{k}"), 3)
                    for k in ("precision", "recall", "density", "coverage", "channel_shift")
                ]
                lines.append(f"| {variance} | {w} | " + " | ".join(vals) + " |")
        lines.append("")
        ts = _timesteps_of(agg)
        if ts:
            lines += [
                f"### One-step x0 error ||x0 - x0_hat||^2 / d by timestep, "
                f"{self.variances[0]} variance",
                "",
                "| weighting | " + " | ".join(f"t={t}" for t in ts) + " |",
                "|---|" + "---:|" * len(ts),
            ]
            for w in self.o["weightings"]:
                g = agg.get(f"variance={self.variances[0]},weighting={w}", {})
                lines.append(
                    f"| {w} | "
                    + " | ".join(_fmt(g.get(f"timesteps/{t}/x0_mse"), 3) for t in ts)
                    + " |"
                )
            lines.append("")

        def pair(variance: str, key: str) -> dict[str, Any]:
            return _paired(
                study["cells"],
                f"variance={variance},weighting=debias",
                f"variance={variance},weighting=constant",
                key,
            )

        if "debias" in self.o["weightings"] and "constant" in self.o["weightings"]:
            for variance in self.variances:
                d = agg.get(f"variance={variance},weighting=debias", {})
                c = agg.get(f"variance={variance},weighting=constant", {})
                for method in self.methods:
                    key = f"{method}/{s}/fd"
                    if key in d and key in c:
                        findings.append(
                            f"{variance} variance, FD at {s} {method} steps: "
                            + _compare(
                                "debias",
                                d[key],
                                "constant",
                                c[key],
                                "is lower",
                                pair(variance, key),
                            )
                        )
                key = f"{m0}/{s}/channel_shift"
                if key in d and key in c:
                    findings.append(
                        f"{variance} variance, max abs channel mean shift at {s} {m0} steps: "
                        + _compare(
                            "debias", d[key], "constant", c[key], "is smaller", pair(variance, key)
                        )
                    )
                if ts:
                    noisiest = _noisiest(study, ts)
                    key = f"timesteps/{noisiest}/x0_mse"
                    if key in d and key in c:
                        findings.append(
                            f"{variance} variance, one-step x0 error at t={noisiest} (lowest SNR): "
                            + _compare(
                                "debias",
                                d[key],
                                "constant",
                                c[key],
                                "is smaller",
                                pair(variance, key),
                            )
                        )
        return lines, findings

    def plot(self, study: dict[str, Any], folder: Path) -> list[str]:
        agg, written = study["aggregates"], []
        steps = self.o["sample_steps"]
        for variance in self.variances:
            fig, axes = _subplots(
                1, len(self.methods), figsize=(4.2 * len(self.methods), 3.6), squeeze=False
            )
            for ax, method in zip(axes[0], self.methods, strict=True):
                for w in self.o["weightings"]:
                    g = agg.get(f"variance={variance},weighting={w}", {})
                    st = [g.get(f"{method}/{s}/fd") or {} for s in steps]
                    xs = [s for s, v in zip(steps, st, strict=True) if v.get("mean") is not None]
                    ys = [v["mean"] for v in st if v.get("mean") is not None]
                    (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=w)
                    band = [
                        (s, v["ci_low"], v["ci_high"])
                        for s, v in zip(steps, st, strict=True)
                        if v.get("ci_low") is not None
                    ]
                    if band:
                        bx, lo, hi = zip(*band, strict=True)
                        ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2)
                ax.set_xscale("log")
                ax.minorticks_off()
                ax.set_xticks(steps, [str(s) for s in steps])
                ax.set_xlabel("sampling steps")
                ax.set_ylabel("Fréchet distance (FeatureNet)")
                ax.set_title(f"{method}, {variance} variance", fontsize=10)
                ax.grid(alpha=0.3)
                _legend(ax)
            name = "fd_vs_steps.png" if variance == "fixed" else f"fd_vs_steps_{variance}.png"
            save_figure(fig, folder / name, dpi=110)
            written.append(name)
        ts = _timesteps_of(agg)
        if ts:
            fig, axes = _subplots(1, 2, figsize=(9, 3.6))
            for ax, key in zip(axes, ("eps_mse", "x0_mse"), strict=True):
                for w in self.o["weightings"]:
                    g = agg.get(f"variance={self.variances[0]},weighting={w}", {})
                    pts = [
                        (t, g[f"timesteps/{t}/{key}"]["mean"])
                        for t in ts
                        if (g.get(f"timesteps/{t}/{key}") or {}).get("mean")
                    ]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=w)
                ax.set_yscale("log")
                ax.set_xlabel("timestep t")
                ax.set_title(key.replace("_", " "), fontsize=10)
                ax.grid(alpha=0.3)
                _legend(ax)
            save_figure(fig, folder / "timesteps.png", dpi=110)
            written.append("timesteps.png")
        return written


def _noisiest(study: dict[str, Any], ts: list[int]) -> int:
    """The timestep of lowest SNR (DDPM: the largest t; flow tables run the other way)."""
    for cell in study["cells"]:
        snr = (cell.get("extra") or {}).get("timestep_snr")
        if snr:
            return min(ts, key=lambda t: snr.get(str(t), math.inf))
    return ts[-1]


def _timesteps_of(agg: dict[str, Any]) -> list[int]:
    ts = set()
    for group in agg.values():
        for key in group:
            if key.startswith("timesteps/") and key.endswith("/x0_mse"):
                ts.add(int(key.split("/")[1]))
    return sorted(ts)


# ---- 2. depth-bias ------------------------------------------------------------------------


class _Depth(_Study):
    name = "depth-bias"
    defaults: ClassVar[dict[str, Any]] = {
        "datasets": ["gmm", "digits-3-8"],
        "depths": [1, 2, 4],
        "majority": 0.9,
        "n_samples": 2000,
        "sample_steps": 50,
        "feature_steps": 300,
        "train": {
            "steps": 3000,
            "batch_size": 64,
            "checkpoint_every": 500,
            "eval_every": 250,
            **_QUIET,
        },
    }
    quick: ClassVar[dict[str, Any]] = {
        "depths": [1, 2, 3],
        "n_samples": 300,
        "sample_steps": 20,
        "feature_steps": 200,
        "train": {
            **_SMALL_MODEL,
            "steps": 200,
            "batch_size": 32,
            "lr": 2e-3,
            "warmup": 20,
            "checkpoint_every": 100,
            "eval_every": 100,
            "eval_size": 64,
            **_QUIET,
        },
    }
    _DATASETS = ("gmm", "digits-3-8")

    def _data(self, dataset: str) -> dict[str, Any]:
        p = float(self.o["majority"])
        if dataset == "gmm":
            return {"data": "gmm", "proportions": [p, round(1.0 - p, 12)]}
        return {"data": "digits", "classes": [3, 8], "proportions": [p, round(1.0 - p, 12)]}

    def cells(self, overrides: dict[str, Any]) -> list[Cell]:
        o = self.o
        for d in o["datasets"]:
            if d not in self._DATASETS:
                raise ValueError(f"datasets: each must be one of {self._DATASETS}, got {d!r}")
        if not 0.5 < float(o["majority"]) < 1.0:
            raise ValueError(f"majority must be in (0.5, 1), got {o['majority']!r}")
        for depth in o["depths"]:
            check_int("depths", depth, 1)
        evaluation = {k: o[k] for k in ("n_samples", "sample_steps", "feature_steps")}
        cells = []
        for dataset in o["datasets"]:
            for depth in o["depths"]:
                for seed in self.seeds:
                    values = self._base(
                        overrides, **self._data(dataset), num_res_blocks=depth, seed=seed
                    )
                    group = {"dataset": dataset, "depth": depth}
                    cells.append(Cell(group, seed, TrainConfig(**values), evaluation))
        return cells

    def evaluate(self, cell: Cell, run_dir: Path, ctx: _Context) -> dict[str, Any]:
        from debias.memorization import gu_ratio, nearest_distances
        from debias.pipeline.evaluate import class_proportions, frechet_distance
        from debias.pipeline.train import save_grid

        o = self.o
        net = ctx.feature_net(cell.config)
        model, schedule, _ = _load(run_dir, ctx.device)
        parts, _ = prepare_data(cell.config)
        train = parts[0]
        seed = 10_000 + cell.seed
        method = "ddpm" if self.family == "ddpm" else "euler"
        shape = (o["n_samples"], *train.images.shape[1:])
        x = _sample(model, schedule, shape, steps=o["sample_steps"], method=method, seed=seed)
        save_grid(x[:64], run_dir.parent / "samples.png")
        shares = class_proportions(net, x, train.labels)
        maj = shares["majority"]
        nb = nearest_distances(x, train.images, 2)
        gu = gu_ratio(nb, resamples=200, generator=seed)
        metrics = {
            "majority_share": shares["samples"][maj],
            "data_majority_share": shares["data"][maj],
            "majority_shift": shares["majority_shift"],
            "total_variation": shares["total_variation"],
            "fd": frechet_distance(_features(net, train.images), _features(net, x)),
            "nn_distance_median": float(nb.distances[:, 0].median()),
            "gu_memorized_fraction": gu.fraction,
        }
        extra = {"majority_class": maj, "class_shares": shares, "gu_ci": list(gu.ci)}
        return {"metrics": metrics, "extra": extra}

    def report(self, study: dict[str, Any]) -> tuple[list[str], list[str]]:
        agg = study["aggregates"]
        lines, findings = [], []
        for dataset in self.o["datasets"]:
            lines += [
                f"### {dataset} (majority share {self.o['majority']:g} in the data)",
                "",
                "| depth | majority share (samples) | data share | shift | total variation "
                "| Fréchet distance | NN distance median | Gu memorized |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for depth in self.o["depths"]:
                g = agg.get(f"dataset={dataset},depth={depth}", {})
                vals = [
                    _fmt(g.get(k), 3)
                    for k in (
                        "majority_share",
                        "data_majority_share",
                        "majority_shift",
                        "total_variation",
                        "fd",
                        "nn_distance_median",
                        "gu_memorized_fraction",
                    )
                ]
                lines.append(f"| {depth} | " + " | ".join(vals) + " |")
            lines.append("")
            for depth in self.o["depths"]:
                g = agg.get(f"dataset={dataset},depth={depth}", {})
                share, data = g.get("majority_share"), g.get("data_majority_share")
                if not share or share.get("ci_low") is None or not data:
                    continue
                inside = share["ci_low"] <= data["mean"] <= share["ci_high"]
                findings.append(
                    f"{dataset}, depth {depth}: majority share {_fmt(share, 3)} against the "
                    f"data's {data['mean']:.3f}: "
                    + (
                        "the interval holds the data's share → no amplification"
                        if inside
                        else ("amplified" if share["mean"] > data["mean"] else "reduced")
                        + " beyond the interval"
                    )
                )
            depths = self.o["depths"]
            if len(depths) >= 2:
                lo = agg.get(f"dataset={dataset},depth={depths[0]}", {})
                hi = agg.get(f"dataset={dataset},depth={depths[-1]}", {})
                for key, what in (
                    ("majority_share", "majority share"),
                    ("gu_memorized_fraction", "Gu memorized fraction"),
                    ("nn_distance_median", "NN distance median"),
                ):
                    if key in lo and key in hi:
                        findings.append(
                            f"{dataset}, {what}: "
                            + _compare(
                                f"depth {depths[-1]}",
                                hi[key],
                                f"depth {depths[0]}",
                                lo[key],
                                "is lower",
                                _paired(
                                    study["cells"],
                                    f"dataset={dataset},depth={depths[-1]}",
                                    f"dataset={dataset},depth={depths[0]}",
                                    key,
                                ),
                            )
                        )
        return lines, findings

    def plot(self, study: dict[str, Any], folder: Path) -> list[str]:
        agg = study["aggregates"]
        datasets, depths = self.o["datasets"], self.o["depths"]
        fig, axes = _subplots(2, len(datasets), figsize=(4.5 * len(datasets), 6.4), squeeze=False)
        for col, dataset in enumerate(datasets):
            for row, (key, label) in enumerate(
                (
                    ("majority_share", "majority share of samples"),
                    ("nn_distance_median", "median NN distance to training"),
                )
            ):
                ax = axes[row][col]
                st = [agg.get(f"dataset={dataset},depth={d}", {}).get(key) or {} for d in depths]
                pts = [(d, v) for d, v in zip(depths, st, strict=True) if v.get("mean") is not None]
                if pts:
                    xs = [d for d, _ in pts]
                    ys = [v["mean"] for _, v in pts]
                    err = [
                        [
                            v["mean"] - v["ci_low"] if v.get("ci_low") is not None else 0
                            for _, v in pts
                        ],
                        [
                            v["ci_high"] - v["mean"] if v.get("ci_high") is not None else 0
                            for _, v in pts
                        ],
                    ]
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="samples (95% t)")
                if key == "majority_share":
                    data = [
                        agg.get(f"dataset={dataset},depth={d}", {}).get("data_majority_share") or {}
                        for d in depths
                    ]
                    shares = [v["mean"] for v in data if v.get("mean") is not None]
                    if shares:
                        ax.axhline(sum(shares) / len(shares), color="k", ls="--", label="data")
                    ax.set_title(dataset, fontsize=10)
                    _legend(ax)
                ax.set_xticks(depths)
                ax.set_xlabel("depth (num_res_blocks)")
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
        save_figure(fig, folder / "majority_share.png", dpi=110)
        return ["majority_share.png"]


# ---- 3. biased-generalization -------------------------------------------------------------

_CURVES = (
    "paired_distance_median",
    "split_preference_a",
    "split_preference_b",
    "train_preference",
    "gu_memorized_fraction",
    "nn_distance_median",
)


class _Biased(_Study):
    name = "biased-generalization"
    defaults: ClassVar[dict[str, Any]] = {
        "settings": ["halves", "memorize"],
        "memorize_size": 8,
        "train": {
            "steps": 3000,
            "batch_size": 64,
            "lr": 1e-3,
            "eval_every": 100,
            "monitor_every": 100,
            "monitor_samples": 128,
            "sample_steps": 50,
            "checkpoint_every": 500,
            "sample_every": 0,
            "log_every": 50,
        },
    }
    quick: ClassVar[dict[str, Any]] = {
        "memorize_size": 4,
        "train": {
            **_SMALL_MODEL,
            "steps": 400,
            "batch_size": 16,
            "lr": 2e-3,
            "warmup": 5,
            "eval_every": 50,
            "eval_size": 64,
            "monitor_every": 50,
            "monitor_samples": 32,
            "sample_steps": 10,
            "checkpoint_every": 100,
            "sample_every": 0,
            "log_every": 50,
        },
    }
    _SETTINGS = ("halves", "memorize")

    def cells(self, overrides: dict[str, Any]) -> list[Cell]:
        o = self.o
        for s in o["settings"]:
            if s not in self._SETTINGS:
                raise ValueError(f"settings: each must be one of {self._SETTINGS}, got {s!r}")
        size = o["memorize_size"]
        check_int("memorize_size", size, 2)
        cells = []
        for setting in o["settings"]:
            for seed in self.seeds:
                values = self._base(overrides, two_models=True, seed=seed)
                if setting == "memorize":
                    values["train_size"] = size
                config = TrainConfig(**values)
                if not config.monitor_every or not config.eval_every:
                    raise ValueError(
                        "overrides: monitor_every and eval_every must be > 0 for this study"
                    )
                cells.append(Cell({"setting": setting}, seed, config, {"memorize_size": size}))
        return cells

    def evaluate(self, cell: Cell, run_dir: Path, ctx: _Context) -> dict[str, Any]:
        summary = json.loads((run_dir / "summary.json").read_text())
        monitor = _jsonl(run_dir / "monitor.jsonl")
        held = [r for r in _jsonl(run_dir / "metrics.jsonl") if r.get("held_out_loss") is not None]
        curves: dict[str, list] = {"step": [r["step"] for r in monitor]}
        for key in _CURVES:
            curves[key] = [r.get(key) for r in monitor]
        loss_curves = {}
        for tag in sorted({r["model"] for r in held}):
            rows = [r for r in held if r["model"] == tag]
            loss_curves[tag] = {
                "step": [r["step"] for r in rows],
                "held_out_loss": [r["held_out_loss"] for r in rows],
            }
        mon = summary.get("monitor") or {}
        best = (summary.get("held_out_loss_min") or {}).get("step")
        drift = mon.get("drift_step")
        last = monitor[-1] if monitor else {}
        metrics = {
            "best_step": best,
            "drift_step": drift,
            "drift_detected": 1.0 if drift is not None else 0.0,
            "drift_minus_best": drift - best if drift is not None and best is not None else None,
            "held_out_loss_min": (summary.get("held_out_loss_min") or {}).get("held_out_loss"),
            "final_paired_distance": last.get("paired_distance_median"),
            "final_split_preference": _mean_of(
                last.get("split_preference_a"), last.get("split_preference_b")
            ),
            "final_gu_memorized_fraction": last.get("gu_memorized_fraction"),
            "final_nn_distance_median": last.get("nn_distance_median"),
        }
        extra = {"curves": curves, "held_out": loss_curves, "status": summary.get("status")}
        return {"metrics": metrics, "extra": extra}

    def report(self, study: dict[str, Any]) -> tuple[list[str], list[str]]:
        agg = study["aggregates"]
        lines = [
            "| setting | held-out-loss minimum step | drift step (seeds with a drift) | "
            "drift - minimum | final median (1 - paired cosine) | final own-split "
            "preference | final Gu memorized |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        findings = []
        by_setting = {}
        for c in study["cells"]:
            by_setting.setdefault(c["group"]["setting"], []).append(c)
        for setting in self.o["settings"]:
            g = agg.get(f"setting={setting}", {})
            n = len(by_setting.get(setting, []))
            drifts = (g.get("drift_step") or {}).get("n", 0)
            vals = [
                _fmt(g.get("best_step"), 4),
                f"{_fmt(g.get('drift_step'), 4)} ({drifts}/{n})",
                _fmt(g.get("drift_minus_best"), 4),
                _fmt(g.get("final_paired_distance"), 3),
                _fmt(g.get("final_split_preference"), 3),
                _fmt(g.get("final_gu_memorized_fraction"), 3),
            ]
            lines.append(f"| {setting} | " + " | ".join(vals) + " |")
            before = sum(
                1
                for c in by_setting.get(setting, [])
                if (c.get("metrics") or {}).get("drift_minus_best") is not None
                and c["metrics"]["drift_minus_best"] < 0
            )
            text = (
                f"{setting}: a drift was detected in {drifts} of {n} seeds; held-out-loss "
                f"minimum at step {_fmt(g.get('best_step'), 4)}"
            )
            if drifts:
                text += (
                    f", drift from step {_fmt(g.get('drift_step'), 4)}; in {before} of "
                    f"{drifts} the samples drifted before the held-out loss stopped "
                    "falling (biased generalization)"
                )
            findings.append(text)
        lines.append("")
        a, b = agg.get("setting=halves", {}), agg.get("setting=memorize", {})
        for key, what in (
            ("final_paired_distance", "final median (1 - paired cosine)"),
            ("final_split_preference", "final own-split preference"),
        ):
            if key in a and key in b:
                findings.append(
                    f"{what}: " + _compare("memorize", b[key], "halves", a[key], "is lower")
                )
        return lines, findings

    def plot(self, study: dict[str, Any], folder: Path) -> list[str]:
        settings = self.o["settings"]
        panels = (
            ("paired_distance_median", "median (1 - paired cosine)"),
            ("split_preference", "own-split preference (A solid, B dashed)"),
            ("held_out_loss", "held-out loss (model A)"),
        )
        fig, axes = _subplots(len(settings), 3, figsize=(13, 3.4 * len(settings)), squeeze=False)
        colours = _rc()["axes.prop_cycle"].by_key()["color"]
        for row, setting in enumerate(settings):
            cells = [
                c for c in study["cells"] if c["group"]["setting"] == setting and c.get("extra")
            ]
            for i, c in enumerate(cells):
                colour = colours[i % len(colours)]
                curves, m = c["extra"]["curves"], c["metrics"]
                for col, (key, _) in enumerate(panels):
                    ax = axes[row][col]
                    if key == "held_out_loss":
                        h = c["extra"]["held_out"].get("a") or next(
                            iter(c["extra"]["held_out"].values()), None
                        )
                        if h:
                            ax.plot(
                                h["step"],
                                h["held_out_loss"],
                                color=colour,
                                label=f"seed {c['seed']}",
                            )
                    elif key == "split_preference":
                        for tag, ls in (("a", "-"), ("b", "--")):
                            _plot_curve(
                                ax,
                                curves["step"],
                                curves[f"split_preference_{tag}"],
                                colour,
                                ls,
                                f"seed {c['seed']}" if tag == "a" else None,
                            )
                        ax.axhline(0.5, color="k", lw=0.8)
                    else:
                        _plot_curve(
                            ax, curves["step"], curves[key], colour, "-", f"seed {c['seed']}"
                        )
                    if m.get("best_step") is not None:
                        ax.axvline(m["best_step"], color=colour, ls="--", lw=0.8)
                    if m.get("drift_step") is not None:
                        ax.axvline(m["drift_step"], color=colour, ls=":", lw=1.2)
            for col, (_, label) in enumerate(panels):
                ax = axes[row][col]
                ax.set_title(f"{setting}: {label}", fontsize=9)
                ax.set_xlabel("step  (-- held-out-loss minimum, : drift step)", fontsize=8)
                ax.grid(alpha=0.3)
                if cells:
                    ax.legend(fontsize=7)
        save_figure(fig, folder / "curves.png", dpi=110)
        return ["curves.png"]


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _plot_curve(ax, steps, values, colour, ls, label) -> None:
    pts = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), color=colour, ls=ls, marker="o", markersize=2, label=label)


def _mean_of(*values: float | None) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_REGISTRY: dict[str, type[_Study]] = {s.name: s for s in (_Weighting, _Depth, _Biased)}


# ---- running ------------------------------------------------------------------------------


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a cell's training; its checkpoint was written and the study resumes."""


def run_study(
    name: str,
    out_dir: str | os.PathLike = "runs",
    *,
    quick: bool = False,
    seeds: int | Sequence[int] | None = None,
    family: str = "ddpm",
    progress: bool = True,
    device: str | None = None,
    options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    max_cells: int | None = None,
    on_cell: Callable[[Cell, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) study ``name`` and writes its folder; returns the study.json dict.

    Args:
        name: one of :data:`STUDIES`.
        out_dir: parent folder; the study writes ``out_dir/study-<name>`` (``-flow`` appended
            with ``family="flow"``).
        quick: the small size (minutes on a 2-core CPU) instead of the full one.
        seeds: a count N (seeds 0..N-1, default 3) or a list of seeds.
        family: "ddpm" or "flow" (needs a TrainConfig with ``family``).
        progress: a tqdm bar over the cells.
        device: where cells train and sample ("cpu", "cuda", ...; default: a GPU if any).
        options: the study's settings to change (see each study's ``defaults``: e.g.
            ``{"weightings": ["constant", "debias"], "sample_steps": [5]}``); unknown keys are
            a ValueError. ``options["train"]`` replaces keys of the study's training settings.
        overrides: TrainConfig fields set on every cell, after the study's own.
        max_cells: train and evaluate at most this many unfinished cells, then stop (the study
            files are written with ``"status": "incomplete"``; rerun to continue).
        on_cell: called as ``on_cell(cell, result)`` after each cell this call finishes.

    Returns:
        The study.json dict: ``study``, ``family``, ``quick``, ``seeds``, ``options``,
        ``overrides``, ``cells`` (one result each), ``aggregates`` (group -> measure -> mean
        and interval), ``findings``, ``notes``, ``status`` and ``files``.
    """
    if max_cells is not None:
        check_int("max_cells", max_cells, 0)
    study, cells = _plan(name, quick, seeds, family, options, overrides)
    merged, seed_list, overrides = study.o, study.seeds, study.overrides

    folder = Path(out_dir) / (f"study-{name}" + ("" if family == "ddpm" else f"-{family}"))
    folder.mkdir(parents=True, exist_ok=True)
    ctx = _Context(folder, merged.get("feature_steps", 300), device)
    results: dict[str, dict[str, Any]] = {}
    timing = _read_json(folder / "timing.json") or {}
    from tqdm.auto import tqdm

    done_now = 0
    status = "complete"
    bar = tqdm(cells, desc=f"study {name}", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        for cell in bar:
            bar.set_postfix_str(cell.key[:40])
            cell_dir = folder / "cells" / cell.key
            result = _read_json(cell_dir / "result.json")
            if result is not None and result.get("fingerprint") == cell.fingerprint:
                results[cell.key] = result
                continue
            if max_cells is not None and done_now >= max_cells:
                status = "incomplete"
                continue
            started = time.perf_counter()
            result = _run_cell(study, cell, cell_dir, ctx, device)
            _write_json(cell_dir / "result.json", result)
            timing[cell.key] = round(time.perf_counter() - started, 2)
            _write_json(folder / "timing.json", timing)
            results[cell.key] = result
            done_now += 1
            if on_cell is not None:
                on_cell(cell, result)
    except StudyInterrupted:
        status = "interrupted"
    finally:
        bar.close()

    report = _assemble(
        study, name, family, quick, seed_list, merged, overrides, cells, results, status
    )
    report["feature_net_accuracy"] = ctx.feature_accuracy()
    _write_outputs(study, folder, report)
    if status == "interrupted":
        raise StudyInterrupted(f"study {name} interrupted; rerun the same command to resume")
    return report


def plan(
    name: str,
    *,
    quick: bool = False,
    seeds: int | Sequence[int] | None = None,
    family: str = "ddpm",
    options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Cell]:
    """The cells :func:`run_study` would run with these arguments (nothing is trained); each
    cell's folder is ``study-<name>/cells/<cell.key>``."""
    return _plan(name, quick, seeds, family, options, overrides)[1]


def _plan(name, quick, seeds, family, options, overrides) -> tuple[_Study, list[Cell]]:
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {STUDIES}, got {name!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    seed_list = _check_seeds(seeds)
    kind = _REGISTRY[name]
    merged = _merge_options(kind, quick, options or {})
    if overrides is not None and not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict or None, got {type(overrides).__name__}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - _config_fields())
    if unknown:
        raise ValueError(f"overrides: TrainConfig has no field(s) {unknown}")
    study = kind(merged, family, seed_list)
    cells = study.cells(overrides)
    study.overrides = overrides
    return study, cells


def _check_seeds(seeds: int | Sequence[int] | None) -> list[int]:
    if seeds is None:
        return [0, 1, 2]
    if not isinstance(seeds, Sequence):
        return list(range(check_int("seeds", seeds, 1)))
    seeds = [check_int("seeds", s, 0) for s in seeds]
    if not seeds:
        raise ValueError("seeds must be a count >= 1 or a non-empty list of ints >= 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds!r}")
    return seeds


def _merge_options(kind: type[_Study], quick: bool, options: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(kind.defaults))
    if unknown:
        raise ValueError(
            f"options: unknown keys {unknown} for study {kind.name!r}; known: "
            f"{sorted(kind.defaults)}"
        )
    merged = {**kind.defaults, **(kind.quick if quick else {})}
    merged["train"] = dict(merged["train"])
    for key, value in options.items():
        if key == "train":
            if not isinstance(value, dict):
                raise ValueError(
                    f"options: 'train' must be a dict of TrainConfig fields, got {value!r}"
                )
            unknown = sorted(set(value) - _config_fields())
            if unknown:
                raise ValueError(f"options: train has unknown TrainConfig field(s) {unknown}")
            merged["train"].update(value)
        else:
            merged[key] = value
    return merged


def _run_cell(study: _Study, cell: Cell, cell_dir: Path, ctx: _Context, device) -> dict[str, Any]:
    from debias.pipeline.train import NonFiniteLoss, train

    run_dir = cell_dir / "run"
    result: dict[str, Any] = {
        "key": cell.key,
        "group": cell.group,
        "group_key": cell.group_key,
        "seed": cell.seed,
        "fingerprint": cell.fingerprint,
        "config": cell.config.to_dict(),
        "run_dir": str(Path("cells") / cell.key / "run"),
    }
    try:
        summary = _train_or_resume(cell, run_dir, device, train)
    except NonFiniteLoss as err:
        return {**result, "status": "failed", "error": str(err), "metrics": None, "extra": None}
    if summary["status"] == "interrupted":
        raise StudyInterrupted(cell.key)
    evaluated = study.evaluate(cell, run_dir, ctx)
    result.update(
        status="done",
        train={
            "status": summary["status"],
            "step": summary["step"],
            "held_out_loss_min": summary.get("held_out_loss_min"),
        },
        **_json_ready(evaluated),
    )
    return result


def _train_or_resume(cell: Cell, run_dir: Path, device, train) -> dict[str, Any]:
    """Trains the cell, resuming from its checkpoint when there is a usable one."""
    from debias.pipeline import checkpoint as ckpt

    last = run_dir / "checkpoints" / ckpt.LAST
    if last.exists():
        try:
            return train(cell.config, run_dir, resume=True, progress=False, device=device)
        except ValueError:  # a broken checkpoint or one of another config: start again
            pass
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return train(cell.config, run_dir, progress=False, device=device)


def _assemble(study, name, family, quick, seeds, options, overrides, cells, results, status):
    ordered = [results[c.key] for c in cells if c.key in results]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in ordered:
        groups.setdefault(r["group_key"], []).append(r)
    aggregates = {}
    for key, members in groups.items():
        names = []
        for r in members:
            for m in r.get("metrics") or {}:
                if m not in names:
                    names.append(m)
        aggregates[key] = {
            m: mean_interval([(r.get("metrics") or {}).get(m) for r in members]) for m in names
        }
    report = {
        "study": name,
        "family": family,
        "quick": quick,
        "seeds": seeds,
        "status": status,
        "options": options,
        "overrides": overrides,
        "interval": f"mean over seeds and a {LEVEL:.0%} Student t interval "
        "(mean +- t_{0.975, n-1} s / sqrt(n), s with the n - 1 denominator)",
        "cells_total": len(cells),
        "cells_done": len(ordered),
        "failed": [r["key"] for r in ordered if r.get("status") == "failed"],
        "notes": study.notes,
        "cells": ordered,
        "aggregates": aggregates,
    }
    lines, findings = study.report(report) if ordered else ([], [])
    report["findings"] = findings
    report["_tables"] = lines
    return _json_ready(report)


def _write_outputs(study: _Study, folder: Path, report: dict[str, Any]) -> None:
    lines = report.pop("_tables")
    plots = study.plot(report, folder) if report["cells"] else []
    report["files"] = {"markdown": "study.md", "json": "study.json", "plots": plots}
    _write_json(folder / "study.json", report)
    md = [
        f"# Study {report['study']} ({report['family']}{', quick' if report['quick'] else ''})",
        "",
        f"Status: {report['status']}, {report['cells_done']} of {report['cells_total']} "
        f"cells; seeds {report['seeds']}. Numbers: {report['interval']}.",
        "",
    ]
    if report["notes"]:
        md += [f"- {n}" for n in report["notes"]] + [""]
    if report["failed"]:
        md += [f"- failed cells (NaN loss): {report['failed']}", ""]
    md += ["## What it showed", ""] + [f"- {f}" for f in report["findings"]] + [""]
    md += ["## Tables", "", *lines]
    md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    _atomic_text(folder / "study.md", "\n".join(md))


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    _atomic_text(
        path, json.dumps(_json_ready(value), indent=1, allow_nan=False, ensure_ascii=False)
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _subplots(rows: int, cols: int, figsize: tuple[float, float], squeeze: bool = True):
    """``(figure, axes)`` drawn as debias.pipeline.plotting draws (Figure + the Agg canvas, no
    pyplot)."""
    fig = new_figure(figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def _rc() -> Any:
    import matplotlib

    return matplotlib.rcParams


# ---- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``debias study NAME``."""
    from debias.pipeline.cli import count, positive_int  # the command line's value checks

    parser.add_argument("name", choices=STUDIES, help="the study to run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the small size: minutes on a 2-core CPU (default: full size)",
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds per cell (default: 3)")
    parser.add_argument(
        "--family", choices=FAMILIES, default="ddpm", help="ddpm (default) or flow (rectified flow)"
    )
    parser.add_argument(
        "--out", default="runs", help="parent folder of study-NAME/ (default: runs)"
    )
    parser.add_argument("--device", help="cpu, cuda, ... (default: a GPU if there is one)")
    parser.add_argument(
        "--max-cells",
        type=count,
        default=None,
        help="stop after this many new cells (rerun to continue)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress bar over the cells (default: on)",
    )


def run(args: argparse.Namespace) -> int:
    """``debias study``: runs the study; 0 when complete, 3 when --max-cells left cells
    undone, 130 when interrupted (rerun to resume)."""
    try:
        report = run_study(
            args.name,
            args.out,
            quick=args.quick,
            seeds=args.seeds,
            family=args.family,
            progress=args.progress,
            device=args.device,
            max_cells=args.max_cells,
        )
    except StudyInterrupted as err:
        print(f"debias study: {err}")
        return 130
    folder = Path(args.out) / (
        f"study-{args.name}" + ("" if args.family == "ddpm" else f"-{args.family}")
    )
    print(f"wrote {folder}/study.json, study.md and {', '.join(report['files']['plots'])}")
    for line in report["findings"]:
        print(f"- {line}")
    return 0 if report["status"] == "complete" else 3
