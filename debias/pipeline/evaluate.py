"""Evaluation of a diffusion model and its samples: fidelity and diversity (PRDC), the Fréchet
distance in a feature space learnt from the data, the colour shift, and the per-timestep
estimation error that the Debias paper analyses.

PRDC, for real features x_1..x_n and fake features y_1..y_m:

    r_i = distance of x_i to its k-th nearest other real point   (real balls B(x_i, r_i))
    s_j = distance of y_j to its k-th nearest other fake point   (fake balls B(y_j, s_j))
    precision = (1/m) sum_j 1[exists i: ||y_j - x_i|| <= r_i]    Kynkäänniemi et al. 2019
    recall    = (1/n) sum_i 1[exists j: ||x_i - y_j|| <= s_j]    Kynkäänniemi et al. 2019
    density   = 1/(k m) sum_j #{i: ||y_j - x_i|| <= r_i}         Naeem et al. 2020
    coverage  = (1/n) sum_i 1[min_j ||x_i - y_j|| <= r_i]        Naeem et al. 2020

Balls are closed (<=), as in Kynkäänniemi et al.'s code; Naeem et al.'s code
(clovaai/generative-evaluation-prdc) compares with a strict <: the two differ only on exact
ties. Radii and nearest fakes come from :func:`debias.knn` (exact, float64); the ball counts
stream over blocks of ``_CHUNK`` x ``_CHUNK`` pairs, each a float64 distance computed from the
differences (``torch.cdist`` without the matmul expansion), so no n x m matrix is ever built.

Fréchet distance, in float64:

    FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})
    tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i),  lambda = eig(S_a^{1/2} S_b S_a^{1/2})

(S_a S_b and S_a^{1/2} S_b S_a^{1/2} have the same eigenvalues, and the second matrix is
symmetric, so no general square root such as scipy's ``sqrtm`` is needed.) Covariances use
the n - 1 denominator (numpy's ``np.cov``, as pytorch-fid). No Inception weights exist offline,
so the features are those of :class:`FeatureNet`, a small classifier trained on the data
itself (:func:`train_feature_net`); :func:`inception_features` runs a local TorchScript
extractor when the user has one.

Timestep analysis (Yu et al. 2023, "Unmasking Bias in Diffusion Model Training"): at each t,
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the model's output is converted to eps_hat and
x0_hat, and the errors ||eps - eps_hat||^2 / d and ||x0 - x0_hat||^2 / d are averaged over the
images (d values per image). With x_t fixed, x0 - x0_hat = (eps_hat - eps) / sqrt(snr), so a
constant epsilon error becomes a large x0 error at high t: the bias the paper measures.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from debias.checks import check_float, check_int, check_samples
from debias.memorization import extract_features
from debias.ops.knn import knn
from debias.pipeline.plotting import plot_timestep_analysis
from debias.schedules import FAMILIES, PREDICTIONS, NoiseSchedule, as_schedule
from debias.weighting import resolve_prediction

# The targets timestep_analysis inverts from (a, b) alone: those of every family (EDM's "raw"
# output needs its c_skip and c_out).
_PREDICTIONS = tuple(name for name, p in PREDICTIONS.items() if p.families == FAMILIES)

__all__ = [
    "FeatureNet",
    "channel_mean_shift",
    "class_proportions",
    "evaluate",
    "frechet_distance",
    "inception_features",
    "prdc",
    "timestep_analysis",
    "train_feature_net",
    "write_timestep_analysis",
]

# Rows per side of one block of PRDC ball tests: a block holds _CHUNK^2 float64 distances.
_CHUNK = 1024
# Data images the timestep analysis of evaluate() runs on.
_TIMESTEP_IMAGES = 512
# Timesteps the analysis visits when none are given.
_DEFAULT_TIMESTEPS = 20

Extractor = Callable[[torch.Tensor], torch.Tensor]


# ---- validation (once, at the door) -------------------------------------------------------


def _check_feature_pair(
    name_a: str, a: Any, name_b: str, b: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature sets ``[n, f]`` and ``[m, f]`` with the same f."""
    a = check_samples(name_a, a, 2, "[n, f]")
    b = check_samples(name_b, b, 2, "[m, f]")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same feature size, got {a.shape[1]} and "
            f"{b.shape[1]}"
        )
    return a, b


