"""The `debias` command line."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

from debias.weighting import WEIGHTINGS

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _demo(args: argparse.Namespace) -> int:
    from debias.pipeline.demo import run_demo

    summary = run_demo(args.out, args.steps, args.batch_size, args.weighting, args.seed)
    print(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}/: " + ", ".join(summary["files"]))
    return 0


def _load(path: str, flag: str):
    """An ``[n, ...]`` float tensor from .npy, .npz (first array, or ``file.npz:key``), .pt (a
    tensor) or a folder of PNG/JPEG images (sorted by name, [n, C, H, W] in [-1, 1]). uint8
    arrays are read as images too (x / 127.5 - 1); float arrays as they are."""
    import numpy as np
    import torch

    key = None
    if ":" in path and not os.path.exists(path):
        base, _, maybe_key = path.rpartition(":")
        if base.endswith(".npz"):
            path, key = base, maybe_key
    if not os.path.exists(path):
        raise ValueError(f"{flag}: no such file or folder: {path}")
    if os.path.isdir(path):
        return _load_images(Path(path), flag)
    try:
        data = _read_array(path, key, flag)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise ValueError(f"{flag}: cannot read {path}: {err}") from err
    except ValueError as err:  # numpy's own complaints about a malformed file
        if str(err).startswith(flag):
            raise
        raise ValueError(f"{flag}: cannot read {path}: {err}") from err
    x = torch.as_tensor(data) if isinstance(data, np.ndarray) else data
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    elif not x.is_floating_point():
        raise ValueError(f"{flag}: {path} must hold floats or uint8 images, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{flag}: {path} must hold [n, ...] samples, got shape {list(x.shape)}")
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _read_array(path: str, key: str | None, flag: str):
    import numpy as np
    import torch

    if path.endswith(".npy"):
        data = np.load(path, allow_pickle=False)
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            if not archive.files:
                raise ValueError(f"{flag}: {path} holds no arrays")
            if key is not None and key not in archive.files:
                raise ValueError(f"{flag}: {path} has no array {key!r} (it has {archive.files})")
            data = archive[key if key is not None else archive.files[0]]
    elif path.endswith(".pt"):
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{flag}: {path} must hold one tensor, got {type(data).__name__}")
    else:
        raise ValueError(f"{flag}: {path} is not .npy, .npz, .pt or a folder of images")
    return data


def _load_images(folder: Path, flag: str):
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{flag}: {folder} holds no .png/.jpg/.jpeg images")
    images = []
    try:
        for f in files:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{flag}: cannot read {f}: {err}") from err
    for f, im in zip(files, images, strict=True):
        if im.size != images[0].size:
            (w0, h0), (w, h) = images[0].size, im.size
            raise ValueError(
                f"{flag}: all images must share a size: {files[0].name} is {w0}x{h0}, "
                f"{f.name} is {w}x{h} (width x height)"
            )
    gray = all(im.mode in ("1", "L") for im in images)
    arrays = [np.asarray(im.convert("L" if gray else "RGB"), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0
    return x[:, None] if gray else x.permute(0, 3, 1, 2).contiguous()


def _plot_score(path: Path, samples, train, results: dict[str, Any], threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gu = results["gu"]
    ratio = gu.ratio.cpu().numpy()
    shape = tuple(samples.shape[1:])
    showable = len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))
    pairs = min(6, len(ratio)) if showable else 0
    fig = plt.figure(figsize=(max(8, 2.0 * pairs), 6.5 if pairs else 3.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _score(args: argparse.Namespace) -> int:
    import debias
    from debias.memorization import memorization_report

    if (args.samples_b is None) != (args.train_b is None):
        raise ValueError("--samples-b and --train-b go together: give both or neither")
    names = {"samples": args.samples, "train": args.train}
    if args.samples_b is not None:
        names.update(samples_b=args.samples_b, train_b=args.train_b)
    data = {name: _load(path, "--" + name.replace("_", "-")) for name, path in names.items()}
    for name, x in data.items():
        if x.shape[1:] != data["samples"].shape[1:]:
            raise ValueError(
                f"--{name.replace('_', '-')}: samples have shape {list(x.shape[1:])}, expected "
                f"{list(data['samples'].shape[1:])} like --samples"
            )
    if args.samples_b is not None and data["samples_b"].shape[0] != data["samples"].shape[0]:
        raise ValueError(
            f"--samples-b: {data['samples_b'].shape[0]} samples, --samples has "
            f"{data['samples'].shape[0]}: the two models' samples are paired by row"
        )
    summary, results = memorization_report(
        data["samples"],
        data["train"],
        samples_b=data.get("samples_b"),
        train_b=data.get("train_b"),
        k=args.k,
        threshold=args.threshold,
        delta=args.delta,
        similarity_threshold=args.similarity_threshold,
        metric=args.metric,
        baseline_size=args.baseline_size,
        resamples=args.resamples,
        seed=args.seed,
        progress=args.progress,
    )
    report = {
        "version": debias.__version__,
        "inputs": {
            name: {"path": os.path.abspath(path), "shape": list(data[name].shape)}
            for name, path in names.items()
        },
        **summary,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "score.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_score(out / "score.png", data["samples"], data["train"], results, args.threshold)
    gu, carlini, som = summary["gu"], summary["carlini"], summary["somepalli"]
    print(
        f"{data['samples'].shape[0]} samples vs {data['train'].shape[0]} training images\n"
        f"Gu et al. (d1/d2 < {args.threshold:.3g}): {gu['fraction']:.3f} memorized "
        f"[{gu['ci'][0]:.3f}, {gu['ci'][1]:.3f}]\n"
        f"Carlini et al. (L2/sqrt(d) < {args.delta:g}): {carlini['fraction']:.3f} extracted\n"
        f"Somepalli et al. ({som['metric']}): top-1 similarity median "
        f"{som['similarity']['p50']:.3f}, p95 {som['similarity']['p95']:.3f}, "
        f"fraction > {args.similarity_threshold:g}: {som['fraction_above']:.3f}"
        + (
            f" (train vs train: median {som['baseline']['similarity']['p50']:.3f}, "
            f"fraction {som['baseline']['fraction_above']:.3f})"
        )
    )
    if "biased_generalization" in summary:
        bg = summary["biased_generalization"]
        print(
            f"two models: median (1 - paired similarity) {bg['paired']['median_distance']:.3f}; "
            f"closer to own split: A {bg['split']['fraction_own_a']:.3f}, "
            f"B {bg['split']['fraction_own_b']:.3f}"
        )
    print(f"wrote {out}/score.json, {out}/score.png")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_score(sub) -> None:
    score = sub.add_parser(
        "score",
        help="memorization scores of generated samples against the training set",
        description="Gu et al. d1/d2 ratio, Carlini et al. (l2, delta) extraction, Somepalli "
        "et al. top-1 similarity with a train-vs-train baseline; with --samples-b/--train-b "
        "the two-model biased-generalization measures. Inputs: .npy, .npz (file.npz:key), .pt "
        "or a folder of PNG/JPEG images.",
    )
    score.add_argument("--samples", required=True, help="generated samples [n, ...]")
    score.add_argument("--train", required=True, help="training set [m, ...]")
    score.add_argument("--samples-b", help="model B's samples (same noise as --samples)")
    score.add_argument("--train-b", help="model B's training split (disjoint from --train)")
    score.add_argument("--out", default="runs/score", help="output folder (default: runs/score)")
    score.add_argument(
        "--threshold", type=float, default=1 / 3, help="Gu et al. d1/d2 threshold (default: 1/3)"
    )
    score.add_argument(
        "--delta", type=float, default=0.15,
        help="Carlini et al. threshold on L2/sqrt(d), in the data's units (default: 0.15)",
    )  # fmt: skip
    score.add_argument(
        "--k", type=_positive_int, default=2, help="nearest neighbours reported (default: 2)"
    )
    score.add_argument(
        "--metric", default="cosine", choices=("cosine", "standardized"),
        help="Somepalli similarity (default: cosine); the two-model measures use standardized",
    )  # fmt: skip
    score.add_argument(
        "--similarity-threshold", type=float, default=0.5,
        help="Somepalli replica threshold (default: 0.5)",
    )  # fmt: skip
    score.add_argument(
        "--baseline-size", type=_positive_int, default=None,
        help="training images in the train-vs-train baseline (default: all)",
    )  # fmt: skip
    score.add_argument(
        "--resamples", type=_positive_int, default=1000, help="bootstrap resamples (default: 1000)"
    )
    score.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    score.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True,
        help="progress bars on stderr (default: on)",
    )  # fmt: skip
    score.set_defaults(func=_score)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="debias", description="Unbiased diffusion training: fused loss kernels and tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="noising, the fused weighted loss and a short training run on the bundled digits",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=400, help="training steps (default: 400)")
    demo.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    demo.add_argument(
        "--weighting", default="debias", choices=WEIGHTINGS, help="loss weighting (default: debias)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_demo)
    _add_score(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"debias {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
