"""Image data for the pipeline: loaders for local files and bundled data, and subset helpers.

Every loader returns an :class:`ImageData` holding float32 images ``[N, C, H, W]`` in [-1, 1]
and int64 labels ``[N]`` (-1 where unlabelled). Nothing is downloaded: sources are the
scikit-learn digits (plain, or tinted from a fixed palette for colour-shift studies), a
synthetic Gaussian mixture, or files already on disk.
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from debias.checks import check_float, check_int

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_NPZ_IMAGE_KEYS = ("images", "x")
_NPZ_LABEL_KEYS = ("labels", "y")
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_GRAY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B")
# float arrays are taken as already scaled; this slack absorbs rounding from a save/load trip
_FLOAT_RANGE_SLACK = 1e-3
# colored-digits: the RGB ink colours in [0, 1] (red, orange, yellow, green, blue, violet),
# one per image, drawn uniformly with a fixed seed so the set is the same on every machine.
PALETTE = (
    (0.90, 0.20, 0.15),
    (0.95, 0.60, 0.10),
    (0.90, 0.85, 0.20),
    (0.20, 0.70, 0.30),
    (0.20, 0.40, 0.90),
    (0.60, 0.30, 0.80),
)
_PALETTE_SEED = 20231016


@dataclass
class ImageData:
    """A labelled image set.

    Attributes:
        images: ``[N, C, H, W]`` float32 in [-1, 1].
        labels: ``[N]`` int64; -1 where unlabelled.
        name: where it came from: ``"digits"``, ``"gmm"`` or a path.
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4:
            raise ValueError(f"images must be a [N, C, H, W] tensor, got {_describe(self.images)}")
        if self.images.dtype != torch.float32:
            raise TypeError(f"images must be float32, got {self.images.dtype}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.shape != (
            self.images.shape[0],
        ):
            raise ValueError(
                f"labels must be a [{self.images.shape[0]}] tensor (one per image), "
                f"got {_describe(self.labels)}"
            )
        if self.labels.dtype != torch.int64:
            raise TypeError(f"labels must be int64, got {self.labels.dtype}")
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """``1 + max label``; 0 when every image is unlabelled (or there are none)."""
        if self.labels.numel() == 0:
            return 0
        return int(self.labels.max().item()) + 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return (c, h, w)

    def subset(self, index: torch.Tensor) -> ImageData:
        """The images at ``index``: int64 positions ``[M]`` (in order) or a bool mask ``[N]``."""
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(
                    f"index: a bool mask must have shape [{len(self)}], got {list(index.shape)}"
                )
        elif index.dtype in (torch.int64, torch.int32) and index.dim() == 1:
            index = index.long()
        else:
            raise ValueError(
                f"index must be a 1-D int64 tensor or a bool mask, got {_describe(index)}"
            )
        return ImageData(self.images[index], self.labels[index], self.name)


def load_digits(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, UCI), scaled to [-1, 1].

    Args:
        size: side length; other than 8 the images are resized bilinearly (antialiased
            when shrinking).

    Returns:
        ``(images [1797, 1, size, size] float32, labels [1797] int64)``.
    """
    from sklearn.datasets import load_digits as _sklearn_digits

    check_int("size", size, 1)
    digits = _sklearn_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0 * 2.0 - 1.0
    return _resize(images, size), torch.from_numpy(digits.target).long()


def colored_digits(size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits with their ink tinted: each image takes one colour of :data:`PALETTE`
    (drawn uniformly, fixed seed), pixel = 2 * ink * colour - 1 on a black background, so the
    data's per-channel means are known and a sampler's colour shift shows against them.

    Returns:
        ``(images [1797, 3, size, size] float32, labels [1797] int64 digit classes,
        colours [1797] int64 palette indices)``.
    """
    gray, labels = load_digits(size)
    ink = (gray + 1) / 2  # [0, 1]
    gen = torch.Generator().manual_seed(_PALETTE_SEED)
    colours = torch.randint(0, len(PALETTE), (len(labels),), generator=gen)
    rgb = torch.tensor(PALETTE, dtype=torch.float32)[colours]  # [N, 3]
    images = 2 * ink * rgb[:, :, None, None] - 1
    return images, labels, colours


