"""Memorization monitor for a training loop: scores each round of samples against the training
data, logs one row per call, and finds the held-out-loss minimum and the onset of biased
generalization (arXiv 2603.03469: the held-out loss still falls while samples drift toward their
own training images).

    loop every K steps:  row = monitor.measure(step, samples, held_out_loss=loss)
                         if monitor.should_stop: break

Pure scoring and detection: no model, no training code. Every search is the exact
:func:`debias.knn` (through :mod:`debias.memorization`), on the training set's device.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import numpy as np
import torch

from debias.checks import check_float, check_int, check_samples
from debias.memorization import (
    bootstrap_interval,  # the percentile bootstrap every memorization score reports
    gu_ratio,
    nearest_distances,
    paired_similarity,
    split_preference,
)
from debias.pipeline.plotting import plot_monitor
from debias.reference import knn_features

__all__ = ["MemorizationMonitor"]

_STATE_VERSION = 2
_BACKENDS = ("cpu", "cuda", "triton", "torch")
# Tags that give each bootstrap of a row its own seeded stream.
_GU, _SPLIT_A, _SPLIT_B = range(3)

DEFINITIONS = {
    "step": "training step of the measurement (strictly increasing across calls)",
    "held_out_loss": "the loop's held-out loss at this step (None when not given)",
    "n": "number of samples scored (model A's with two models)",
    "nn_distance_median": (
        "median over samples of d_1 = ||x - y_1|| / sqrt(d): per-pixel-normalised L2 to the "
        "nearest training image (debias.memorization.nearest_distances, k=2)"
    ),
    "gu_memorized_fraction": (
        "fraction of samples with d_1 / d_2 < threshold (Gu et al. 2023; d_2: distance to the "
        "second nearest training image; 0/0 counts as memorized), from the same search as "
        "nn_distance_median"
    ),
    "train_preference": (
        "fraction of samples whose nearest image (per-pixel L2, one exact debias.knn search, "
        "k=1) in the union of the whole training set and the held-out set is a training image. "
        "The search lists the held-out images first and breaks ties by the lower index, so a "
        "training image tied with a held-out image counts as held-out (never toward drift). "
        "Over the samples with a channel that is not constant (a blank sample, e.g. all -1 "
        "early in training, holds nothing to copy, and a batch of identical blanks would vote "
        "n times as one); None if there are none. Interval: the exact (Clopper-Pearson) "
        "binomial interval at coverage level, not the bootstrap (the scores are 0/1, and the "
        "percentile bootstrap collapses to [1, 1] at n of n, a false drift when "
        "train_preference_expected is near 1)"
    ),
    "train_preference_expected": (
        "m / (m + h): the train preference of samples that copy nothing. A sample drawn like "
        "fresh data is exchangeable with the m training and h held-out images, so its nearest "
        "image among them is a training image with probability m / (m + h); a copy of any "
        "training image scores 1"
    ),
    "paired_distance_median": (
        "two models: median over pairs i of 1 - cos(s(a_i), s(b_i)), s = per-channel "
        "standardisation then L2 normalisation (debias.memorization.paired_similarity, "
        "'standardized'), over the paired_valid pairs; None when none is valid. 0 for identical "
        "pairs, at most 2. It falls while the two models generalize the same way and rises when "
        "each copies its own split"
    ),
    "paired_valid": (
        "two models: pairs in which neither sample has every channel constant (s is undefined "
        "for such a sample, e.g. all -1 after clipping early in training)"
    ),
    "split_preference_a": (
        "two models: fraction of model A's samples whose top-1 standardized similarity to "
        "train (A's split) exceeds that to train_b (debias.memorization.split_preference), "
        "ties counting 1/2 (split_preference's own fractions count them 0); 0.5 without split "
        "memorization. Over A's samples without every channel constant; None if there are none"
    ),
    "split_preference_b": "the same for model B's samples: own split train_b against train",
    "*_ci_low, *_ci_high": (
        "percentile bootstrap interval of the fraction * over samples (resamples draws, "
        "coverage level, seeded by (seed, step, measure)); train_preference's is exact, see "
        "there; None where the fraction is None"
    ),
    "drifting": "this measurement satisfies the drift rule (see drift_rule)",
    "drift_reasons": (
        "the parts of the drift rule it satisfies, comma-separated: train_preference, gu, "
        "split_preference_a, split_preference_b ('' if none)"
    ),
    "notes": (
        "'; '-separated remarks on this row: samples left out of train_preference or the "
        "paired or split measures because every channel is constant ('' if none)"
    ),
}


class MemorizationMonitor:
    """Scores generated samples against the training data every few steps and detects the
    held-out-loss minimum and the onset of memorization drift.

    Args:
        train: ``[m, C, H, W]`` float training images (model A's split with two models), m >= 2.
            Searches run on its device; samples are moved there and cast to its dtype.
        held_out: ``[h, C, H, W]`` held-out images, or None (then only the Gu rule applies).
        train_b: ``[m_b, C, H, W]`` the split model B trains on (disjoint from ``train``), or
            None; with it, every :meth:`measure` needs ``samples_b``.
        threshold: Gu's memorization threshold on d_1 / d_2 (default 1/3), in (0, 1].
        margin: the least share of copies the drift rule asks for (default 0.05), in [0, 0.5):
            see the rule below.
        patience: consecutive drifting measurements that make a drift (default 2), >= 1.
        resamples: bootstrap draws per interval (default 200); ``level``: the coverage of every
            interval (default 0.95).
        seed: seeds every bootstrap (per step and measure, so rows do not depend on earlier
            calls and resume exactly).
        backend: the kNN backend ("cpu", "cuda", "triton", "torch"; default: by device).

    Drift rule. A measurement is *drifting* when any of these holds:

    1. ``train_preference_ci_low > e + margin * (1 - e)``, ``e = m / (m + h)`` =
       ``train_preference_expected`` (needs ``held_out``). Why: if a share c of the samples
       copies training images and the rest copy nothing, the preference is c + (1 - c) e, so
       this asks the lower bound of c = (p - e) / (1 - e) to exceed ``margin``. With e near 1
       it needs enough samples: n copies out of n clear the bar only when
       ((1 - level) / 2) ** (1 / n) > e + margin (1 - e), n >= 37 for e = 0.9. The interval
       covers the draw of the samples, not of the held-out split (on digits with m = 1600,
       h = 180 the preference of fresh data varies by about 0.008 between splits, which
       matters only for n in the thousands);
    2. ``gu_memorized_fraction_ci_low > 0`` (some samples are certainly copies);
    3. with two models: ``split_preference_a_ci_low > 0.5 + margin`` or
       ``split_preference_b_ci_low > 0.5 + margin`` (a model prefers its own split).

    ``drift_step`` is the step of the first measurement of the first run of ``patience``
    consecutive drifting measurements; it is detected at the run's last measurement, from
    which ``should_stop`` is True. ``best_step`` is the step of the smallest held-out loss so
    far (the earliest on ties). Both are fixed functions of ``history``.

    A measurement never raises on what a model produced: a sample with every channel constant
    (blank) is left out of the train preference and the paired and split measures (counted in
    ``paired_valid``, named in the row's ``notes``; a measure with no sample left is None and
    never drifts); the Gu and nearest-distance measures score it like any other.

    Attributes:
        history: one row (a flat dict of JSON-ready scalars, see :meth:`measure`) per call.
        best_step, drift_step, should_stop: the detections so far.
        train_preference_expected: m / (m + h), or None without ``held_out``.
    """

    def __init__(
        self,
        train: torch.Tensor,
        held_out: torch.Tensor | None = None,
        *,
        train_b: torch.Tensor | None = None,
        threshold: float = 1 / 3,
        margin: float = 0.05,
        patience: int = 2,
        resamples: int = 200,
        level: float = 0.95,
        seed: int = 0,
        backend: str | None = None,
    ) -> None:
        train = _check_images("train", train)
        if train.shape[0] < 2:
            raise ValueError(f"train needs at least 2 images (Gu's d_2), got {train.shape[0]}")
        shape = tuple(train.shape[1:])
        if held_out is not None:
            held_out = _check_images("held_out", held_out, shape)
        if train_b is not None:
            train_b = _check_images("train_b", train_b, shape)
            # The split preference standardises training images too: refuse them here, not
            # in the middle of a run.
            _check_varies("train", train)
            _check_varies("train_b", train_b)
        self.threshold = check_float("threshold", threshold, 0.0, high=1.0)
        self.margin = check_float("margin", margin, 0.0, True, 0.5, high_inclusive=False)
        self.patience = check_int("patience", patience, 1)
        self.resamples = check_int("resamples", resamples, 1)
        self.level = check_float("level", level, 0.0, high=1.0, high_inclusive=False)
        self.seed = check_int("seed", seed, 0)
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
        self.backend = backend
        self._train, self._held_out, self._train_b = train, held_out, train_b
        self._shape = shape

        self.train_preference_expected: float | None = None
        if held_out is not None:
            m, h = train.shape[0], held_out.shape[0]
            self.train_preference_expected = m / (m + h)

        self.history: list[dict[str, Any]] = []
        self._reset_detection()

    # ---- measuring ------------------------------------------------------------------------

    def measure(
        self,
        step: int,
        samples: torch.Tensor,
        *,
        samples_b: torch.Tensor | None = None,
        held_out_loss: float | None = None,
    ) -> dict[str, Any]:
        """Score one round of samples, append the row to :attr:`history`, update the detections.

        Args:
            step: the training step, an int >= 0 greater than every earlier call's.
            samples: ``[n, C, H, W]`` model A's samples (C, H, W as ``train``'s).
            samples_b: ``[n, C, H, W]`` model B's samples from the same starting and reverse
                noise, paired by row; required exactly when the monitor has ``train_b``.
            held_out_loss: the held-out loss at this step (finite), or None.

        Returns:
            The row: ``step``, ``held_out_loss``, ``n``, ``nn_distance_median``,
            ``gu_memorized_fraction`` (+ ``_ci_low``, ``_ci_high``); with ``held_out``:
            ``train_preference`` (+ CI; None where no sample is left, see the class
            docstring), ``train_preference_expected``; with two models:
            ``paired_distance_median``, ``paired_valid``, ``split_preference_a``,
            ``split_preference_b`` (+ CIs; None where no sample is valid); then ``drifting``,
            ``drift_reasons`` and ``notes``. Definitions: :meth:`summary`'s ``"definitions"``.
        """
        step = check_int("step", step, 0)
        if self.history and step <= self.history[-1]["step"]:
            raise ValueError(
                f"step must be greater than the previous measurement's step "
                f"{self.history[-1]['step']}, got {step}"
            )
        samples = _check_images("samples", samples, self._shape)
        if self._train_b is None and samples_b is not None:
            raise ValueError("samples_b needs a monitor built with train_b; got samples_b")
        if self._train_b is not None:
            if samples_b is None:
                raise ValueError("samples_b is required: this monitor was built with train_b")
            samples_b = _check_images("samples_b", samples_b, self._shape)
            if samples_b.shape[0] != samples.shape[0]:
                raise ValueError(
                    f"samples_b must pair row by row with samples' {samples.shape[0]} rows, got "
                    f"{samples_b.shape[0]}"
                )
        loss = _check_loss(held_out_loss)

        device, dtype = self._train.device, self._train.dtype
        samples = samples.detach().to(device=device, dtype=dtype)
        row: dict[str, Any] = {"step": step, "held_out_loss": loss, "n": samples.shape[0]}

        nb = nearest_distances(samples, self._train, 2, backend=self.backend)
        gu = gu_ratio(
            nb,
            threshold=self.threshold,
            resamples=self.resamples,
            level=self.level,
            generator=self._generator(step, _GU),
        )
        row["nn_distance_median"] = float(np.median(nb.distances[:, 0].cpu().numpy()))
        _put(row, "gu_memorized_fraction", gu.fraction, gu.ci)

        notes: list[str] = []
        varies = _varies(samples)
        if self._held_out is not None:
            self._measure_train_preference(row, notes, samples[varies])

        if self._train_b is not None:
            samples_b = samples_b.detach().to(device=device, dtype=dtype)
            self._measure_pairs(row, notes, samples, samples_b, varies, step)

        reasons = self._drift_reasons(row)
        row["drifting"] = bool(reasons)
        row["drift_reasons"] = ",".join(reasons)
        row["notes"] = "; ".join(notes)
        self.history.append(row)
        self._update(row)
        return dict(row)

    def _measure_train_preference(
        self, row: dict[str, Any], notes: list[str], kept: torch.Tensor
    ) -> None:
        """The train preference of ``kept``, the samples not constant in every channel."""
        h = self._held_out.shape[0]
        n, count = row["n"], kept.shape[0]
        if count == 0:
            row["train_preference"] = None
            row["train_preference_ci_low"] = row["train_preference_ci_high"] = None
        else:
            # One exact search, held-out rows first: a tie goes to the lower index, held-out.
            union = (self._held_out, self._train)
            nearest = nearest_distances(kept, union, 1, backend=self.backend)
            hits = int((nearest.indices[:, 0] >= h).sum())
            row["train_preference"] = hits / count
            low, high = _exact_interval(hits, count, self.level)
            row["train_preference_ci_low"], row["train_preference_ci_high"] = low, high
        row["train_preference_expected"] = self.train_preference_expected
        if count < n:
            notes.append(
                f"train_preference over {count} of {n} samples: the others have every channel "
                f"constant"
            )

    def _measure_pairs(
        self,
        row: dict[str, Any],
        notes: list[str],
        samples: torch.Tensor,
        samples_b: torch.Tensor,
        valid_a: torch.Tensor,
        step: int,
    ) -> None:
        """The paired distance and the split preferences, each over the samples for which the
        standardized similarity is defined (not every channel constant; ``valid_a`` [n] bool
        marks model A's)."""
        n = samples.shape[0]
        valid_b = _varies(samples_b)
        both = valid_a & valid_b
        row["paired_valid"] = int(both.sum())
        if row["paired_valid"] > 0:
            paired = paired_similarity(samples[both], samples_b[both], metric="standardized")
            row["paired_distance_median"] = paired.median_distance
        else:
            row["paired_distance_median"] = None
        if row["paired_valid"] < n:
            notes.append(
                f"paired_distance_median over {row['paired_valid']} of {n} pairs: the others "
                f"hold a sample with every channel constant"
            )
        count_a, count_b = int(valid_a.sum()), int(valid_b.sum())
        if count_a == 0 and count_b == 0:
            for key in ("split_preference_a", "split_preference_b"):
                row[key] = row[f"{key}_ci_low"] = row[f"{key}_ci_high"] = None
            notes.append("no split preference: every sample has every channel constant")
            return
        # split_preference needs both sides: a model with no valid sample borrows the other's
        # rows, and its half of the answer is dropped.
        qa = samples[valid_a] if count_a else samples_b[valid_b]
        qb = samples_b[valid_b] if count_b else qa
        split = split_preference(
            qa, qb, self._train, self._train_b, metric="standardized", backend=self.backend
        )
        # Similarities: own > other is a preference for the own split.
        for key, count, own, other, tag, model in (
            ("split_preference_a", count_a, split.own_a, split.other_a, _SPLIT_A, "A"),
            ("split_preference_b", count_b, split.own_b, split.other_b, _SPLIT_B, "B"),
        ):
            if count == 0:
                row[key] = row[f"{key}_ci_low"] = row[f"{key}_ci_high"] = None
            else:
                self._put_preference(row, key, _preference(-own, -other), step, tag)
            if count < n:
                notes.append(
                    f"{key} over {count} of {n} samples: model {model}'s others have every "
                    f"channel constant"
                )

    def _put_preference(self, row, key, score, step, tag) -> None:
        ci = bootstrap_interval(score, self.resamples, self.level, self._generator(step, tag))
        _put(row, key, float(score.mean()), ci)

    def _generator(self, step: int, tag: int) -> torch.Generator:
        """A stream per (seed, step, measure): rows depend only on their own inputs."""
        state = np.random.SeedSequence([self.seed, step, tag]).generate_state(1, np.uint64)
        return torch.Generator().manual_seed(int(state[0]))

    def _train_bar(self) -> float:
        """e + margin (1 - e): the lower bound's bar for a share ``margin`` of copies."""
        e = self.train_preference_expected
        return e + self.margin * (1.0 - e)

    def _drift_reasons(self, row: dict[str, Any]) -> list[str]:
        bar = 0.5 + self.margin
        reasons = []
        if row.get("train_preference") is not None and (
            row["train_preference_ci_low"] > self._train_bar()
        ):
            reasons.append("train_preference")
        if row["gu_memorized_fraction_ci_low"] > 0.0:
            reasons.append("gu")
        for key in ("split_preference_a", "split_preference_b"):
            if row.get(key) is not None and row[f"{key}_ci_low"] > bar:
                reasons.append(key)
        return reasons

    # ---- detection ------------------------------------------------------------------------

    def _reset_detection(self) -> None:
        self.best_step: int | None = None
        self.best_held_out_loss: float | None = None
        self.drift_step: int | None = None
        self.drift_detected_at: int | None = None
        self._run_start: int | None = None
        self._run_length = 0

    def _update(self, row: dict[str, Any]) -> None:
        loss = row["held_out_loss"]
        if loss is not None and (self.best_held_out_loss is None or loss < self.best_held_out_loss):
            self.best_step, self.best_held_out_loss = row["step"], loss
        if self.drift_step is not None:
            return
        if not row["drifting"]:
            self._run_start, self._run_length = None, 0
            return
        if self._run_length == 0:
            self._run_start = row["step"]
        self._run_length += 1
        if self._run_length >= self.patience:
            self.drift_step, self.drift_detected_at = self._run_start, row["step"]

    @property
    def should_stop(self) -> bool:
        """True once a drift has been detected."""
        return self.drift_step is not None

    # ---- reporting ------------------------------------------------------------------------

    def drift_rule(self) -> str:
        """The drift rule as it applies to this monitor, in words."""
        bar = 0.5 + self.margin
        parts = []
        if self._held_out is not None:
            parts.append(
                f"train_preference_ci_low > {self._train_bar():.4g} (= e + margin (1 - e), "
                f"e = train_preference_expected = {self.train_preference_expected:.4g}: a lower "
                f"bound above {self.margin:g} on the share of samples copying training images)"
            )
        parts.append("gu_memorized_fraction_ci_low > 0")
        exact = "exact binomial for train_preference, " if self._held_out is not None else ""
        if self._train_b is not None:
            parts.append(f"split_preference_a_ci_low > {bar:g}")
            parts.append(f"split_preference_b_ci_low > {bar:g}")
        return (
            f"a measurement is drifting when {' or '.join(parts)} "
            f"({self.level:g} intervals: {exact}percentile bootstrap with {self.resamples} "
            f"resamples); "
            f"drift_step = the first step of the first run of {self.patience} consecutive "
            f"drifting measurements"
        )

    def summary(self) -> dict[str, Any]:
        """JSON-ready report: the detections, the last row, the configuration, the drift rule
        and the definitions of every row key."""
        notes = []
        if self._held_out is None:
            rules = (
                "the Gu and split-preference rules" if self._train_b is not None else "the Gu rule"
            )
            notes.append(f"no held-out set: train_preference is not measured; only {rules} apply")
        if self._train_b is None:
            notes.append("one model: no paired distance or split preference")
        keys = self._row_keys()
        definitions = {k: v for k, v in DEFINITIONS.items() if k in keys or k.startswith("*")}
        return {
            "best_step": self.best_step,
            "best_held_out_loss": self.best_held_out_loss,
            "drift_step": self.drift_step,
            "drift_detected_at": self.drift_detected_at,
            "should_stop": self.should_stop,
            "measurements": len(self.history),
            "last": dict(self.history[-1]) if self.history else None,
            "config": self._config(),
            "drift_rule": self.drift_rule(),
            "notes": notes,
            "definitions": definitions,
        }

    def _row_keys(self) -> list[str]:
        keys = ["step", "held_out_loss", "n", "nn_distance_median", "gu_memorized_fraction"]
        if self._held_out is not None:
            keys += ["train_preference", "train_preference_expected"]
        if self._train_b is not None:
            keys += [
                "paired_distance_median",
                "paired_valid",
                "split_preference_a",
                "split_preference_b",
            ]
        return [*keys, "drifting", "drift_reasons", "notes"]

    def plot(self, path: str | os.PathLike) -> None:
        """Write a PNG: the held-out loss (left axis) and the memorization measures (right
        axis, bootstrap intervals shaded) against the step, with vertical lines at
        ``best_step`` and ``drift_step``."""
        plot_monitor(
            path,
            self.history,
            expected_preference=self.train_preference_expected,
            two_models=self._train_b is not None,
            best_step=self.best_step,
            drift_step=self.drift_step,
        )

    # ---- state ----------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "train_shape": list(self._train.shape),
            "held_out_shape": None if self._held_out is None else list(self._held_out.shape),
            "train_b_shape": None if self._train_b is None else list(self._train_b.shape),
            "threshold": self.threshold,
            "margin": self.margin,
            "patience": self.patience,
            "resamples": self.resamples,
            "level": self.level,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the configuration it must be resumed with and the history
        (detections are recomputed from it on load)."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into a monitor built on the same data with the same
        arguments: the history and the detections, exactly.

        Raises:
            ValueError: naming the first key whose saved value differs from this monitor's, or
                a malformed part of ``state``.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        for key in ("version", "config", "history"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"state['version'] must be {_STATE_VERSION}, got {state['version']!r}")
        mine = self._config()
        saved = state["config"]
        if not isinstance(saved, dict):
            raise ValueError(f"state['config'] must be a dict, got {type(saved).__name__}")
        for key, value in mine.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"state['config'][{key!r}] is {saved.get(key)!r}, but this monitor has "
                    f"{value!r}: resume with the same data and arguments"
                )
        history = state["history"]
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise ValueError("state['history'] must be a list of row dicts")
        steps = [row.get("step") for row in history]
        if any(not isinstance(s, int) for s in steps) or any(
            b <= a for a, b in itertools.pairwise(steps)
        ):
            raise ValueError("state['history'] steps must be ints in strictly increasing order")
        keys = self._row_keys()
        for i, row in enumerate(history):
            missing = [k for k in keys if k not in row]
            if missing:
                raise ValueError(f"state['history'][{i}] lacks {missing}")
        self.history = [dict(row) for row in history]
        self._reset_detection()
        for row in self.history:
            self._update(row)


