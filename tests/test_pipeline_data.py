"""debias.pipeline.data: every source on small files written here, the subset helpers, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from debias.pipeline.data import (
    ImageData,
    disjoint_splits,
    gaussian_mixture,
    load_data,
    load_digits,
    select_classes,
    set_proportions,
    split_held_out,
)

RNG = np.random.default_rng(0)


def _uint8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def _scaled(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0)


def _labelled(counts: dict[int, int]) -> ImageData:
    """Labelled data whose pixel value encodes the image index, so subsets can be traced."""
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in counts.items()])
    n = len(labels)
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2) / 1e4
    return ImageData(images.contiguous(), labels, "toy")


def _index(data: ImageData) -> torch.Tensor:
    """The original position of each image of a subset of :func:`_labelled` data."""
    return (data.images[:, 0, 0, 0] * 1e4).round().long()


def _ids(data: ImageData) -> set[int]:
    return set(_index(data).tolist())


# ---- ImageData


def test_image_data_basics():
    data = _labelled({0: 3, 2: 2})
    assert len(data) == 5
    assert data.shape == (1, 2, 2)
    assert data.num_classes == 3
    sub = data.subset(torch.tensor([4, 0]))
    assert sub.labels.tolist() == [2, 0]
    assert torch.equal(sub.images, data.images[[4, 0]])
    mask = data.subset(data.labels == 2)
    assert mask.labels.tolist() == [2, 2]
    unlabelled = ImageData(torch.zeros(3, 1, 2, 2), torch.full((3,), -1), "u")
    assert unlabelled.num_classes == 0


def test_image_data_errors():
    with pytest.raises(ValueError, match="images"):
        ImageData(torch.zeros(3, 2, 2), torch.zeros(3, dtype=torch.int64), "x")
    with pytest.raises(TypeError, match="images"):
        ImageData(torch.zeros(3, 1, 2, 2, dtype=torch.float64), torch.zeros(3).long(), "x")
    with pytest.raises(ValueError, match="labels"):
        ImageData(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64), "x")
    with pytest.raises(TypeError, match="labels"):
        ImageData(torch.zeros(3, 1, 2, 2), torch.zeros(3), "x")
    data = _labelled({0: 3})
    with pytest.raises(TypeError, match="index"):
        data.subset([0, 1])
    with pytest.raises(ValueError, match="index"):
        data.subset(torch.tensor([True, False]))


# ---- digits and the Gaussian mixture


def test_digits():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert sorted(labels.unique().tolist()) == list(range(10))

    data = load_data("digits")
    assert torch.equal(data.images, images) and torch.equal(data.labels, labels)
    assert data.name == "digits" and data.num_classes == 10

    big = load_data("digits", size=16)
    assert big.images.shape == (1797, 1, 16, 16)
    assert big.images.min() >= -1 and big.images.max() <= 1
    assert torch.equal(big.images, load_digits(16)[0])
    up = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear")
    assert torch.equal(big.images, up.clamp(-1, 1))
    # shrinking is antialiased
    small = load_data("digits", size=4).images
    down = torch.nn.functional.interpolate(images, size=(4, 4), mode="bilinear", antialias=True)
    assert torch.equal(small, down.clamp(-1, 1))


@pytest.mark.parametrize("proportions", [(0.9, 0.1), (0.5, 0.3, 0.2), (0.25,) * 4])
def test_gaussian_mixture_exact_proportions(proportions):
    n = 1001
    data = gaussian_mixture(n=n, proportions=proportions, size=8, seed=3)
    assert data.images.shape == (n, 1, 8, 8) and data.name == "gmm"
    counts = torch.bincount(data.labels, minlength=len(proportions)).tolist()
    expected = [round(n * p) for p in proportions[:-1]]
    expected.append(n - sum(expected))
    assert counts == expected
    assert data.images.min() >= -1 and data.images.max() <= 1


def test_gaussian_mixture_components_distinct():
    k = 6
    data = gaussian_mixture(n=3000, proportions=[1 / k] * k, size=8, channels=3, spread=0.1)
    assert data.images.shape == (3000, 3, 8, 8)
    means = torch.stack([data.images[data.labels == c].mean(0) for c in range(k)]).flatten(1)
    rms = torch.cdist(means, means) / means.shape[1] ** 0.5
    off_diagonal = rms[~torch.eye(k, dtype=torch.bool)]
    assert off_diagonal.min() > 0.3  # the noise is 0.1 per pixel
    # every image is nearest its own component mean
    nearest = torch.cdist(data.images.flatten(1), means).argmin(1)
    assert torch.equal(nearest, data.labels)
    # the spread is the per-pixel noise std (no clamping at 0.1 around |mean| <= 0.8)
    resid = data.images.flatten(1) - means[data.labels]
    assert abs(resid.std().item() - 0.1) < 0.005


def test_gaussian_mixture_seeded():
    a = gaussian_mixture(n=50, seed=1)
    b = gaussian_mixture(n=50, seed=1)
    c = gaussian_mixture(n=50, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    via_load = load_data("gmm", seed=1, n=50, size=8)
    assert torch.equal(via_load.images, a.images)


# ---- image folders


def _write_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_png_folder_flat_grayscale(tmp_path):
    arrays = [_uint8(6, 5) for _ in range(3)]
    for i, a in enumerate(arrays):
        _write_png(tmp_path / f"img_{i}.png", a)
    data = load_data(tmp_path)
    assert data.images.shape == (3, 1, 6, 5)
    assert torch.equal(data.images[:, 0], _scaled(np.stack(arrays)))
    assert data.labels.tolist() == [-1, -1, -1]
    assert data.num_classes == 0 and data.name == str(tmp_path)


def test_png_folder_classes_rgb(tmp_path):
    # class sub-folders, sorted names -> 0, 1; files sorted within
    cat = [_uint8(4, 4, 3) for _ in range(2)]
    dog = [_uint8(4, 4, 3)]
    _write_png(tmp_path / "cat" / "b.png", cat[1])
    _write_png(tmp_path / "cat" / "a.png", cat[0])
    _write_png(tmp_path / "dog" / "z.png", dog[0])
    data = load_data(str(tmp_path))
    assert data.images.shape == (3, 3, 4, 4)
    assert data.labels.tolist() == [0, 0, 1]
    expected = _scaled(np.stack(cat + dog)).permute(0, 3, 1, 2)
    assert torch.equal(data.images, expected)


def test_png_folder_mixed_modes_become_rgb(tmp_path):
    gray = _uint8(4, 4)
    rgba = _uint8(4, 4, 4)
    _write_png(tmp_path / "a.png", gray)
    _write_png(tmp_path / "b.png", rgba)
    data = load_data(tmp_path)
    assert data.images.shape == (2, 3, 4, 4)
    assert torch.equal(data.images[0], _scaled(np.stack([gray] * 3)))
    assert torch.equal(data.images[1], _scaled(rgba[..., :3]).permute(2, 0, 1))


def test_jpeg_and_resize(tmp_path):
    _write_png(tmp_path / "a.jpg", np.full((8, 8, 3), 200, dtype=np.uint8))
    _write_png(tmp_path / "b.jpeg", np.full((12, 10, 3), 40, dtype=np.uint8))
    data = load_data(tmp_path, size=4)
    assert data.images.shape == (2, 3, 4, 4)
    # flat colours survive JPEG and antialiased resizing up to a grey level or two
    assert (data.images[0] - (200 / 127.5 - 1)).abs().max() < 0.03
    assert (data.images[1] - (40 / 127.5 - 1)).abs().max() < 0.03


def test_png_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="source"):
        load_data(tmp_path)  # empty
    _write_png(tmp_path / "a.png", _uint8(4, 4))
    _write_png(tmp_path / "b.png", _uint8(5, 4))
    with pytest.raises(ValueError, match=r"source.*b\.png"):
        load_data(tmp_path)
    assert load_data(tmp_path, size=3).images.shape == (2, 1, 3, 3)
    _write_png(tmp_path / "cls" / "c.png", _uint8(4, 4))
    with pytest.raises(ValueError, match=r"source.*sub-folder"):
        load_data(tmp_path, size=4)


# ---- .npy / .npz


def test_npy_uint8_layouts(tmp_path):
    nchw = _uint8(4, 3, 5, 5)
    np.save(tmp_path / "nchw.npy", nchw)
    np.save(tmp_path / "nhwc.npy", nchw.transpose(0, 2, 3, 1))
    np.save(tmp_path / "nhw.npy", nchw[:, 0])
    a = load_data(tmp_path / "nchw.npy")
    b = load_data(str(tmp_path / "nhwc.npy"))
    c = load_data(tmp_path / "nhw.npy")
    assert torch.equal(a.images, _scaled(nchw))
    assert torch.equal(b.images, a.images)
    assert torch.equal(c.images, a.images[:, :1])
    assert a.labels.tolist() == [-1] * 4
    # [N, 3, H, 3] fits both layouts: NCHW wins
    ambiguous = _uint8(2, 3, 4, 3)
    np.save(tmp_path / "amb.npy", ambiguous)
    assert load_data(tmp_path / "amb.npy").images.shape == (2, 3, 4, 3)


def test_npy_float(tmp_path):
    x = RNG.uniform(-1, 1, size=(3, 1, 4, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    assert torch.equal(load_data(tmp_path / "f.npy").images, torch.from_numpy(x))
    np.save(tmp_path / "f64.npy", x.astype(np.float64))
    assert torch.allclose(load_data(tmp_path / "f64.npy").images, torch.from_numpy(x))
    np.save(tmp_path / "bad.npy", x * 2)
    with pytest.raises(ValueError, match=r"source.*\[-1, 1\]"):
        load_data(tmp_path / "bad.npy")


def test_npz_with_labels(tmp_path):
    x = _uint8(5, 4, 4, 1)
    y = np.array([3, 1, 1, 0, 3])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(tmp_path / "d.npz")
    assert data.images.shape == (5, 1, 4, 4)
    assert torch.equal(data.images, _scaled(x).permute(0, 3, 1, 2))
    assert data.labels.tolist() == y.tolist() and data.num_classes == 4
    # "images"/"labels" names, and the first array when no known name
    np.savez(tmp_path / "e.npz", labels=y, images=x)
    assert torch.equal(load_data(tmp_path / "e.npz").labels, data.labels)
    np.savez(tmp_path / "f.npz", labels=y, pixels=x)
    assert torch.equal(load_data(tmp_path / "f.npz").images, data.images)
    np.savez(tmp_path / "g.npz", x=x)
    assert load_data(tmp_path / "g.npz").labels.tolist() == [-1] * 5


def test_array_errors(tmp_path):
    np.save(tmp_path / "i16.npy", np.zeros((2, 4, 4), dtype=np.int16))
    with pytest.raises(ValueError, match=r"source.*dtype"):
        load_data(tmp_path / "i16.npy")
    np.save(tmp_path / "shape.npy", np.zeros((2, 5, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"source.*shape"):
        load_data(tmp_path / "shape.npy")
    np.savez(tmp_path / "lab.npz", x=_uint8(3, 4, 4), y=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"source.*labels"):
        load_data(tmp_path / "lab.npz")
    (tmp_path / "data.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"source.*suffix"):
        load_data(tmp_path / "data.txt")


# ---- CIFAR-10 python folder


def test_cifar_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_uint8(5, 3072) for _ in range(2)]
    labels = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    for i, (data, lab) in enumerate(zip(batches, labels, strict=True), start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": lab, b"batch_label": b"x"}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _uint8(5, 3072), b"labels": [0] * 5}, f)
    data = load_data(folder)
    assert data.images.shape == (10, 3, 32, 32)
    assert data.labels.tolist() == list(range(10))
    assert torch.equal(data.images, _scaled(np.concatenate(batches).reshape(10, 3, 32, 32)))
    assert load_data(folder, size=8).images.shape == (10, 3, 8, 8)


# ---- subset helpers


def test_split_held_out():
    data = _labelled({0: 60, 1: 40})
    train, held = split_held_out(data, fraction=0.2, seed=5)
    assert len(train) == 80 and len(held) == 20
    assert _ids(train).isdisjoint(_ids(held))
    assert _ids(train) | _ids(held) == _ids(data)
    again_train, again_held = split_held_out(data, fraction=0.2, seed=5)
    assert torch.equal(again_held.images, held.images)
    assert torch.equal(again_train.labels, train.labels)
    _, other_held = split_held_out(data, fraction=0.2, seed=6)
    assert _ids(other_held) != _ids(held)


def test_select_classes():
    data = _labelled({0: 3, 1: 4, 2: 5})
    sub = select_classes(data, [2, 0])
    assert sub.labels.tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
    assert torch.equal(sub.images, data.images[data.labels != 1])


def test_set_proportions_90_10():
    data = _labelled({0: 900, 1: 50, 2: 300})
    sub = set_proportions(data, {2: 0.1, 0: 0.9}, seed=1)
    # class 0 limits: 900 / 0.9 -> 1000 in all
    assert torch.bincount(sub.labels, minlength=3).tolist() == [900, 0, 100]
    ids = _index(sub)
    assert len(set(ids.tolist())) == len(sub)  # no duplicates
    assert torch.equal(sub.labels, data.labels[ids])
    assert torch.equal(ids, ids.sort().values)  # original order

    # a sequence is indexed by class; now class 1 limits: 50 / 0.1 -> 500 in all
    by_sequence = set_proportions(data, (0.9, 0.1), seed=1)
    assert torch.bincount(by_sequence.labels).tolist() == [450, 50]

    again = set_proportions(data, {2: 0.1, 0: 0.9}, seed=1)
    other = set_proportions(data, {2: 0.1, 0: 0.9}, seed=2)
    assert torch.equal(again.images, sub.images)
    assert not torch.equal(other.images, sub.images)


def test_set_proportions_largest_total():
    # class 1 (7 images at 30%) limits the total to floor(7 / 0.3) = 23: 16.1 -> 16, 6.9 -> 7
    data = _labelled({0: 50, 1: 7})
    sub = set_proportions(data, [0.7, 0.3])
    assert torch.bincount(sub.labels).tolist() == [16, 7]
    # three classes, leftover units to the largest fractional parts: 7.5 / 7.5 / 5.0 of 20
    data = _labelled({0: 100, 1: 100, 2: 5})
    sub = set_proportions(data, {0: 0.375, 1: 0.375, 2: 0.25})
    assert torch.bincount(sub.labels).tolist() == [8, 7, 5]


def test_disjoint_splits():
    data = _labelled({0: 51, 1: 20, 2: 7})
    a, b = disjoint_splits(data, seed=4)
    assert len(a) == len(b) == 39
    assert _ids(a).isdisjoint(_ids(b))
    counts_a = torch.bincount(a.labels, minlength=3)
    counts_b = torch.bincount(b.labels, minlength=3)
    assert (counts_a - counts_b).abs().max() <= 1
    a2, _ = disjoint_splits(data, seed=4)
    assert torch.equal(a2.images, a.images)
    odd = ImageData(torch.zeros(5, 1, 2, 2), torch.full((5,), -1), "u")
    assert [len(s) for s in disjoint_splits(odd)] == [2, 2]


# ---- argument errors name the argument


def test_load_data_errors(tmp_path):
    with pytest.raises(ValueError, match="source"):
        load_data("not-a-dataset")
    with pytest.raises(ValueError, match="source"):
        load_data(tmp_path / "missing.npy")
    with pytest.raises(TypeError, match="source"):
        load_data(3)
    with pytest.raises(ValueError, match="size"):
        load_data("digits", size=0)
    with pytest.raises(TypeError, match="size"):
        load_data("digits", size=2.0)
    with pytest.raises(TypeError, match="source='gmm'"):
        load_data("digits", n=10)
    with pytest.raises(ValueError, match="size"):
        load_digits(0)


def test_gaussian_mixture_errors():
    with pytest.raises(ValueError, match="proportions"):
        gaussian_mixture(proportions=(0.5, 0.4))
    with pytest.raises(ValueError, match="proportions"):
        gaussian_mixture(proportions=(1.1, -0.1))
    with pytest.raises(ValueError, match="proportions"):
        gaussian_mixture(proportions=(1.0, 0.0))
    with pytest.raises(TypeError, match="proportions"):
        gaussian_mixture(proportions="0.9")
    with pytest.raises(ValueError, match=r"^n must"):
        gaussian_mixture(n=0)
    with pytest.raises(ValueError, match="spread"):
        gaussian_mixture(spread=-0.1)
    with pytest.raises(TypeError, match="channels"):
        gaussian_mixture(channels=1.5)
    with pytest.raises(ValueError, match="n=5"):
        gaussian_mixture(n=5, proportions=(0.3, 0.3, 0.3, 0.1))


def test_subset_helper_errors():
    data = _labelled({0: 5, 1: 5})
    for fn in (split_held_out, disjoint_splits):
        with pytest.raises(TypeError, match="data"):
            fn(torch.zeros(4, 1, 2, 2))
    with pytest.raises(ValueError, match="fraction"):
        split_held_out(data, fraction=1.0)
    with pytest.raises(ValueError, match="fraction"):
        split_held_out(data, fraction=0.01)
    with pytest.raises(TypeError, match="classes"):
        select_classes(data, 1)
    with pytest.raises(ValueError, match="classes"):
        select_classes(data, [])
    with pytest.raises(ValueError, match="classes"):
        select_classes(data, [0, 7])
    with pytest.raises(TypeError, match="data"):
        select_classes(data.images, [0])
    with pytest.raises(ValueError, match="proportions"):
        set_proportions(data, (0.9, 0.2))
    with pytest.raises(ValueError, match="proportions"):
        set_proportions(data, {0: 0.5, 5: 0.5})
    with pytest.raises(TypeError, match="proportions"):
        set_proportions(data, {"a": 1.0})
    with pytest.raises(TypeError, match="seed"):
        set_proportions(data, (0.5, 0.5), seed=None)
    with pytest.raises(ValueError, match="data"):
        disjoint_splits(data.subset(torch.tensor([0])))