def load_data(
    source: str | os.PathLike = "digits", *, size: int | None = None, seed: int = 0, **gmm_kwargs
) -> ImageData:
    """Loads an image set from a name or a local path.

    Args:
        source: one of
            - ``"digits"``: scikit-learn's 1797 8x8 digits, labels 0-9;
            - ``"colored-digits"``: the same digits, RGB, inked in one colour of a fixed
              palette each (:func:`colored_digits`), labels 0-9;
            - ``"gmm"``: :func:`gaussian_mixture` (``gmm_kwargs`` are passed on);
            - a folder of PNG/JPEG images, read in sorted relative-path order. Files all at
              the top level are unlabelled; files in sub-folders are labelled by the
              sub-folder name (sorted names -> 0, 1, ...). Grayscale images give C=1; if any
              image is colour every image is converted to RGB (C=3);
            - a ``.npy`` file, or a ``.npz`` file with images under ``"images"``/``"x"`` (else
              the first non-label array) and optional labels under ``"labels"``/``"y"``.
              uint8 arrays are scaled by ``x / 127.5 - 1``; float arrays must already be in
              [-1, 1]. Layouts ``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]`` with C in
              {1, 3} (NCHW wins when both fit);
            - a CIFAR-10 python folder (``cifar-10-batches-py``, recognised by
              ``data_batch_1``): the training batches ``data_batch_1..5`` that exist.
              ``test_batch`` is not loaded.
        size: resize to ``size x size`` (bilinear, antialiased when shrinking). Default: keep
            the native size (8 for digits and gmm); an image folder then needs one size.
        seed: seed of the Gaussian mixture; other sources are deterministic.
        **gmm_kwargs: ``n``, ``proportions``, ``channels``, ``spread`` of
            :func:`gaussian_mixture`; only with ``source="gmm"``.

    Returns:
        :class:`ImageData` with ``name`` ``"digits"``, ``"gmm"`` or the path given.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a str or a path, got {type(source).__name__}; allowed: "
            "'digits', 'colored-digits', 'gmm', an image folder, a .npy/.npz file or a CIFAR-10 "
            "python folder"
        )
    if size is not None:
        check_int("size", size, 1)
    if gmm_kwargs and source != "gmm":
        raise TypeError(
            f"keyword arguments {sorted(gmm_kwargs)} only apply to source='gmm', "
            f"got source={source!r}"
        )
    if source == "digits":
        images, labels = load_digits(8)
        return ImageData(_resize(images, size), labels, "digits")
    if source == "colored-digits":
        images, labels, _ = colored_digits(8)
        return ImageData(_resize(images, size), labels, "colored-digits")
    if source == "gmm":
        return gaussian_mixture(size=8 if size is None else size, seed=seed, **gmm_kwargs)

    path = Path(source)
    name = os.fspath(source)
    if not path.exists():
        raise ValueError(
            f"source {name!r} is none of 'digits', 'colored-digits', 'gmm' and no such file or "
            "folder exists"
        )
    if path.is_dir():
        if (path / "data_batch_1").is_file():
            images, labels = _read_cifar(path)
        else:
            images, labels = read_image_folder(path, size)
    elif path.suffix.lower() in (".npy", ".npz"):
        images, labels = _read_array_file(path)
    else:
        raise ValueError(
            f"source {name!r} has an unsupported suffix {path.suffix!r}; allowed files: .npy, "
            ".npz (or give a folder)"
        )
    return ImageData(_resize(images, size), labels, name)


def gaussian_mixture(
    n: int = 2000,
    proportions: Sequence[float] = (0.9, 0.1),
    size: int = 8,
    channels: int = 1,
    spread: float = 0.1,
    seed: int = 0,
) -> ImageData:
    """Synthetic images: an isotropic Gaussian around one fixed mean image per component.

    Component ``c``'s mean is a sinusoidal grating of amplitude 0.8 at angle ``pi c / K``
    (``K`` components), with ``1 + c % 2`` cycles across the image, phase ``pi/4 + c`` and a
    further per-channel phase. The means do not depend on ``seed`` and are clearly distinct:
    for sides >= 4 and up to 10 components any two differ by more than 0.4 per pixel (RMS).
    Each pixel gets independent noise of standard deviation ``spread``; the result is clamped
    to [-1, 1].

    Args:
        n: number of images.
        proportions: fraction per component, positive and summing to 1. Counts are exact:
            ``round(n * p)`` for every component but the last, which gets the remainder.
        size: image side.
        channels: image channels.
        spread: per-pixel noise standard deviation (>= 0).
        seed: seeds the noise and the order of the images (shuffled).

    Returns:
        :class:`ImageData` ``[n, channels, size, size]``, labels = component, name ``"gmm"``.
    """
    check_int("n", n, 1)
    check_int("size", size, 1)
    check_int("channels", channels, 1)
    check_int("seed", seed)
    props = _check_fractions(proportions, "proportions", allow_zero=False)
    spread = check_float("spread", spread, 0.0, inclusive=True)
    counts = [round(n * p) for p in props[:-1]]
    counts.append(n - sum(counts))
    if counts[-1] < 0:
        raise ValueError(
            f"n={n} is too small for proportions {list(props)}: rounding leaves the last "
            "component a negative count"
        )

    means = _grating_means(len(props), channels, size)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(props)), torch.tensor(counts))
    labels = labels[torch.randperm(n, generator=generator)]
    noise = torch.randn(n, channels, size, size, generator=generator)
    images = (means[labels] + float(spread) * noise).clamp(-1.0, 1.0)
    return ImageData(images, labels, "gmm")


def split_held_out(
    data: ImageData, fraction: float = 0.1, seed: int = 0
) -> tuple[ImageData, ImageData]:
    """Random train / held-out split.

    Args:
        data: the images.
        fraction: share held out, in (0, 1); ``round(fraction * N)`` images, at least 1 and
            at most ``N - 1``.
        seed: seeds the permutation.

    Returns:
        ``(train, held_out)``: disjoint, together all of ``data``, each in the original order.
    """
    _check_data(data)
    fraction = check_float("fraction", fraction, 0.0, high=1.0, high_inclusive=False)
    check_int("seed", seed)
    n = len(data)
    n_held = round(fraction * n)
    if not 1 <= n_held <= n - 1:
        raise ValueError(
            f"fraction={fraction} of {n} images leaves {n_held} held out; "
            "both parts need at least one image"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = order[:n_held].sort().values
    train = order[n_held:].sort().values
    return data.subset(train), data.subset(held)


def select_classes(data: ImageData, classes: Sequence[int]) -> ImageData:
    """The images whose label is in ``classes``, in the original order, labels unchanged.

    Args:
        data: labelled images.
        classes: class ids, each present in ``data``.
    """
    _check_data(data)
    wanted = _check_classes(classes, "classes")
    present = set(data.labels.unique().tolist())
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(
            f"classes {missing} have no images in {data.name!r}; present: {sorted(present)}"
        )
    mask = torch.isin(data.labels, torch.tensor(wanted, dtype=torch.int64))
    return data.subset(mask)


def set_proportions(
    data: ImageData, proportions: Sequence[float] | Mapping[int, float], seed: int = 0
) -> ImageData:
    """Subsamples (never duplicates) so the class fractions equal ``proportions``.

    Only the listed classes with a positive fraction are kept. The total is
    ``M = floor(min_c(available_c / p_c))``, the largest for which every class holds at least
    its exact share ``M p_c``; the counts are the largest-remainder apportionment of ``M``:
    each is ``floor(M p_c)`` or ``ceil(M p_c)``, the leftover units going to the largest
    fractional parts (ties to the class listed first), so they sum to ``M`` and are exact
    whenever ``M p_c`` is whole (90/10 with 50 images in the minority gives 450 + 50). A total
    a little above ``M`` could sometimes fit by rounding the bottleneck class down; it is not
    used, since its fractions would be further from ``proportions``.

    Args:
        data: labelled images.
        proportions: ``{class: fraction}`` or a sequence whose entry ``i`` is class ``i``'s
            fraction; fractions >= 0, summing to 1.
        seed: seeds which images of each class are kept.

    Returns:
        The subset, in the original order.
    """
    _check_data(data)
    check_int("seed", seed)
    if isinstance(proportions, Mapping):
        classes = _check_classes(list(proportions.keys()), "proportions")
        fractions = _check_fractions(list(proportions.values()), "proportions", allow_zero=True)
    else:
        fractions = _check_fractions(proportions, "proportions", allow_zero=True)
        classes = list(range(len(fractions)))
    kept = [(c, p) for c, p in zip(classes, fractions, strict=True) if p > 0]
    available = [int((data.labels == c).sum()) for c, _ in kept]
    empty = [c for (c, _), a in zip(kept, available, strict=True) if a == 0]
    if empty:
        raise ValueError(f"proportions: classes {empty} have no images in {data.name!r}")

    probs = [p for _, p in kept]
    # the slack absorbs float error in a / p (7 / 0.7 is 10.000000000000002 or 9.99...)
    total = min(math.floor(a / p + 1e-9) for a, p in zip(available, probs, strict=True))
    counts = [min(k, a) for k, a in zip(_apportion(total, probs), available, strict=True)]
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for (c, _), k in zip(kept, counts, strict=True):
        members = (data.labels == c).nonzero().squeeze(1)
        picks.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return data.subset(torch.cat(picks).sort().values)


def disjoint_splits(data: ImageData, seed: int = 0) -> tuple[ImageData, ImageData]:
    """Two disjoint halves of equal size, stratified by label.

    Each class is shuffled and halved; the odd images left over (at most one per class) are
    shuffled and dealt alternately, and one is dropped if their number is odd. So
    ``len(A) == len(B) == N // 2`` and each class count differs by at most one between A and B.

    Args:
        data: the images (unlabelled images count as one class).
        seed: seeds the shuffles.

    Returns:
        ``(A, B)``, each in the original order.
    """
    _check_data(data)
    check_int("seed", seed)
    if len(data) < 2:
        raise ValueError(f"data needs at least 2 images to split, got {len(data)}")
    generator = torch.Generator().manual_seed(seed)
    part_a, part_b, spare = [], [], []
    for c in data.labels.unique().tolist():
        members = (data.labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        half = len(members) // 2
        part_a.append(members[:half])
        part_b.append(members[half : 2 * half])
        spare.append(members[2 * half :])
    spare_all = torch.cat(spare)
    spare_all = spare_all[torch.randperm(len(spare_all), generator=generator)]
    pairs = len(spare_all) // 2
    part_a.append(spare_all[0 : 2 * pairs : 2])
    part_b.append(spare_all[1 : 2 * pairs : 2])
    return (
        data.subset(torch.cat(part_a).sort().values),
        data.subset(torch.cat(part_b).sort().values),
    )


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize of ``[N, C, H, W]`` to ``size x size``; antialiased when shrinking."""
    if size is None or images.shape[-2:] == (size, size):
        return images
    shrink = size < images.shape[-2] or size < images.shape[-1]
    out = F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )
    return out.clamp(-1.0, 1.0)


