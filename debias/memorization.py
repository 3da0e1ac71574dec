"""Memorization and biased-generalization scores of generated samples, on the exact kNN op.

Every measure compares generated ``samples [n, ...]`` with a training set, searched exactly by
:func:`debias.knn` (a tensor, a numpy array, the path of a .npy file, or an iterable of chunks:
larger than memory is fine). Distances and similarities are those of the float64 brute force.

    d_j(x)      = ||x - y_j|| / sqrt(d)       y_j the j-th nearest training image, d values
                                              per sample: per-pixel-normalised L2 (RMS)
    Gu et al. 2023          memorized  <=>  d_1 / d_2 < 1/3   (sail-sg/DiffMemorize)
    Carlini et al. 2023     extracted  <=>  d_1 < delta        ((l2, delta)-extraction)
    Somepalli et al. 2023   s(x) = max_y cos(f(x), f(y)), fraction above 0.5, beside the
                            same for each training image against the rest of the training set
    Biased generalization   two models trained on disjoint splits A, B from the same starting
    (arXiv 2603.03469)      and reverse noise: sim(a_i, b_i) after per-channel
                            standardisation and L2 normalisation (median 1 - sim), and each
                            sample's top-1 similarity to its own split against the other's

Where the papers leave room:

- d_1 = d_2 = 0 (the sample equals a training image that appears twice): the ratio 0/0 is
  defined as 0, memorized. A ratio is otherwise d_1 / d_2 in [0, 1].
- Fractions come with a percentile bootstrap interval over samples: ``resamples`` draws of n
  samples with replacement from a seeded generator, the (1 - level)/2 and (1 + level)/2
  quantiles (linear interpolation) of the resampled fractions.
- The Somepalli baseline excludes each training image itself (``debias.knn(...,
  exclude_self=True)``); an exact duplicate elsewhere in the training set still counts.
- "Closer to its own split" is strict: own similarity > other similarity; ties count as not.
- Medians and percentiles interpolate linearly (numpy's): the median of an even count is the
  mean of the two middle values.

Features: pixels (each sample flattened) by default; ``features=`` takes any callable
``[b, ...] -> [b, f]`` (an SSCD or DINO model), applied in batches of ``batch_size`` under
``torch.no_grad()`` to the samples and to every training chunk (moved to the samples' device
first), so a streamed training set stays streamed. With features, "pixel" in the
definitions above reads "feature": d is f.

Results are dataclasses of Python floats and tensors (per-sample tensors on the samples'
device); each has ``summary()``, a JSON-ready dict of Python numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from debias import reference
from debias.checks import (
    FLOAT_DTYPES,
    check_float,
    check_generator,
    check_int,
    check_samples,
    check_tensor,
)
from debias.ops.knn import knn, open_npy, read_chunks

__all__ = [
    "BiasedGeneralization",
    "CarliniResult",
    "GuResult",
    "Neighbours",
    "PairedSimilarity",
    "SomepalliResult",
    "SplitPreference",
    "biased_generalization",
    "bootstrap_interval",
    "carlini_extraction",
    "extract_features",
    "gu_ratio",
    "memorization_report",
    "nearest_distances",
    "paired_similarity",
    "somepalli_similarity",
    "split_preference",
]

Extractor = Callable[[torch.Tensor], torch.Tensor]
# Elements of the [resamples, n] index block drawn at once by the bootstrap.
_BOOTSTRAP_BLOCK = 2**22


# ---- results ------------------------------------------------------------------------------


@dataclass
class Neighbours:
    """The k nearest training rows of each sample.

    Attributes:
        distances: ``[n, k]`` float64, ascending, L2 divided by sqrt(dim).
        indices: ``[n, k]`` int64 training rows, ties broken by the lower index.
        dim: d, the number of values compared per sample (pixels or features).
    """

    distances: torch.Tensor
    indices: torch.Tensor
    dim: int

    def summary(self) -> dict[str, Any]:
        return {
            "k": self.distances.shape[1],
            "dim": self.dim,
            "mean_distance": self.distances.mean(0).tolist(),
            "median_distance": np.median(_np(self.distances), axis=0).tolist(),
        }


@dataclass
class GuResult:
    """Gu et al.'s nearest-over-second-nearest ratio.

    Attributes:
        ratio: ``[n]`` float64, d_1 / d_2 (0 where d_1 = d_2 = 0).
        memorized: ``[n]`` bool, ratio < threshold.
        fraction: memorized fraction; ``ci``: its bootstrap interval at ``level``.
        neighbours: the search it was computed from (k >= 2).
    """

    ratio: torch.Tensor
    memorized: torch.Tensor
    fraction: float
    ci: tuple[float, float]
    threshold: float
    level: float
    resamples: int
    neighbours: Neighbours

    def summary(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "fraction": self.fraction,
            "ci": list(self.ci),
            "level": self.level,
            "resamples": self.resamples,
            "count": int(self.memorized.sum()),
            "n": self.ratio.numel(),
            "ratio_median": _median(self.ratio),
            "ratio_min": float(self.ratio.min()),
        }


@dataclass
class CarliniResult:
    """Carlini et al.'s (l2, delta) extraction.

    Attributes:
        distance: ``[n]`` float64, d_1 (L2 / sqrt(d) to the nearest training row).
        nearest: ``[n]`` int64, that row.
        extracted: ``[n]`` bool, distance < delta; ``indices``: the extracted samples' indices.
        fraction, ci, level, resamples: the extracted fraction and its bootstrap interval.
    """

    distance: torch.Tensor
    nearest: torch.Tensor
    extracted: torch.Tensor
    indices: torch.Tensor
    fraction: float
    ci: tuple[float, float]
    delta: float
    level: float
    resamples: int

    def summary(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "fraction": self.fraction,
            "ci": list(self.ci),
            "level": self.level,
            "resamples": self.resamples,
            "count": int(self.extracted.sum()),
            "n": self.distance.numel(),
            "distance_median": _median(self.distance),
            "distance_min": float(self.distance.min()),
            "extracted_samples": self.indices.tolist(),
        }


@dataclass
class SomepalliResult:
    """Somepalli et al.'s top-1 similarity, against the train-vs-train baseline.

    Attributes:
        similarity: ``[n]`` float64, each sample's largest similarity to a training row.
        nearest: ``[n]`` int64, that row.
        stats: percentiles ``"p50"``, ... (linear interpolation), ``"max"`` and ``"mean"``.
        fraction_above: fraction with similarity > threshold.
        baseline_similarity, baseline_rows: ``[r]`` the same for training rows ``baseline_rows``
            against the rest of the training set (None without a baseline).
        baseline_stats, baseline_fraction_above: as above, for the baseline.
    """

    similarity: torch.Tensor
    nearest: torch.Tensor
    stats: dict[str, float]
    fraction_above: float
    threshold: float
    metric: str
    baseline_similarity: torch.Tensor | None = None
    baseline_rows: torch.Tensor | None = None
    baseline_stats: dict[str, float] | None = None
    baseline_fraction_above: float | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric,
            "threshold": self.threshold,
            "similarity": self.stats,
            "fraction_above": self.fraction_above,
        }
        if self.baseline_stats is not None:
            out["baseline"] = {
                "rows": self.baseline_similarity.numel(),
                "similarity": self.baseline_stats,
                "fraction_above": self.baseline_fraction_above,
            }
        return out


@dataclass
class PairedSimilarity:
    """Similarity of sample i of model A with sample i of model B.

    Attributes:
        similarity: ``[n]`` float64 in [-1, 1].
        median_distance: median of 1 - similarity (the paper's curve over checkpoints).
        mean_similarity: mean similarity.
    """

    similarity: torch.Tensor
    median_distance: float
    mean_similarity: float
    metric: str

    def summary(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "median_distance": self.median_distance,
            "mean_similarity": self.mean_similarity,
            "n": self.similarity.numel(),
        }


@dataclass
class SplitPreference:
    """Each sample's top-1 similarity to its own model's training split and to the other's.

    Attributes:
        own_a, other_a: ``[n_a]`` float64, samples of A to train A and to train B.
        own_b, other_b: ``[n_b]`` float64, samples of B to train B and to train A.
        fraction_own_a, fraction_own_b: fraction with own > other (strict), per model.
        fraction_own: the same over the samples of both models together.
    """

    own_a: torch.Tensor
    other_a: torch.Tensor
    own_b: torch.Tensor
    other_b: torch.Tensor
    fraction_own_a: float
    fraction_own_b: float
    fraction_own: float
    metric: str

    def summary(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "fraction_own_a": self.fraction_own_a,
            "fraction_own_b": self.fraction_own_b,
            "fraction_own": self.fraction_own,
            "median_own_a": _median(self.own_a),
            "median_other_a": _median(self.other_a),
            "median_own_b": _median(self.own_b),
            "median_other_b": _median(self.other_b),
        }


@dataclass
class BiasedGeneralization:
    """Both two-model measures of arXiv 2603.03469."""

    paired: PairedSimilarity
    split: SplitPreference
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"paired": self.paired.summary(), "split": self.split.summary(), **self.extra}


# ---- validation (once, at the door) -------------------------------------------------------


def _check_train(name: str, train: Any, samples: torch.Tensor, pixels: bool) -> Any:
    """The training source, checked as far as is possible without reading it (a .npy path is
    memory-mapped); numpy arrays and tensors must hold samples shaped like ``samples``' rows
    (when compared as pixels)."""
    if isinstance(train, str | os.PathLike):
        train = open_npy(name, train)
    if isinstance(train, torch.Tensor):
        check_tensor(name, train)
    if isinstance(train, torch.Tensor | np.ndarray):
        if train.ndim < 2 or train.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty [m, ...] array, got {list(train.shape)}")
        if pixels and tuple(train.shape[1:]) != tuple(samples.shape[1:]):
            raise ValueError(
                f"{name} rows must have the samples' shape {list(samples.shape[1:])}, got "
                f"{list(train.shape[1:])}"
            )
        return train
    if isinstance(train, Iterable):
        return train
    raise TypeError(
        f"{name} must be a tensor, a numpy array, the path of a .npy file or an iterable of "
        f"chunks, got {type(train).__name__}"
    )


def _check_extractor(features: Any, batch_size: Any) -> None:
    if features is not None and not callable(features):
        raise TypeError(f"features must be a callable [b, ...] -> [b, f] or None, got {features!r}")
    check_int("batch_size", batch_size, 1)


def _generator(generator: Any) -> torch.Generator:
    """A CPU generator from ``generator`` (one, or an int seed); None is refused, so that a
    bootstrap is reproducible."""
    if generator is None:
        raise TypeError("generator must be a torch.Generator or an int seed, got None")
    return check_generator(generator, "the bootstrap draws on the CPU", seed=True)


def _reusable(train: Any) -> Any:
    """One-shot iterators (generators) are read into a list, to be searched more than once."""
    return list(train) if isinstance(train, Iterator) else train


# ---- features -----------------------------------------------------------------------------


def _apply(extractor: Extractor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = extractor(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"features must return a tensor, got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"features must map [b, ...] to [b, f], got {list(x.shape)} -> {list(out.shape)}"
        )
    if out.dtype not in FLOAT_DTYPES:
        out = out.float()
    return out


def extract_features(
    x: torch.Tensor,
    features: Extractor | None = None,
    batch_size: int = 256,
    *,
    module: torch.nn.Module | None = None,
) -> torch.Tensor:
    """``features`` applied to ``x [n, ...]`` in batches of ``batch_size`` under
    ``torch.no_grad()``: ``[n, f]`` on x's device; ``x`` itself without an extractor. With
    ``module`` (the network behind ``features``), each batch moves to the module's device and
    the module runs in eval mode, its mode restored after. The package's one feature extraction
    loop: the scores here and debias.pipeline's evaluation and studies use it."""
    x = check_samples("x", x, numpy=True)
    _check_extractor(features, batch_size)
    if module is not None and not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module or None, got {type(module).__name__}")
    return _extract(x, features, batch_size, module)


def _extract(
    x: torch.Tensor,
    features: Extractor | None,
    batch_size: int,
    module: torch.nn.Module | None = None,
) -> torch.Tensor:
    """:func:`extract_features` on checked arguments."""
    if features is None:
        return x
    device = x.device
    if module is not None:
        device = next((p.device for p in module.parameters()), x.device)
    was_training = module is not None and module.training
    if was_training:
        module.eval()
    try:
        out = [
            _apply(features, x[lo : lo + batch_size].to(device)).to(x.device)
            for lo in range(0, len(x), batch_size)
        ]
    finally:
        if was_training:
            module.train()
    return torch.cat(out)


# Rows read at once from a training source that is a tensor, an array or a .npy file.
_SOURCE_VALUES = 2**24


def _source_chunks(train: Any) -> Iterator[torch.Tensor]:
    """The training source's chunks as tensors (a .npy file, memory-mapped at the door, read
    in slices by debias.ops.knn.read_chunks, the package's one chunk reader)."""
    rows = max(1, _SOURCE_VALUES // max(1, math.prod(getattr(train, "shape", (0, 1))[1:])))
    for chunk in read_chunks(train, rows):
        if not isinstance(chunk, torch.Tensor):
            raise TypeError(f"train chunks must be tensors or arrays, got {type(chunk).__name__}")
        yield chunk


def _feature_stream(
    train: Any, features: Extractor, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    for chunk in _source_chunks(train):
        yield _extract(chunk.to(device), features, batch_size)


def _database(train: Any, features: Extractor | None, batch_size: int, device) -> Any:
    """What debias.knn searches: the source itself, or a stream of its features."""
    if features is None:
        return train
    return _feature_stream(train, features, batch_size, device)


def _materialize(train: Any, features: Extractor | None, batch_size: int, device) -> torch.Tensor:
    """The whole training set's features (or pixels) as one tensor ``[m, f]``."""
    if features is not None:
        return torch.cat(list(_feature_stream(train, features, batch_size, device)))
    if isinstance(train, torch.Tensor):
        return train.to(device)
    chunks = list(_source_chunks(train))
    if not chunks:
        raise ValueError("train is empty")
    return torch.cat([c.to(device) for c in chunks])


def _search(name, queries, database, k, metric, backend, progress, exclude_self=False):
    try:
        return knn(
            queries,
            database,
            k,
            metric,
            exclude_self=exclude_self,
            backend=backend,
            progress=progress,
        )
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


# ---- statistics ---------------------------------------------------------------------------


def bootstrap_interval(
    values: torch.Tensor,
    resamples: int = 1000,
    level: float = 0.95,
    generator: torch.Generator | int = 0,
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values [n]`` (bool or float) that
    every score here reports: ``resamples`` draws of n values with replacement from
    ``generator`` (a ``torch.Generator`` or an int seed), the (1 - level)/2 and (1 + level)/2
    quantiles of the resampled means (linear interpolation)."""
    values = check_tensor("values", values)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty [n] tensor, got {list(values.shape)}")
    check_int("resamples", resamples, 1)
    level = check_float("level", level, 0.0, high=1.0, high_inclusive=False)
    return _bootstrap(values, resamples, level, _generator(generator))


def _bootstrap(
    values: torch.Tensor, resamples: int, level: float, generator: torch.Generator
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values [n]``."""
    values = values.detach().double().cpu()
    n = values.numel()
    block = max(1, _BOOTSTRAP_BLOCK // n)
    means = []
    for lo in range(0, resamples, block):
        idx = torch.randint(n, (min(block, resamples - lo), n), generator=generator)
        means.append(values[idx].mean(dim=1))
    tail = (1.0 - level) / 2
    q = torch.quantile(torch.cat(means), torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(q[0]), float(q[1])


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def _median(x: torch.Tensor) -> float:
    """numpy's median: the mean of the two middle values for even n (torch.median takes the
    lower one)."""
    return float(np.median(_np(x)))


def _stats(x: torch.Tensor, percentiles: tuple[float, ...]) -> dict[str, float]:
    """Percentiles (linear interpolation, numpy's default), max and mean."""
    x = _np(x)
    q = np.percentile(x, list(percentiles))
    out = {f"p{p:g}": float(v) for p, v in zip(percentiles, q, strict=True)}
    out.update(max=float(x.max()), mean=float(x.mean()))
    return out


# ---- the measures -------------------------------------------------------------------------


def nearest_distances(
    samples: torch.Tensor,
    train: Any,
    k: int = 2,
    *,
    features: Extractor | None = None,
    batch_size: int = 256,
    backend: str | None = None,
    progress: bool | Callable[[Iterable], Iterable] = False,
) -> Neighbours:
    """Per-pixel-normalised L2 distances ``||x - y|| / sqrt(d)`` from each sample to its k
    nearest training rows, exactly.

    Args:
        samples: ``[n, ...]`` float tensor of generated samples.
        train: ``[m, ...]`` training set: tensor, numpy array, .npy path or iterable of chunks.
        k: neighbours per sample (default 2: enough for :func:`gu_ratio`).
        features: optional extractor ``[b, ...] -> [b, f]``; d is then f.
        batch_size: the extractor's batch size.
        backend, progress: passed to :func:`debias.knn`.

    Returns:
        :class:`Neighbours` (distances ``[n, k]`` float64 ascending, indices ``[n, k]``).
    """
    samples = check_samples("samples", samples, numpy=True)
    _check_extractor(features, batch_size)
    train = _check_train("train", train, samples, features is None)
    check_int("k", k, 1)
    queries = _extract(samples, features, batch_size)
    db = _database(train, features, batch_size, samples.device)
    dist, idx = _search("train", queries, db, k, "l2", backend, progress)
    dim = math.prod(queries.shape[1:])
    return Neighbours(dist / math.sqrt(dim), idx, dim)


def _neighbours_or_search(samples, train, k, kwargs) -> Neighbours:
    if isinstance(samples, Neighbours):
        if train is not None:
            raise ValueError("train must be None when samples is a Neighbours search result")
        if samples.distances.shape[1] < k:
            raise ValueError(
                f"samples: the Neighbours hold k={samples.distances.shape[1]}, need {k}"
            )
        return samples
    if train is None:
        raise ValueError("train is required unless samples is a Neighbours search result")
    return nearest_distances(samples, train, k, **kwargs)


def gu_ratio(
    samples: torch.Tensor | Neighbours,
    train: Any = None,
    *,
    threshold: float = 1 / 3,
    resamples: int = 1000,
    level: float = 0.95,
    generator: torch.Generator | int = 0,
    features: Extractor | None = None,
    batch_size: int = 256,
    backend: str | None = None,
    progress: bool | Callable[[Iterable], Iterable] = False,
) -> GuResult:
    """Gu et al. (2023): a sample is memorized when d_1 / d_2 < ``threshold``.

    Args:
        samples: ``[n, ...]`` samples, or a :class:`Neighbours` with k >= 2 (then ``train`` is
            None and no search runs: one search serves this and :func:`carlini_extraction`).
        train: the training set (see :func:`nearest_distances`).
        threshold: in (0, 1] (default 1/3, the paper's).
        resamples, level, generator: the percentile bootstrap over samples (1000 draws, 95%,
            seed 0; a ``torch.Generator`` or an int seed).

    Returns:
        :class:`GuResult`. d_1 = d_2 = 0 (a sample equal to a duplicated training image) gives
        ratio 0: memorized.
    """
    threshold = check_float("threshold", threshold, 0.0, high=1.0)
    check_int("resamples", resamples, 1)
    level = check_float("level", level, 0.0, high=1.0, high_inclusive=False)
    gen = _generator(generator)
    kw = dict(features=features, batch_size=batch_size, backend=backend, progress=progress)
    nb = _neighbours_or_search(samples, train, 2, kw)
    d1, d2 = nb.distances[:, 0], nb.distances[:, 1]
    ratio = torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, 1.0), 0.0)
    memorized = ratio < threshold
    ci = _bootstrap(memorized, resamples, level, gen)
    return GuResult(
        ratio, memorized, float(memorized.double().mean()), ci, threshold, level, resamples, nb
    )


def carlini_extraction(
    samples: torch.Tensor | Neighbours,
    train: Any = None,
    *,
    delta: float = 0.15,
    resamples: int = 1000,
    level: float = 0.95,
    generator: torch.Generator | int = 0,
    features: Extractor | None = None,
    batch_size: int = 256,
    backend: str | None = None,
    progress: bool | Callable[[Iterable], Iterable] = False,
) -> CarliniResult:
    """Carlini et al. (2023) (l2, delta)-extraction: d_1 = ||x - y_1|| / sqrt(d) < ``delta``.

    ``delta`` is in the data's units: the same images in [-1, 1] are twice as far apart as in
    [0, 1]. The default 0.15 is the value Carlini et al. report; choose it for your scale.
    Arguments as in :func:`gu_ratio` (a :class:`Neighbours` with k >= 1 is accepted).
    """
    delta = check_float("delta", delta, 0.0)
    check_int("resamples", resamples, 1)
    level = check_float("level", level, 0.0, high=1.0, high_inclusive=False)
    gen = _generator(generator)
    kw = dict(features=features, batch_size=batch_size, backend=backend, progress=progress)
    nb = _neighbours_or_search(samples, train, 1, kw)
    distance, nearest = nb.distances[:, 0], nb.indices[:, 0]
    extracted = distance < delta
    return CarliniResult(
        distance,
        nearest,
        extracted,
        extracted.nonzero()[:, 0],
        float(extracted.double().mean()),
        _bootstrap(extracted, resamples, level, gen),
        delta,
        level,
        resamples,
    )


def somepalli_similarity(
    samples: torch.Tensor,
    train: Any,
    *,
    threshold: float = 0.5,
    metric: str = "cosine",
    percentiles: tuple[float, ...] = (50, 95, 99),
    baseline: bool = True,
    baseline_size: int | None = None,
    generator: torch.Generator | int = 0,
    features: Extractor | None = None,
    batch_size: int = 256,
    backend: str | None = None,
    progress: bool | Callable[[Iterable], Iterable] = False,
) -> SomepalliResult:
    """Somepalli et al. (2023): top-1 similarity of each sample to the training set, and the
    same for training rows against the rest of the training set.

    Args:
        samples, train: as in :func:`nearest_distances`.
        threshold: similarity above which a sample counts as a replica (default 0.5).
        metric: "cosine" (default) or "standardized" (per-channel standardised first).
        percentiles: reported percentiles of the similarities, each in [0, 100].
        baseline: also compute the train-vs-train baseline (each row's own index excluded).
            It needs the training set's features in memory (m x f values).
        baseline_size: compare only this many training rows, drawn without replacement by
            ``generator``, against the whole training set (default: every row).
        features, batch_size: the feature extractor (default: pixels).

    Returns:
        :class:`SomepalliResult`.
    """
    samples = check_samples("samples", samples, numpy=True)
    _check_extractor(features, batch_size)
    train = _check_train("train", train, samples, features is None)
    threshold = check_float("threshold", threshold, -1.0, inclusive=True, high=1.0)
    if metric not in ("cosine", "standardized"):
        raise ValueError(f"metric must be 'cosine' or 'standardized', got {metric!r}")
    for p in percentiles:
        check_float("percentiles", p, 0.0, inclusive=True, high=100.0)
    if baseline_size is not None:
        check_int("baseline_size", baseline_size, 1)
    gen = _generator(generator)
    queries = _extract(samples, features, batch_size)
    if baseline:
        db = _materialize(train, features, batch_size, samples.device)
    else:
        db = _database(train, features, batch_size, samples.device)
    dist, idx = _search("train", queries, db, 1, metric, backend, progress)
    sim = 1.0 - dist[:, 0]
    result = SomepalliResult(
        sim,
        idx[:, 0],
        _stats(sim, percentiles),
        float((sim > threshold).double().mean()),
        threshold,
        metric,
    )
    if not baseline:
        return result
    m = db.shape[0]
    if m < 2:
        raise ValueError(f"train needs at least 2 rows for the baseline, got {m}")
    if baseline_size is None or baseline_size >= m:
        rows = torch.arange(m, device=db.device)
        bdist, _ = _search("train", db, db, 1, metric, backend, progress, exclude_self=True)
        bdist = bdist[:, 0]
    else:
        rows = torch.randperm(m, generator=gen)[:baseline_size].sort().values.to(db.device)
        bdist, bidx = _search("train", db[rows], db, 2, metric, backend, progress)
        # Its own row is the nearest unless an exact duplicate of lower index ties with it:
        # either way the first neighbour that is not the row itself is the one wanted.
        bdist = torch.where(bidx[:, 0] == rows, bdist[:, 1], bdist[:, 0])
    bsim = 1.0 - bdist
    result.baseline_similarity, result.baseline_rows = bsim, rows
    result.baseline_stats = _stats(bsim, percentiles)
    result.baseline_fraction_above = float((bsim > threshold).double().mean())
    return result


def _standardized(name: str, x: torch.Tensor, metric: str) -> torch.Tensor:
    v = reference.knn_features(x, metric)
    bad = ~torch.isfinite(v).all(dim=1)
    if bool(bad.any()):
        what = "is zero" if metric == "cosine" else "has every channel constant"
        raise ValueError(f"{name} row {int(bad.nonzero()[0, 0])} {what}: no similarity defined")
    return v


def paired_similarity(
    samples_a: torch.Tensor,
    samples_b: torch.Tensor,
    *,
    metric: str = "standardized",
    features: Extractor | None = None,
    batch_size: int = 256,
) -> PairedSimilarity:
    """Similarity of sample i of model A with sample i of model B (same starting and reverse
    noise), as in arXiv 2603.03469: each sample's channels standardised (dim 1 of
    ``[n, C, ...]``), the sample made a unit vector, then the dot product
    (``debias.reference.knn_features``, the definition the kNN op uses).

    Args:
        samples_a, samples_b: ``[n, ...]`` float tensors of the same shape, paired by row.
        metric: "standardized" (default, the paper's) or "cosine".
        features, batch_size: optional extractor applied to both first.
    """
    samples_a = check_samples("samples_a", samples_a, numpy=True)
    samples_b = check_samples("samples_b", samples_b, numpy=True)
    if samples_a.shape != samples_b.shape:
        raise ValueError(
            f"samples_b must have samples_a's shape {list(samples_a.shape)}, got "
            f"{list(samples_b.shape)}"
        )
    if metric not in ("cosine", "standardized"):
        raise ValueError(f"metric must be 'cosine' or 'standardized', got {metric!r}")
    _check_extractor(features, batch_size)
    fa = _standardized("samples_a", _extract(samples_a, features, batch_size), metric)
    fb = _standardized("samples_b", _extract(samples_b, features, batch_size), metric)
    sim = (fa * fb).sum(dim=1)
    return PairedSimilarity(sim, _median(1.0 - sim), float(sim.mean()), metric)


def split_preference(
    samples_a: torch.Tensor,
    samples_b: torch.Tensor,
    train_a: Any,
    train_b: Any,
    *,
    metric: str = "standardized",
    features: Extractor | None = None,
    batch_size: int = 256,
    backend: str | None = None,
    progress: bool | Callable[[Iterable], Iterable] = False,
) -> SplitPreference:
    """Each sample's top-1 similarity to its own model's training split versus the other
    model's (arXiv 2603.03469): model A's samples against train A and train B, model B's
    against train B and train A; the fraction strictly closer to their own split. Without
    memorization of the split, ~0.5.

    Args:
        samples_a, samples_b: ``[n_a, ...]``, ``[n_b, ...]`` samples of the two models.
        train_a, train_b: their disjoint training splits (tensor, array, .npy path or
            iterable; a one-shot iterator is read into memory, as each split is searched twice).
        metric: "standardized" (default) or "cosine".
    """
    samples_a = check_samples("samples_a", samples_a, numpy=True)
    samples_b = check_samples("samples_b", samples_b, numpy=True)
    if samples_a.shape[1:] != samples_b.shape[1:]:
        raise ValueError(
            f"samples_b rows must have samples_a's shape {list(samples_a.shape[1:])}, got "
            f"{list(samples_b.shape[1:])}"
        )
    if metric not in ("cosine", "standardized"):
        raise ValueError(f"metric must be 'cosine' or 'standardized', got {metric!r}")
    _check_extractor(features, batch_size)
    pixels = features is None
    train_a = _reusable(_check_train("train_a", train_a, samples_a, pixels))
    train_b = _reusable(_check_train("train_b", train_b, samples_a, pixels))
    qa = _extract(samples_a, features, batch_size)
    qb = _extract(samples_b, features, batch_size)

    def top1(name, q, train):
        db = _database(train, features, batch_size, q.device)
        return 1.0 - _search(name, q, db, 1, metric, backend, progress)[0][:, 0]

    own_a, other_a = top1("train_a", qa, train_a), top1("train_b", qa, train_b)
    own_b, other_b = top1("train_b", qb, train_b), top1("train_a", qb, train_a)
    closer_a, closer_b = own_a > other_a, own_b > other_b
    return SplitPreference(
        own_a,
        other_a,
        own_b,
        other_b,
        float(closer_a.double().mean()),
        float(closer_b.double().mean()),
        float(torch.cat((closer_a, closer_b)).double().mean()),
        metric,
    )


def biased_generalization(
    samples_a: torch.Tensor,
    samples_b: torch.Tensor,
    train_a: Any,
    train_b: Any,
    *,
    metric: str = "standardized",
    features: Extractor | None = None,
    batch_size: int = 256,
    backend: str | None = None,
    progress: bool | Callable[[Iterable], Iterable] = False,
) -> BiasedGeneralization:
    """:func:`paired_similarity` and :func:`split_preference` together (arXiv 2603.03469):
    two models on disjoint splits, sampled from the same starting and reverse noise."""
    paired = paired_similarity(
        samples_a, samples_b, metric=metric, features=features, batch_size=batch_size
    )
    split = split_preference(
        samples_a,
        samples_b,
        train_a,
        train_b,
        metric=metric,
        features=features,
        batch_size=batch_size,
        backend=backend,
        progress=progress,
    )
    return BiasedGeneralization(paired, split)


def memorization_report(
    samples: torch.Tensor,
    train: Any,
    *,
    samples_b: torch.Tensor | None = None,
    train_b: Any = None,
    k: int = 2,
    threshold: float = 1 / 3,
    delta: float = 0.15,
    similarity_threshold: float = 0.5,
    metric: str = "cosine",
    baseline_size: int | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    features: Extractor | None = None,
    batch_size: int = 256,
    backend: str | None = None,
    progress: bool | Callable[[Iterable], Iterable] = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every measure that applies, as ``(summary, results)``: a JSON-ready dict and the result
    objects (``"nearest"``, ``"gu"``, ``"carlini"``, ``"somepalli"``; with ``samples_b`` and
    ``train_b``, the same for model B under ``"b_..."`` and ``"biased_generalization"``).

    One L2 search (k = max(k, 2)) per model serves the nearest distances, Gu and Carlini.
    ``metric`` is the Somepalli similarity; the two-model measures use "standardized", the
    paper's. ``seed`` seeds every bootstrap and the baseline subset.
    """
    if (samples_b is None) != (train_b is None):
        raise ValueError("samples_b and train_b go together: give both or neither")
    check_int("k", k, 1)
    train = _reusable(train)
    train_b = _reusable(train_b) if train_b is not None else None
    common = dict(features=features, batch_size=batch_size, backend=backend, progress=progress)
    stats = dict(resamples=resamples, level=level)

    def one_model(s, t):
        nb = nearest_distances(s, t, max(k, 2), **common)
        shown = Neighbours(nb.distances[:, :k], nb.indices[:, :k], nb.dim)
        gu = gu_ratio(nb, threshold=threshold, generator=seed, **stats)
        carlini = carlini_extraction(nb, delta=delta, generator=seed, **stats)
        som = somepalli_similarity(
            s,
            t,
            threshold=similarity_threshold,
            metric=metric,
            baseline_size=baseline_size,
            generator=seed,
            **common,
        )
        results = {"nearest": shown, "gu": gu, "carlini": carlini, "somepalli": som}
        order = torch.argsort(gu.ratio.cpu(), stable=True)[:8]
        top = [
            {
                "sample": int(i),
                "train": int(nb.indices[i, 0]),
                "ratio": float(gu.ratio[i]),
                "d1": float(nb.distances[i, 0]),
                "d2": float(nb.distances[i, 1]),
            }
            for i in order.tolist()
        ]
        summary = {
            "nearest": shown.summary(),
            "gu": gu.summary(),
            "carlini": carlini.summary(),
            "somepalli": som.summary(),
            "most_memorized": top,
        }
        return summary, results

    summary, results = one_model(samples, train)
    if samples_b is not None:
        summary_b, results_b = one_model(samples_b, train_b)
        summary["model_b"] = summary_b
        results.update({f"b_{key}": value for key, value in results_b.items()})
        bg = biased_generalization(samples, samples_b, train, train_b, **common)
        summary["biased_generalization"] = bg.summary()
        results["biased_generalization"] = bg
    return summary, results