def _check_prediction(prediction: Any, schedule: NoiseSchedule) -> str:
    prediction = resolve_prediction(schedule, prediction)
    if prediction not in _PREDICTIONS:
        raise ValueError(f"prediction must be one of {_PREDICTIONS} or None, got {prediction!r}")
    return prediction


def _check_labels(labels: Any, n: int) -> torch.Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor [N] or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(
            f"labels must be an int tensor [N], got {labels.dtype} {list(labels.shape)}"
        )
    if labels.numel() != n:
        raise ValueError(f"labels must hold one label per image ({n}), got {labels.numel()}")
    return labels


# ---- PRDC ---------------------------------------------------------------------------------


def prdc(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 5) -> dict[str, Any]:
    """Precision, recall, density and coverage of fake features against real ones.

    Definitions in the module docstring: closed k-NN balls, radii from :func:`debias.knn`
    with ``exclude_self=True`` (a duplicate of a point elsewhere in its set still counts as a
    neighbour, at distance 0), exact float64 distances.

    Args:
        real_features: ``[n, f]`` float tensor, n > k (the real radii need k other points).
        fake_features: ``[m, f]`` float tensor, m > k (the fake radii of recall).
        k: the neighbourhood size (default 5, Naeem et al.'s choice).

    Returns:
        ``{"precision", "recall", "density", "coverage"}`` as Python floats (density may
        exceed 1), with ``"k"``, ``"n_real"`` and ``"n_fake"``. Memory: O((n + m) k) plus one
        ``_CHUNK`` x ``_CHUNK`` block; time O(n m f).
    """
    real, fake = _check_feature_pair("real_features", real_features, "fake_features", fake_features)
    k = check_int("k", k, 1)
    for name, x in (("real_features", real), ("fake_features", fake)):
        if k >= x.shape[0]:
            raise ValueError(
                f"k must be smaller than the rows of {name} ({x.shape[0]}: a radius needs k "
                f"other points), got k={k}"
            )
    real = real.double()
    fake = fake.double().to(real.device)
    real_radii = knn(real, real, k, exclude_self=True)[0][:, -1]
    fake_radii = knn(fake, fake, k, exclude_self=True)[0][:, -1]
    fake_in_real = _ball_counts(fake, real, real_radii)
    real_in_fake = _ball_counts(real, fake, fake_radii)
    nearest_fake = knn(real, fake, 1)[0][:, 0]
    n, m = real.shape[0], fake.shape[0]
    return {
        "precision": float((fake_in_real > 0).double().mean()),
        "recall": float((real_in_fake > 0).double().mean()),
        "density": float(fake_in_real.sum()) / (k * m),
        "coverage": float((nearest_fake <= real_radii).double().mean()),
        "k": k,
        "n_real": n,
        "n_fake": m,
    }