def _grating_means(components: int, channels: int, size: int) -> torch.Tensor:
    """``[K, C, size, size]`` mean images: one grating per component, values in [-0.8, 0.8]."""
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    means = torch.empty(components, channels, size, size, dtype=torch.float64)
    for c in range(components):
        angle = math.pi * c / components
        cycles = 1 + c % 2
        along = xx * math.cos(angle) + yy * math.sin(angle)
        for ch in range(channels):
            # an offset phase keeps small sides from sampling a grating at its zeros
            phase = math.pi / 4 + c + 2 * math.pi * ch / 3
            means[c, ch] = 0.8 * torch.sin(2 * math.pi * cycles * along + phase)
    return means.float()


def _apportion(total: int, probs: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``total`` by ``probs`` (ties to the lower index)."""
    exact = [total * p for p in probs]
    counts = [math.floor(e + 1e-9) for e in exact]
    leftover = total - sum(counts)
    by_remainder = sorted(range(len(probs)), key=lambda i: -(exact[i] - counts[i]))
    for i in by_remainder[: max(leftover, 0)]:
        counts[i] += 1
    return counts


def read_image_folder(folder: Path, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PNG/JPEG files under ``folder`` sorted by relative path: ``(images [N, C, H, W] in
    [-1, 1], labels [N])``; each sub-folder is a class (labels by sorted name), -1 without
    sub-folders. C = 3 if any image is colour, else 1."""
    from PIL import Image

    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise ValueError(
            f"source {str(folder)!r} holds no images ({', '.join(_IMAGE_SUFFIXES)}) and is not "
            "a CIFAR-10 python folder (no data_batch_1)"
        )
    depths = {len(p.relative_to(folder).parts) for p in files}
    if 1 in depths and len(depths) > 1:
        raise ValueError(
            f"source {str(folder)!r} mixes images at the top level with class sub-folders; "
            "put every image in a sub-folder or none"
        )
    if depths == {1}:
        labels = torch.full((len(files),), -1, dtype=torch.int64)
    else:
        class_names = [p.relative_to(folder).parts[0] for p in files]
        index = {name: i for i, name in enumerate(sorted(set(class_names)))}
        labels = torch.tensor([index[name] for name in class_names], dtype=torch.int64)

    modes = []
    for p in files:
        with Image.open(p) as img:
            modes.append(img.mode)
    colour = any(mode not in _GRAY_MODES for mode in modes)
    first_size = None
    images = []
    for p in files:
        with Image.open(p) as img:
            array = _pil_to_array(img, colour, p)
        if size is None:
            first_size = first_size or (array.shape[0], array.shape[1], p)
            if array.shape[:2] != first_size[:2]:
                raise ValueError(
                    f"source: image {str(p)!r} is {array.shape[1]}x{array.shape[0]} but "
                    f"{str(first_size[2])!r} is {first_size[1]}x{first_size[0]}; pass size= "
                    "to resize them all"
                )
            images.append(torch.from_numpy(array).permute(2, 0, 1))
        else:
            one = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
            images.append(_resize(one, size)[0])
    return torch.stack(images), labels


def _pil_to_array(img, colour: bool, path: Path) -> np.ndarray:
    """``[H, W, C]`` float32 in [-1, 1]; C = 3 when ``colour`` else 1."""
    if img.mode.startswith("I;16"):
        gray = np.asarray(img, dtype=np.float32) / 65535.0
        array = gray[:, :, None]
        if colour:
            array = np.repeat(array, 3, axis=2)
        return array * 2.0 - 1.0
    if img.mode not in _GRAY_MODES and img.mode not in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"):
        raise ValueError(f"source: image {str(path)!r} has unsupported mode {img.mode!r}")
    converted = img.convert("RGB" if colour else "L")
    array = np.asarray(converted, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return array / 127.5 - 1.0


def _read_array_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    name = str(path)
    labels = None
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            image_key = next((k for k in _NPZ_IMAGE_KEYS if k in keys), None)
            if image_key is None:
                image_key = next((k for k in keys if k not in _NPZ_LABEL_KEYS), None)
            if image_key is None:
                raise ValueError(f"source {name!r} holds no image array (keys: {keys})")
            array = archive[image_key]
            label_key = next((k for k in _NPZ_LABEL_KEYS if k in keys), None)
            if label_key is not None:
                labels = archive[label_key]
    images = _array_to_images(array, name)
    if labels is None:
        return images, torch.full((images.shape[0],), -1, dtype=torch.int64)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"source {name!r}: labels must have shape [{images.shape[0]}], got {list(labels.shape)}"
        )
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < -1):
        raise ValueError(
            f"source {name!r}: labels must be integers >= -1 (-1 = unlabelled), "
            f"got dtype {labels.dtype}"
        )
    return images, torch.from_numpy(labels.astype(np.int64))