# ---- helpers ------------------------------------------------------------------------------


def _check_images(name: str, x: Any, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    x = check_samples(name, x, 4, "[N, C, H, W]")
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"{name} images must have train's shape [C, H, W] = {list(shape)}, got "
            f"{list(x.shape[1:])}"
        )
    return x.detach()


def _check_loss(loss: Any) -> float | None:
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"held_out_loss must be a scalar, got shape {list(loss.shape)}")
        loss = loss.item()
    return check_float("held_out_loss", loss)


def _varies(x: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the rows with a channel that is not constant, i.e. whose standardized
    vector is defined, by the very features the standardized metric compares."""
    return torch.isfinite(knn_features(x, "standardized")).all(dim=1)


def _check_varies(name: str, x: torch.Tensor) -> None:
    bad = ~_varies(x)
    if bool(bad.any()):
        raise ValueError(
            f"{name} row {int(bad.nonzero()[0, 0])} has every channel constant: the split "
            f"preference (standardized similarity) is undefined for it"
        )


def _exact_interval(k: int, n: int, level: float) -> tuple[float, float]:
    """Clopper-Pearson interval of a binomial fraction ``k / n`` at coverage ``level``: the
    p at which P(X >= k) and P(X <= k) equal (1 - level) / 2, by bisection on exact tails."""
    tail = (1.0 - level) / 2
    j = np.arange(n + 1, dtype=np.float64)
    log_comb = math.lgamma(n + 1) - np.array(
        [math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in range(n + 1)]
    )

    def lower(hits: int) -> float:
        """The p with P(X >= hits) = tail (0 for no hits); P(X >= hits) rises with p."""
        if hits == 0:
            return 0.0
        lo, hi = 0.0, 1.0
        i, c = j[hits:], log_comb[hits:]
        for _ in range(64):  # 64 halvings: an absolute error below 1e-19
            p = (lo + hi) / 2
            log_pmf = c + i * math.log(p) + (n - i) * math.log1p(-p)
            top = log_pmf.max()
            if top + math.log(np.exp(log_pmf - top).sum()) < math.log(tail):
                lo = p
            else:
                hi = p
        return (lo + hi) / 2

    # By symmetry (X -> n - X, p -> 1 - p) the upper bound is 1 - lower(n - k).
    return lower(k), 1.0 - lower(n - k)


def _preference(d_own: torch.Tensor, d_other: torch.Tensor) -> torch.Tensor:
    """Per sample: 1 where own is strictly nearer, 1/2 on a tie, 0 otherwise ([n] float64)."""
    d_own, d_other = d_own.double().cpu(), d_other.double().cpu()
    return (d_own < d_other).double() + 0.5 * (d_own == d_other).double()


def _put(row: dict[str, Any], key: str, value: float, ci: tuple[float, float]) -> None:
    row[key] = float(value)
    row[f"{key}_ci_low"], row[f"{key}_ci_high"] = float(ci[0]), float(ci[1])