def _ball_counts(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """``[p]`` int64: how many closed balls ``B(centres[i], radii[i])`` hold each point, over
    blocks of ``_CHUNK`` x ``_CHUNK`` float64 distances computed from differences."""
    chunk = _CHUNK
    counts = torch.zeros(points.shape[0], dtype=torch.int64, device=points.device)
    for lo in range(0, points.shape[0], chunk):
        block = points[lo : lo + chunk]
        for clo in range(0, centres.shape[0], chunk):
            # cdist's difference path: sum (a - b)^2 per pair, no ||a||^2 + ||b||^2 - 2ab.
            d = torch.cdist(
                block, centres[clo : clo + chunk], compute_mode="donot_use_mm_for_euclid_dist"
            )
            counts[lo : lo + chunk] += (d <= radii[clo : clo + chunk]).sum(dim=1)
    return counts


# ---- Fréchet distance ---------------------------------------------------------------------


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets, in float64.

    ``FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2}))``
    with unbiased (n - 1) covariances. Both square roots come from symmetric
    eigendecompositions; eigenvalues below 0 (rounding of a positive semi-definite matrix) are
    clamped to 0, and so is a total below 0 (the distance is >= 0, a negative total is
    rounding when the two sets agree).

    Args:
        features_a: ``[n, f]`` float tensor, n >= 2.
        features_b: ``[m, f]`` float tensor, m >= 2.

    Returns:
        The distance as a Python float.
    """
    a, b = _check_feature_pair("features_a", features_a, "features_b", features_b)
    for name, x in (("features_a", a), ("features_b", b)):
        if x.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows for a covariance, got {x.shape[0]}")
    a = a.double()
    b = b.double().to(a.device)
    f = a.shape[1]
    cov_a = torch.cov(a.T).reshape(f, f)
    cov_b = torch.cov(b.T).reshape(f, f)
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    eig = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0.0)
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    fd = mean_term + cov_a.trace() + cov_b.trace() - 2.0 * eig.sqrt().sum()
    return max(float(fd), 0.0)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix, negative eigenvalues
    (rounding) clamped to 0."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp(min=0.0).sqrt()) @ v.T


# ---- feature network ----------------------------------------------------------------------


class FeatureNet(nn.Module):
    """A compact CNN classifier whose penultimate layer is the feature space of the Fréchet
    distance and PRDC (there are no Inception weights offline).

    Three blocks conv3x3 -> GroupNorm -> SiLU (widths w, 2w, 4w; the last two stride 2),
    global average pooling to ``feature_dim = 4w`` values, then a linear classifier.

    Args:
        in_channels: C of the ``[N, C, H, W]`` images (in [-1, 1]).
        num_classes: outputs of the classifier head.
        width: w (default 32: 128 features).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 1)
        check_int("width", width, 8)
        if width % 8:
            raise ValueError(f"width must be a multiple of 8 (GroupNorm groups), got {width}")
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        self.feature_dim = 4 * width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()
            )

        self.body = nn.Sequential(
            block(in_channels, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2)
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, feature_dim]``: the pooled penultimate activations."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> class logits ``[N, num_classes]``."""
        return self.head(self.features(x))