def _array_to_images(array: np.ndarray, name: str) -> torch.Tensor:
    """uint8 or float array ``[N,H,W]`` / ``[N,C,H,W]`` / ``[N,H,W,C]`` -> ``[N,C,H,W]`` float32."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[1] in (1, 3):
        pass
    elif array.ndim == 4 and array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            f"source {name!r}: array shape {list(array.shape)} is not an image batch; allowed: "
            "[N, H, W], [N, C, H, W] or [N, H, W, C] with C in {1, 3}"
        )
    if array.dtype == np.uint8:
        images = torch.from_numpy(np.ascontiguousarray(array)).float() / 127.5 - 1.0
    elif np.issubdtype(array.dtype, np.floating):
        images = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if not torch.isfinite(images).all():
            raise ValueError(f"source {name!r}: float array holds NaN or inf")
        low, high = (images.min().item(), images.max().item()) if images.numel() else (0, 0)
        if low < -1 - _FLOAT_RANGE_SLACK or high > 1 + _FLOAT_RANGE_SLACK:
            raise ValueError(
                f"source {name!r}: float images must already be in [-1, 1], got values in "
                f"[{low:.4g}, {high:.4g}]; save uint8 images or scale them first"
            )
        images = images.clamp(-1.0, 1.0)
    else:
        raise ValueError(
            f"source {name!r}: array dtype {array.dtype} is not supported; allowed: uint8 "
            "(0..255) or float (already in [-1, 1])"
        )
    return images.contiguous()


def _read_cifar(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [folder / b for b in _CIFAR_TRAIN_BATCHES if (folder / b).is_file()]
    images, labels = [], []
    for batch in batches:
        with open(batch, "rb") as f:
            # the official CIFAR-10 python format is a pickle; this reads a local, chosen file
            record = pickle.load(f, encoding="bytes")
        data = record.get(b"data", record.get("data"))
        targets = record.get(b"labels", record.get("labels"))
        if data is None or targets is None:
            raise ValueError(f"source: CIFAR batch {str(batch)!r} lacks 'data' or 'labels'")
        data = np.asarray(data)
        side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
        if data.dtype != np.uint8 or data.ndim != 2 or 3 * side * side != data.shape[1]:
            raise ValueError(
                f"source: CIFAR batch {str(batch)!r} data must be uint8 [n, 3 * side**2], "
                f"got {data.dtype} {list(data.shape)}"
            )
        if len(targets) != data.shape[0]:
            raise ValueError(
                f"source: CIFAR batch {str(batch)!r} has {data.shape[0]} images but "
                f"{len(targets)} labels"
            )
        images.append(data.reshape(-1, 3, side, side))
        labels.append(np.asarray(targets, dtype=np.int64))
    shapes = {a.shape[1:] for a in images}
    if len(shapes) > 1:
        raise ValueError(f"source: CIFAR batches in {str(folder)!r} differ in image size")
    array = np.concatenate(images)
    return torch.from_numpy(array).float() / 127.5 - 1.0, torch.from_numpy(np.concatenate(labels))


def _check_data(data) -> None:
    if not isinstance(data, ImageData):
        raise TypeError(f"data must be an ImageData, got {type(data).__name__}")


def _check_classes(classes, name: str) -> list[int]:
    if isinstance(classes, (str, bytes, torch.Tensor)) or not isinstance(classes, Sequence):
        raise TypeError(f"{name} must be a sequence of class ids, got {type(classes).__name__}")
    if len(classes) == 0:
        raise ValueError(f"{name} must list at least one class, got none")
    classes = [check_int(f"{name} class ids", c, 0) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"{name} lists a class twice: {list(classes)}")
    return [int(c) for c in classes]


def _check_fractions(values, name: str, *, allow_zero: bool) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(
        values, (Sequence, torch.Tensor, np.ndarray)
    ):
        raise TypeError(f"{name} must be a sequence of fractions, got {type(values).__name__}")
    values = [v.item() if hasattr(v, "item") else v for v in values]
    if len(values) == 0:
        raise ValueError(f"{name} must hold at least one fraction, got none")
    values = [check_float(f"{name} entries", v) for v in values]
    lowest_ok = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    if not all(lowest_ok(v) and math.isfinite(v) for v in values):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {kind}, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1 (within 1e-6), got {values} (sum {sum(values)})")
    return [float(v) for v in values]


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


# ---- samples to score ---------------------------------------------------------------------


def load_samples(path: str | os.PathLike, name: str = "path") -> torch.Tensor:
    """Samples ``[n, ...]`` from a file or folder, for scoring: .npy, .npz (its first array,
    or ``file.npz:key``), .pt (one tensor) or a folder of PNG/JPEG images (sorted by name,
    class sub-folders allowed, ``[n, C, H, W]`` in [-1, 1], through :func:`read_image_folder`).
    uint8 arrays are read as images too (x / 127.5 - 1); float arrays as they are, float16 and
    bfloat16 widened to float32. The scores of debias.memorization take the result: they read
    tensors, arrays and .npy paths themselves, and this reader adds the other formats.

    Raises:
        ValueError: no such file, an unreadable or malformed file, or no ``[n, ...]`` floats;
            the message starts with ``name`` (the command line passes its flag).
    """
    path = os.fspath(path)
    key = None
    if ":" in path and not os.path.exists(path):
        base, _, maybe_key = path.rpartition(":")
        if base.endswith(".npz"):
            path, key = base, maybe_key
    if not os.path.exists(path):
        raise ValueError(f"{name}: no such file or folder: {path}")
    if os.path.isdir(path):
        return _read_image_folder(path, name)
    try:
        data = _read_array(path, key, name)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise ValueError(f"{name}: cannot read {path}: {err}") from err
    except ValueError as err:  # numpy's own complaints about a malformed file
        if str(err).startswith(name):
            raise
        raise ValueError(f"{name}: cannot read {path}: {err}") from err
    x = torch.as_tensor(data) if isinstance(data, np.ndarray) else data
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    elif not x.is_floating_point():
        raise ValueError(f"{name}: {path} must hold floats or uint8 images, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: {path} must hold [n, ...] samples, got shape {list(x.shape)}")
    return x.float() if x.dtype.itemsize < 4 else x  # float16 / bfloat16 arrays become float32


def _read_array(path: str, key: str | None, name: str) -> np.ndarray | torch.Tensor:
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            if not archive.files:
                raise ValueError(f"{name}: {path} holds no arrays")
            if key is not None and key not in archive.files:
                raise ValueError(f"{name}: {path} has no array {key!r} (it has {archive.files})")
            return archive[key if key is not None else archive.files[0]]
    if path.endswith(".pt"):
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{name}: {path} must hold one tensor, got {type(data).__name__}")
        return data
    raise ValueError(f"{name}: {path} is not .npy, .npz, .pt or a folder of images")


def _read_image_folder(folder: str, name: str) -> torch.Tensor:
    """A folder of images through :func:`read_image_folder` (class sub-folders allowed)."""
    from PIL import UnidentifiedImageError

    try:
        images, _ = read_image_folder(Path(folder))
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{name}: cannot read an image in {folder}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    return images