def train_feature_net(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> tuple[FeatureNet, float]:
    """Trains a :class:`FeatureNet` to classify the labelled images.

    A seeded 10% of the labelled images (at least one) is held out; the rest trains the
    network with Adam and a cosine learning-rate decay, batches drawn with replacement. The
    initial weights and the batches come from ``seed`` alone (the global RNG is untouched),
    so on the CPU the result is the same for the same seed and thread count.

    Args:
        images: ``[N, C, H, W]`` float tensor in [-1, 1] (trained on its device).
        labels: ``[N]`` int tensor, -1 where unlabelled (those images are not used).
        steps: optimiser steps (default 300).
        batch_size: images per step (default 128, at most the training images).
        lr: peak learning rate (default 2e-3).
        seed: the split, the initial weights and the batches.
        progress: a progress bar over the steps.

    Returns:
        ``(network in eval mode, accuracy on the held-out images)``.

    Raises:
        ValueError naming ``labels`` when there are no labels (None or all -1) or fewer than
        two classes: the caller reports the Fréchet distance as unavailable for that reason.
    """
    x = check_samples("images", images, 4, "[N, C, H, W]")
    y = _check_labels(labels, x.shape[0])
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
    check_float("lr", lr, 0.0)
    if y is None or bool((y < 0).all()):
        raise ValueError(
            "labels: the data is unlabelled (no labels, or all -1); the feature network is a "
            "classifier and needs class labels"
        )
    keep = (y >= 0).nonzero().flatten()
    x, y = x[keep], y[keep].to(torch.int64)
    classes = torch.unique(y)
    if classes.numel() < 2:
        raise ValueError(
            f"labels: the labelled images hold one class ({int(classes[0])}); a classifier "
            "needs at least two"
        )
    n = y.numel()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_test = max(1, round(0.1 * n))
    test, train = perm[:n_test], perm[n_test:]
    device = x.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(x.shape[1], int(y.max()) + 1)
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    batch = min(batch_size, train.numel())
    net.train()
    for step in tqdm(range(steps), desc="feature net", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        idx = train[torch.randint(train.numel(), (batch,), generator=gen)].to(device)
        loss = F.cross_entropy(net(x[idx].float()), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for lo in range(0, n_test, 512):
            idx = test[lo : lo + 512].to(device)
            correct += int((net(x[idx].float()).argmax(1) == y[idx].to(device)).sum())
    return net, correct / n_test


@torch.no_grad()
def class_proportions(
    classifier: FeatureNet, samples: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """Class shares of generated samples, as ``classifier`` labels them, against the data's.

    The measure of "Deeper Diffusion Models Amplify Bias" (arXiv 2505.17560): a model amplifies
    bias when its samples over-represent the data's majority class.

    Args:
        classifier: a :class:`FeatureNet` trained on the data (:func:`train_feature_net`).
        samples: ``[n, C, H, W]`` generated images.
        labels: ``[m]`` the data's labels, -1 where unlabelled (not counted).

    Returns:
        ``data`` and ``samples``: the share of each class 0..K-1 (lists); ``majority``: the
        data's most frequent class; ``majority_shift``: its share in the samples minus in the
        data (> 0: amplified); ``total_variation``: half the L1 distance of the two.
    """
    if not isinstance(classifier, FeatureNet):
        raise TypeError(f"classifier must be a FeatureNet, got {type(classifier).__name__}")
    samples = check_samples("samples", samples, 4, "[n, C, H, W]")
    if isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point():
        known = labels[labels >= 0].to(torch.int64).cpu()
    else:
        raise TypeError(f"labels must be a 1-D integer tensor, got {labels!r:.80}")
    classes = classifier.num_classes
    if known.numel() == 0 or int(known.max()) >= classes:
        raise ValueError(
            f"labels must hold at least one class in [0, {classes}) (the classifier's), got "
            f"{known.unique().tolist()[:10]}"
        )
    data = torch.bincount(known, minlength=classes).double() / known.numel()
    was_training = classifier.training
    classifier.eval()
    predicted = torch.cat(
        [classifier(batch.float()).argmax(1).cpu() for batch in samples.split(512)]
    )
    classifier.train(was_training)
    generated = torch.bincount(predicted, minlength=classes).double() / predicted.numel()
    majority = int(data.argmax())
    return {
        "data": data.tolist(),
        "samples": generated.tolist(),
        "majority": majority,
        "majority_shift": float(generated[majority] - data[majority]),
        "total_variation": float((generated - data).abs().sum() / 2),
    }


def inception_features(
    images: torch.Tensor,
    weights: str | os.PathLike | Extractor,
    *,
    batch_size: int = 64,
    size: int | None = None,
    channels: int | None = None,
    input_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Features of a user's local TorchScript extractor (an Inception-like network).

    Nothing is downloaded: ``weights`` is the path of a file ``torch.jit.load`` reads (or the
    loaded module). Images go through, in order: grey to ``channels`` by repetition (when
    given), a bilinear resize to ``size`` x ``size`` (when given), and a linear map from
    [-1, 1] to ``input_range`` (e.g. (0, 255) for StyleGAN's inception-2015-12-05.pt, (0, 1)
    for pytorch-fid's); the module's output is flattened per image.

    Args:
        images: ``[N, C, H, W]`` float tensor in [-1, 1].
        weights: path of a TorchScript file, or a callable ``[b, C', H', W'] -> [b, ...]``.
        batch_size: images per call (default 64).
        size: side the images are resized to (default: unchanged).
        channels: channels the extractor wants (default: unchanged); C must be 1 or equal it.
        input_range: the range [-1, 1] is mapped to (default (-1, 1): unchanged).

    Returns:
        ``[N, f]`` float32 features on the images' device.
    """
    x = check_samples("images", images, 4, "[N, C, H, W]")
    check_int("batch_size", batch_size, 1)
    if size is not None:
        check_int("size", size, 1)
    if channels is not None:
        check_int("channels", channels, 1)
        if x.shape[1] not in (1, channels):
            raise ValueError(
                f"channels={channels} needs images with 1 or {channels} channels, got {x.shape[1]}"
            )
    lo, hi = (float(v) for v in input_range)
    if isinstance(weights, str | os.PathLike):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise ValueError(f"weights: no such file {path!r} (nothing is downloaded)")
        extractor = torch.jit.load(path, map_location=x.device)
        extractor.eval()
    elif callable(weights):
        extractor = weights
    else:
        raise TypeError(f"weights must be a path or a callable, got {type(weights).__name__}")

    def apply(b: torch.Tensor) -> torch.Tensor:
        b = b.float()
        if channels is not None and b.shape[1] != channels:
            b = b.expand(-1, channels, -1, -1)
        if size is not None and tuple(b.shape[2:]) != (size, size):
            b = F.interpolate(b, size=(size, size), mode="bilinear", align_corners=False)
        b = (b + 1.0) * ((hi - lo) / 2.0) + lo
        return extractor(b).reshape(b.shape[0], -1).float()

    return extract_features(x, apply, batch_size)


# ---- colour shift -------------------------------------------------------------------------


def channel_mean_shift(samples: torch.Tensor, data: torch.Tensor) -> dict[str, Any]:
    """The per-channel colour shift of samples against the data (Yu et al. 2023 report it
    for models trained with the constant weighting).

    Args:
        samples: ``[n, C, H, W]`` float tensor.
        data: ``[m, C, H', W']`` float tensor, the same C.

    Returns:
        Lists of C Python floats: ``"sample_mean"``, ``"data_mean"``, ``"mean_shift"``
        (sample mean minus data mean), ``"sample_std"``, ``"data_std"`` (population standard
        deviations over images and pixels), ``"std_ratio"`` (sample std / data std, None for a
        constant data channel), and ``"max_abs_shift"``: the largest |mean shift|.
    """
    s = check_samples("samples", samples, 4, "[n, C, H, W]")
    d = check_samples("data", data, 4, "[m, C, H, W]")
    if s.shape[1] != d.shape[1]:
        raise ValueError(
            f"samples and data must have the same channels, got {s.shape[1]} and {d.shape[1]}"
        )
    s = s.double().transpose(0, 1).reshape(s.shape[1], -1)
    d = d.double().transpose(0, 1).reshape(d.shape[1], -1).to(s.device)
    s_mean, d_mean = s.mean(1), d.mean(1)
    s_std, d_std = s.std(1, unbiased=False), d.std(1, unbiased=False)
    shift = s_mean - d_mean
    ratio = [float(a / b) if b > 0 else None for a, b in zip(s_std, d_std, strict=True)]
    return {
        "sample_mean": s_mean.tolist(),
        "data_mean": d_mean.tolist(),
        "mean_shift": shift.tolist(),
        "sample_std": s_std.tolist(),
        "data_std": d_std.tolist(),
        "std_ratio": ratio,
        "max_abs_shift": float(shift.abs().max()),
    }


# ---- timestep analysis --------------------------------------------------------------------


def _default_timesteps(num_timesteps: int) -> list[int]:
    count = min(_DEFAULT_TIMESTEPS, num_timesteps)
    grid = torch.linspace(0, num_timesteps - 1, count, dtype=torch.float64).round().long()
    return sorted(set(grid.tolist()))


def _model_device(model: Any, default: torch.device) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return default


def timestep_analysis(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    timesteps: Sequence[int] | None = None,
    *,
    prediction: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The model's one-step estimation error of eps and of x0 at each timestep.

    The noise is ``torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed),
    dtype=x0.dtype)``, drawn once on the CPU and shared by every t (common random numbers:
    the rows differ by t alone). At each t, ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``
    (in x0's dtype) goes to ``model(x_t, t [B] int64)`` in batches of ``batch_size``, on the
    model's device (its parameters', else x0's), under ``torch.no_grad()`` in eval mode (the
    module's mode is restored after). With a = sqrt(abar), b = sqrt(1 - abar), the output o
    is read as (float64, from the x_t the model saw):

        "epsilon":       eps_hat = o,                x0_hat = (x_t - b o) / a
        "v_prediction":  eps_hat = b x_t + a o,      x0_hat = a x_t - b o
        "sample":        eps_hat = (x_t - a o) / b,  x0_hat = o
        "flow":          eps_hat = (x_t + a o) / (a + b),  x0_hat = (x_t - b o) / (a + b)

    On a flow-matching schedule a = 1 - sigma, b = sigma, ``t`` indexes the schedule's table
    and the model sees its float timestep; ``"abar"`` is then a^2. A model with 2C output
    channels (learned variance) is read on its first C.

    Args:
        model: ``(x_t [B, C, H, W], t [B] int64) -> [B, C, H, W]``.
        schedule: a NoiseSchedule (or a diffusers scheduler).
        x0: ``[n, C, H, W]`` float tensor of clean images.
        timesteps: the t to visit, each in [0, T) (default: 20 evenly spaced, 0 and T - 1
            included).
        prediction: what the model predicts (default ``schedule.prediction_type``).
        seed: the noise.
        batch_size: images per model call (default 256).
        progress: a progress bar over the timesteps.

    Returns:
        One dict per timestep, in the given order: ``"t"``, ``"abar"``, ``"snr"``,
        ``"eps_mse"`` (mean over images of ||eps - eps_hat||^2 / d), ``"x0_mse"`` (the same
        for x0), ``"x0_channel_mean_errors"`` (per channel, the mean over images and pixels of
        x0_hat - x0) and ``"x0_channel_mean_error"`` (its largest absolute value). The x0
        entries are None where x0_hat is undefined (epsilon prediction at abar = 0).
    """
    if not callable(model):
        raise TypeError(f"model must be callable (x_t, t) -> prediction, got {model!r}")
    schedule = as_schedule(schedule)
    x0 = check_samples("x0", x0, 4, "[n, C, H, W]")
    prediction = _check_prediction(prediction, schedule)
    check_int("seed", seed, 0)
    check_int("batch_size", batch_size, 1)
    T = schedule.num_timesteps
    if timesteps is None:
        steps = _default_timesteps(T)
    else:
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.flatten().tolist()
        steps = list(timesteps)
        if not steps:
            raise ValueError("timesteps must hold at least one timestep, got none")
        for t in steps:
            if check_int("timesteps", t, 0) >= T:
                raise ValueError(f"timesteps must be ints in [0, {T}), got {t!r}")
    device = _model_device(model, x0.device)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training:
        model.eval()
    try:
        rows = [
            _timestep_row(model, schedule, x0, noise, t, prediction, batch_size, device)
            for t in tqdm(steps, desc="timesteps", disable=not progress)
        ]
    finally:
        if was_training:
            model.train()
    return rows


def _timestep_row(model, schedule, x0, noise, t, prediction, batch_size, device) -> dict:
    if schedule.family == "ddpm":
        abar = float(schedule.alphas_cumprod[t])
        a, b = math.sqrt(abar), math.sqrt(1.0 - abar)
        timestep = torch.tensor(t, dtype=torch.int64)
    else:  # flow: x_t = (1 - sigma) x0 + sigma eps, the model sees the float timestep
        a, b = float(schedule.alpha[t]), float(schedule.sigma[t])
        abar = a * a
        timestep = schedule.timesteps[t].float()
    x0_defined = not (prediction == "epsilon" and a == 0.0)
    channels = x0.shape[1]
    eps_sq = x0_sq = 0.0
    channel_err = torch.zeros(channels, dtype=torch.float64)
    for lo in range(0, x0.shape[0], batch_size):
        clean = x0[lo : lo + batch_size].double()
        eps = noise[lo : lo + batch_size].double()
        x_t = (a * clean + b * eps).to(x0.dtype)
        t_batch = timestep.expand(x_t.shape[0]).to(device)
        with torch.no_grad():
            out = model(x_t.to(device), t_batch)
        if isinstance(out, torch.Tensor) and out.shape[1] == 2 * channels:
            out = out[:, :channels]  # learned variance: the prediction is the first C channels
        if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model must return a tensor {list(x_t.shape)}, got {got}")
        out = out.detach().to(x0.device, torch.float64)
        x_t = x_t.double()
        if prediction == "epsilon":
            eps_hat = out
            x0_hat = (x_t - b * out) / a if x0_defined else None
        elif prediction == "v_prediction":
            eps_hat, x0_hat = b * x_t + a * out, a * x_t - b * out
        elif prediction == "flow":  # out = eps - x0
            eps_hat, x0_hat = (x_t + a * out) / (a + b), (x_t - b * out) / (a + b)
        else:  # sample
            eps_hat, x0_hat = (x_t - a * out) / b, out
        eps_sq += float((eps - eps_hat).square().sum())
        if x0_hat is not None:
            err = x0_hat - clean
            x0_sq += float(err.square().sum())
            channel_err += err.transpose(0, 1).reshape(channels, -1).sum(1).cpu()
    total = x0.numel()
    row = {"t": int(t), "abar": abar, "snr": float(schedule.snr[t]), "eps_mse": eps_sq / total}
    if x0_defined:
        per_channel = channel_err / (total // channels)
        row.update(
            x0_mse=x0_sq / total,
            x0_channel_mean_error=float(per_channel.abs().max()),
            x0_channel_mean_errors=per_channel.tolist(),
        )
    else:
        row.update(x0_mse=None, x0_channel_mean_error=None, x0_channel_mean_errors=None)
    return row


_CSV_COLUMNS = ("t", "abar", "snr", "eps_mse", "x0_mse", "x0_channel_mean_error")


def write_timestep_analysis(
    rows: Sequence[dict[str, Any]], csv_path: str | os.PathLike, png_path: str | os.PathLike
) -> None:
    """Writes :func:`timestep_analysis` rows as a CSV (one row per t; the per-channel errors
    as columns ``x0_channel_mean_error_c0``, ...; None as an empty cell) and a two-panel PNG:
    eps MSE and x0 MSE against t, log y (zero and undefined values are left out)."""
    rows = list(rows)
    if not rows or not all(isinstance(r, dict) and set(_CSV_COLUMNS) <= r.keys() for r in rows):
        raise ValueError(f"rows must be a non-empty list of dicts with keys {_CSV_COLUMNS}")
    channels = max(len(r.get("x0_channel_mean_errors") or ()) for r in rows)
    header = [*_CSV_COLUMNS, *(f"x0_channel_mean_error_c{c}" for c in range(channels))]
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in rows:
            per_channel = list(r.get("x0_channel_mean_errors") or [None] * channels)
            values = [r[c] for c in _CSV_COLUMNS] + per_channel
            writer.writerow(["" if v is None else v for v in values])

    plot_timestep_analysis(rows, png_path)


# ---- everything at once -------------------------------------------------------------------


def _features(extractor: Any, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``[n, f]`` float64 features: ``extractor.features`` for a FeatureNet, else the callable
    itself (its output flattened per image), through the package's one extraction loop."""
    fn = extractor.features if isinstance(extractor, FeatureNet) else extractor
    module = extractor if isinstance(extractor, nn.Module) else None
    flat = extract_features(x, lambda b: fn(b).reshape(b.shape[0], -1), batch_size, module=module)
    return flat.to(torch.float64)


def _subset(x: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    if count >= x.shape[0]:
        return x
    return x[torch.randperm(x.shape[0], generator=gen)[:count].to(x.device)]


def _json_ready(value: Any) -> Any:
    """Non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def evaluate(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    data_images: torch.Tensor,
    data_labels: torch.Tensor | None,
    samples: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    feature_net: Any = None,
    k: int = 5,
    seed: int = 0,
    prediction: str | None = None,
    timesteps: Sequence[int] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every evaluation that applies to a model and its samples, written to ``out_dir``.

    - Feature space: ``feature_net`` (a :class:`FeatureNet`, whose ``features`` is used, or
      any callable ``[b, C, H, W] -> [b, f]``); without one, a FeatureNet trained on the data
      by :func:`train_feature_net` (its held-out accuracy is recorded). Unlabelled data (no
      labels, all -1, or one class) trains none: PRDC then runs on pixels and the Fréchet
      distance is null, with the reason under ``"fd_unavailable"``.
    - PRDC (:func:`prdc`): on seeded subsets of real and generated images of equal size,
      min(n, m), as Naeem et al. compare them; null with ``"prdc_unavailable"`` when that is
      not more than k.
    - Fréchet distance (:func:`frechet_distance`): all data features against all samples'.
    - :func:`channel_mean_shift` of the samples against the data.
    - :func:`class_proportions` of the samples, as the FeatureNet classifies them, against the
      data's labels (null with ``"class_proportions_unavailable"`` without labels or with a
      feature extractor that is not a FeatureNet).
    - :func:`timestep_analysis` on a seeded subset of at most 512 data images.

    Args:
        model: ``(x_t, t [B] int64) -> prediction``, for the timestep analysis.
        schedule: the model's NoiseSchedule.
        data_images: ``[m, C, H, W]`` training (or reference) images in [-1, 1].
        data_labels: ``[m]`` int labels, -1 where unlabelled, or None.
        samples: ``[n, C, H, W]`` generated images (the caller draws them).
        out_dir: created if needed; receives evaluation.json, timesteps.csv, timesteps.png.
        feature_net, k, seed, prediction, timesteps, progress: as above and in the functions
            named (seed drives every subset, the feature network and the noise).

    Returns:
        The dict written to evaluation.json (strict JSON: non-finite numbers become null).
    """
    if not callable(model):
        raise TypeError(f"model must be callable (x_t, t) -> prediction, got {model!r}")
    schedule = as_schedule(schedule)
    data = check_samples("data_images", data_images, 4, "[m, C, H, W]")
    labels = _check_labels(data_labels, data.shape[0])
    fake = check_samples("samples", samples, 4, "[n, C, H, W]")
    if fake.shape[1:] != data.shape[1:]:
        raise ValueError(
            f"samples must be shaped like data_images {list(data.shape[1:])}, got "
            f"{list(fake.shape[1:])}"
        )
    if feature_net is not None and not callable(feature_net):
        raise TypeError(
            f"feature_net must be a FeatureNet, a callable or None, got {feature_net!r}"
        )
    k = check_int("k", k, 1)
    check_int("seed", seed, 0)
    prediction = _check_prediction(prediction, schedule)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {
        "n_samples": fake.shape[0],
        "n_data": data.shape[0],
        "image_shape": list(data.shape[1:]),
        "seed": seed,
        "prediction": prediction,
    }
    fd_reason = None
    if feature_net is None:
        try:
            feature_net, accuracy = train_feature_net(data, labels, seed=seed, progress=progress)
            report["feature_net"] = {"source": "trained", "held_out_accuracy": accuracy}
        except ValueError as err:
            if not str(err).startswith("labels"):
                raise
            fd_reason = f"no feature space for the Fréchet distance: {err}"
            report["feature_net"] = None
    else:
        report["feature_net"] = {"source": "given", "held_out_accuracy": None}

    if feature_net is not None:
        report["feature_space"] = "feature_net"
        data_feat, fake_feat = _features(feature_net, data), _features(feature_net, fake)
        report["feature_net"]["feature_dim"] = data_feat.shape[1]
    else:
        report["feature_space"] = "pixels"
        data_feat, fake_feat = data.reshape(data.shape[0], -1), fake.reshape(fake.shape[0], -1)

    if fd_reason is None and min(data_feat.shape[0], fake_feat.shape[0]) < 2:
        fd_reason = "the Fréchet distance needs at least 2 samples and 2 data images"
    report["fd"] = None if fd_reason else frechet_distance(data_feat, fake_feat)
    if fd_reason:
        report["fd_unavailable"] = fd_reason

    gen = torch.Generator().manual_seed(seed)
    count = min(data_feat.shape[0], fake_feat.shape[0])
    if count > k:
        real_sub, fake_sub = _subset(data_feat, count, gen), _subset(fake_feat, count, gen)
        report["prdc"] = {**prdc(real_sub, fake_sub, k), "space": report["feature_space"]}
    else:
        report["prdc"] = None
        report["prdc_unavailable"] = (
            f"PRDC with k={k} needs more than k samples and data images, got {fake.shape[0]} "
            f"samples and {data.shape[0]} data images"
        )

    report["channel_shift"] = channel_mean_shift(fake, data)
    if isinstance(feature_net, FeatureNet) and labels is not None:
        report["class_proportions"] = class_proportions(feature_net, fake, labels)
    else:
        report["class_proportions"] = None
        report["class_proportions_unavailable"] = (
            "needs the data's labels and a FeatureNet classifier (not a given extractor)"
        )
    x0 = _subset(data, _TIMESTEP_IMAGES, gen)
    rows = timestep_analysis(
        model, schedule, x0, timesteps, prediction=prediction, seed=seed, progress=progress
    )
    report["timesteps"] = rows
    csv_path, png_path, json_path = (
        out / "timesteps.csv",
        out / "timesteps.png",
        out / "evaluation.json",
    )
    write_timestep_analysis(rows, csv_path, png_path)
    report["files"] = {
        "evaluation": str(json_path),
        "timesteps_csv": str(csv_path),
        "timesteps_png": str(png_path),
    }
    report = _json_ready(report)
    json_path.write_text(
        json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False), encoding="utf-8"
    )
    return report
