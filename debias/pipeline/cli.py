"""The `debias` command line: ``debias train | sample | evaluate | score | study | info``.

    debias <command> --help        each command's options
    python -m debias.pipeline.cli  the same, without the console script (torchrun -m ...)

Errors: a user's mistake (a flag's value out of range, a missing or unreadable path, flags
that do not go together) prints one line ``debias <command>: error: <message naming the flag>``
and exits 2. It is caught in two places only: argparse (each flag's type checks its value) and
:class:`UsageError`, raised by the commands' own checks, or mapped by :func:`_blame` from a
library call's ValueError/TypeError whose message starts with the name of an argument that
came from a flag (the package's checks name their argument first), through a table, per call,
from argument names to flags. Every other exception is a bug: it keeps its traceback and the
command exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NoReturn

from debias.weighting import FAMILY_WEIGHTINGS


class UsageError(Exception):
    """A user's mistake on the command line; the message names the flag. ``main`` prints it as
    one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``debias <command>: error: argument --k: ...``
    (the usage is one ``--help`` away), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The argument name a library error message starts with (``steps must be ...``, ``train row 3
# contains NaN``, ``checkpoint: no such file ...``, ``--samples: ...``).
_LEADING_NAME = re.compile(r"(?:--)?[A-Za-z_][\w-]*")


@contextlib.contextmanager
def _blame(flags: Mapping[str, str]) -> Iterator[None]:
    """Within the block, a ValueError or TypeError whose message starts with a name in
    ``flags`` (argument name -> the flag that gave it) becomes a :class:`UsageError` on that
    flag: ``steps must be at least 1`` -> ``--steps must be at least 1`` where the flag is the
    argument's own spelling, ``--ckpt: checkpoint: no such file ...`` where it is not. Any other
    exception goes on unchanged (a bug: traceback, exit 1)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        message = str(err)
        match = _LEADING_NAME.match(message)
        flag = flags.get(match.group(0)) if match else None
        if flag is None:
            raise
        if flag == match.group(0) or flag == "--" + match.group(0).replace("_", "-"):
            raise UsageError(flag + message[match.end() :]) from err
        raise UsageError(f"{flag}: {message}") from err


def _flag(name: str) -> str:
    """The flag of an argument name: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _score(args: argparse.Namespace) -> int:
    import debias
    from debias.memorization import memorization_report
    from debias.pipeline.data import load_samples
    from debias.pipeline.plotting import plot_score

    if (args.samples_b is None) != (args.train_b is None):
        raise UsageError("--samples-b and --train-b go together: give both or neither")
    names = {"samples": args.samples, "train": args.train}
    if args.samples_b is not None:
        names.update(samples_b=args.samples_b, train_b=args.train_b)
    data = {}
    for name, path in names.items():
        with _blame({_flag(name): _flag(name)}):  # load_samples' messages start with the flag
            data[name] = load_samples(path, _flag(name))
    for name, x in data.items():
        if x.shape[1:] != data["samples"].shape[1:]:
            raise UsageError(
                f"{_flag(name)}: samples have shape {list(x.shape[1:])}, expected "
                f"{list(data['samples'].shape[1:])} like --samples"
            )
    if args.samples_b is not None and data["samples_b"].shape[0] != data["samples"].shape[0]:
        raise UsageError(
            f"--samples-b: {data['samples_b'].shape[0]} samples, --samples has "
            f"{data['samples'].shape[0]}: the two models' samples are paired by row"
        )
    for name in ("train", "train_b"):
        if name in data and max(args.k, 2) > data[name].shape[0]:
            raise UsageError(
                f"--k {args.k} needs {_flag(name)} to hold at least {max(args.k, 2)} images, "
                f"got {data[name].shape[0]}"
            )
    # The data's own defects (a NaN row, an all-zero sample under cosine, a training set too
    # small for the baseline) are reported by the scores under the argument names below.
    blame = {
        "samples": "--samples",
        "samples_a": "--samples",
        "train": "--train",
        "train_a": "--train",
        "samples_b": "--samples-b",
        "train_b": "--train-b",
    }
    with _blame(blame):
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
    plot_score(out / "score.png", data["samples"], data["train"], results, args.threshold)
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


# argparse types: each checks one flag's value (argparse names the flag in its message); public
# for the commands whose options live in their own module (debias.pipeline.study).


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _number(low: float | None, high: float | None, low_open: bool, high_open: bool = False):
    """argparse type: a finite float in the interval, the interval in the message."""

    def parse(text: str) -> float:
        value = float(text)
        below = low is not None and (value < low or (low_open and value == low))
        above = high is not None and (value > high or (high_open and value == high))
        if value != value or abs(value) == float("inf") or below or above:
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            shown = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {shown}, got {text}")
        return value

    parse.__name__ = "number"  # argparse's "invalid number value: 'x'"
    return parse


def _device(text: str) -> str:
    """argparse type: a torch device this machine has ("cpu", "cuda", "cuda:1", ...)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
    return text


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
        "--threshold",
        type=_number(0.0, 1.0, low_open=True),
        default=1 / 3,
        help="Gu et al. d1/d2 threshold, in (0, 1] (default: 1/3)",
    )
    score.add_argument(
        "--delta",
        type=_number(0.0, None, low_open=True),
        default=0.15,
        help="Carlini et al. threshold on L2/sqrt(d), in the data's units (default: 0.15)",
    )
    score.add_argument(
        "--k", type=positive_int, default=2, help="nearest neighbours reported (default: 2)"
    )
    score.add_argument(
        "--metric",
        default="cosine",
        choices=("cosine", "standardized"),
        help="Somepalli similarity (default: cosine); the two-model measures use standardized",
    )
    score.add_argument(
        "--similarity-threshold",
        type=_number(-1.0, 1.0, low_open=False),
        default=0.5,
        help="Somepalli replica threshold (default: 0.5)",
    )
    score.add_argument(
        "--baseline-size",
        type=positive_int,
        default=None,
        help="training images in the train-vs-train baseline (default: all)",
    )
    score.add_argument(
        "--resamples", type=positive_int, default=1000, help="bootstrap resamples (default: 1000)"
    )
    score.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    score.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bars on stderr (default: on)",
    )
    score.set_defaults(func=_score)


# ---- train / sample / evaluate --------------------------------------------------------------

# Help for each TrainConfig field; the `train` options are generated from the dataclass so the
# command line and the stored config can never drift apart.
_TRAIN_HELP = {
    "data": "digits (bundled, default), colored-digits (digits inked from a fixed palette), gmm "
    "(Gaussian mixture), a folder of images, .npy/.npz, or a CIFAR-10 python folder",
    "image_size": "resize images to this side (default: the source's)",
    "classes": "keep only these labels, e.g. 0,1",
    "proportions": "class fractions after --classes, e.g. 0.9,0.1",
    "held_out": "fraction held out for the held-out loss and the monitor",
    "split": "train on the whole training split (full) or one of two disjoint halves (a, b)",
    "two_models": "also train a second model on the disjoint half B (biased generalization)",
    "train_size": "use only the first n training images (default: all)",
    "base_channels": "UNet width",
    "channel_mult": "width multiplier per resolution level",
    "num_res_blocks": "depth: residual blocks per level",
    "attention_resolutions": "image sides with self-attention",
    "dropout": "dropout in the residual blocks",
    "family": "ddpm, or flow (rectified flow as SD3 / Flux train it)",
    "schedule": "noise schedule (default: linear for ddpm, flow_matching for flow)",
    "num_timesteps": "diffusion steps T",
    "prediction": "what the network predicts (default: epsilon for ddpm, flow for flow)",
    "weighting": "loss weighting, defined in its own space and converted exactly to the "
    "target (flow also takes none / sigma_sqrt / cosmap)",
    "learn_sigma": "ddpm: learn the variance (2C outputs; hybrid loss with the vb term)",
    "timestep_sampling": "flow: uniform, logit_normal or mode (SD3's densities)",
    "shift": "flow: the schedule's shift (SD3: 3)",
    "steps": "training steps",
    "batch_size": "global batch size (split across processes)",
    "lr": "AdamW learning rate (after a linear warm-up)",
    "warmup": "linear learning-rate warm-up steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient-norm clip (0: none)",
    "ema_decay": "EMA decay of the weights used for sampling and evaluation",
    "seed": "random seed",
    "log_every": "steps per metrics row",
    "eval_every": "steps between held-out losses (0: never)",
    "eval_size": "held-out images in the held-out loss",
    "sample_every": "steps between sample grids (0: never)",
    "sample_steps": "sampler steps for grids and the monitor",
    "sample_method": "sampler for grids and the monitor (default: ddpm, or euler for flow)",
    "checkpoint_every": "steps between checkpoints (0: only at the end)",
    "monitor_every": "steps between memorization measurements (0: never)",
    "monitor_samples": "samples the monitor draws and scores",
    "stop_on_memorization": "stop when samples start drifting toward their training images",
    "report_to": "none, or tensorboard: also write scalars and grids to RUN/tensorboard",
}


def _comma_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s") from err

    return parse


def _train_choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the string options, over every family (TrainConfig checks the pair)."""
    from debias.pipeline import train as t
    from debias.pipeline.sampling import METHODS
    from debias.schedules import TIMESTEP_SCHEMES

    def union(table: dict) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v for family in t.FAMILIES for v in table[family]))

    return {
        "family": t.FAMILIES,
        "schedule": union(t.SCHEDULES),
        "prediction": union(t.PREDICTIONS),
        "weighting": union(FAMILY_WEIGHTINGS),
        "timestep_sampling": union(TIMESTEP_SCHEMES),
        "split": t.SPLITS,
        "sample_method": METHODS,
        "report_to": t.REPORT_TO,
    }


def _add_train(sub) -> None:
    import dataclasses
    import typing

    from debias.pipeline.train import TrainConfig

    train = sub.add_parser(
        "train",
        help="train a diffusion model with the fused loss (default: digits, debias weighting)",
        description="Trains an ADM-style UNet with debias.add_noise / debias.fused_loss, AdamW, "
        "EMA and gradient clipping; writes checkpoints (safetensors), metrics, sample grids and "
        "the memorization monitor's report to OUT/NAME/. Ctrl-C saves a checkpoint; --resume "
        "continues exactly. Under torchrun it trains with DDP.",
    )
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = _TRAIN_HELP[f.name]
        hint = str(hints[f.name])
        # Defaults are None here: a resumed run must tell given options from defaults.
        if hint == "<class 'bool'>":
            train.add_argument(flag, action="store_true", default=None, help=text)
            continue
        if "list[int]" in hint:
            kind, shown = _comma_list(int), ",".join(map(str, default or [])) or "all"
        elif "list[float]" in hint:
            kind, shown = _comma_list(float), ",".join(map(str, default or [])) or "as loaded"
        elif "int" in hint:
            kind, shown = int, default
        elif "float" in hint:
            kind, shown = float, default
        else:
            kind, shown = str, default
        choices = _train_choices().get(f.name)
        if "(default:" not in text:
            text += f" (default: {'all' if shown is None else shown})"
        train.add_argument(flag, type=kind, default=None, choices=choices, help=text)
    train.add_argument("--out", default="runs", help="parent folder of runs (default: runs)")
    train.add_argument("--name", help="run name (default: <data>-<weighting>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder")
    train.add_argument(
        "--device", type=_device, help="cpu, cuda, cuda:1 (default: a GPU if there is one)"
    )
    train.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast of the model (default: on a GPU, off on a CPU)",
    )
    train.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar on stderr (default: on)",
    )
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from debias.pipeline import checkpoint as ckpt
    from debias.pipeline.train import NonFiniteLoss, TrainConfig, Trainer

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    # TrainConfig's checks and the set-up's (data, model, checkpoint) name the field first; the
    # data loaders name their "source", the checkpoint reader its "checkpoint".
    blame = {name: _flag(name) for name in fields}
    blame.update(source="--data", checkpoint="--resume")
    if args.resume:
        run_dir = Path(args.resume)
        with _blame(blame):
            _, meta = ckpt.load_checkpoint(run_dir / "checkpoints" / ckpt.LAST)
            config = TrainConfig.from_dict({**meta["config"], **given})
    else:
        with _blame(blame):
            config = TrainConfig(**given)
        builtin = ("digits", "colored-digits", "gmm")
        stem = config.data if config.data in builtin else Path(config.data).stem
        family = "" if config.family == "ddpm" else f"{config.family}-"
        name = args.name or f"{stem}-{family}{config.weighting}" + (
            "-ab" if config.two_models else ""
        )
        run_dir = Path(args.out) / name
        if (run_dir / "checkpoints" / ckpt.LAST).exists():
            raise UsageError(
                f"--name: the run folder {run_dir} already holds a checkpoint; pass --resume "
                f"{run_dir} to continue it or choose another --name"
            )
    with _blame(blame):
        trainer = Trainer(
            config,
            run_dir,
            resume=bool(args.resume),
            device=args.device,
            progress=args.progress,
            bf16=args.bf16,
        )
    try:
        summary = trainer.run()
    except NonFiniteLoss as err:
        print(f"debias train: {err}", file=sys.stderr)
        return 1
    if not trainer.dist.main:
        return 0
    status = summary["status"]
    print(f"{status} at step {summary['step']}; checkpoint {summary['checkpoint']}")
    best = summary["held_out_loss_min"]
    if best["step"] is not None:
        print(f"held-out loss minimum {best['held_out_loss']:.4f} at step {best['step']}")
    monitor = summary["monitor"]
    if monitor is not None:
        drift = monitor.get("drift_step")
        print(
            f"samples drift toward their training images from step {drift}"
            if drift is not None
            else "no drift toward the training images detected"
        )
    if status == "interrupted":
        world = trainer.dist.world
        launch = (
            f"torchrun --nproc_per_node {world} -m debias.pipeline.cli" if world > 1 else "debias"
        )
        print(f"resume with: {launch} train --resume {run_dir}")
        return 130
    print(f"wrote {run_dir}/")
    return 0


def _load_for_sampling(args: argparse.Namespace):
    import torch

    from debias.pipeline.train import load_model

    with _blame({"checkpoint": "--ckpt", "member": "--member", "config": "--ckpt"}):
        model, schedule, meta = load_model(args.ckpt, ema=not args.raw_weights, member=args.member)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), schedule, meta, device


# The sampler's checks of the arguments its flags give (a method of the other family, more
# steps than the schedule has, eta with a method other than ddim).
_SAMPLER_FLAGS = {"steps": "--steps", "method": "--method", "eta": "--eta"}


def _draw(args: argparse.Namespace, model, schedule, shape, device, batch_size=None):
    """``[N, C, H, W]`` samples on the CPU as the sampler flags ask, seeded with --seed."""
    from debias.pipeline.sampling import sample

    with _blame(_SAMPLER_FLAGS):
        return sample(
            model,
            schedule,
            shape,
            steps=args.steps,
            method=args.method,
            eta=args.eta,
            generator=args.seed,
            batch_size=batch_size,
            device=device,
            progress=args.progress,
        ).cpu()


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from debias.pipeline.sampling import DEFAULT_METHOD
    from debias.pipeline.train import save_grid

    model, schedule, meta, device = _load_for_sampling(args)
    shape = (
        args.n,
        model.config["in_channels"],
        model.config["image_size"],
        model.config["image_size"],
    )
    images = _draw(args, model, schedule, shape, device, args.batch_size)
    out = Path(args.out)
    save_grid(images, out)
    arrays = out.with_suffix(".npz")
    np.savez(arrays, samples=images.numpy())
    method = args.method or DEFAULT_METHOD[schedule.family]
    print(
        f"{args.n} samples at step {meta['step']} ({method}, {args.steps or 'all'} steps, "
        f"seed {args.seed}): wrote {out} and {arrays}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from debias.pipeline.evaluate import evaluate
    from debias.pipeline.train import TrainConfig, prepare_data

    if args.feature_weights is not None and not os.path.isfile(args.feature_weights):
        raise UsageError(f"--feature-weights: no such file: {args.feature_weights}")
    model, schedule, meta, device = _load_for_sampling(args)
    config = TrainConfig.from_dict(meta["config"])
    with _blame({"source": "--ckpt"}):  # the run's data, as its checkpoint names it
        parts, _ = prepare_data(config)
    data = parts[1] if args.member == "b" else parts[0]
    shape = (args.n, *data.shape)
    samples = _draw(args, model, schedule, shape, device)
    features = None
    if args.feature_weights is not None:
        from debias.pipeline.evaluate import inception_features

        def features(x):
            return inception_features(x, args.feature_weights)

    report = evaluate(
        model,
        schedule,
        data.images,
        data.labels,
        samples,
        args.out,
        feature_net=features,
        seed=args.seed,
        progress=args.progress,
    )
    prdc, shift = report.get("prdc"), report["channel_shift"]
    print(
        f"{args.n} samples of {args.ckpt} (step {meta['step']}) against {len(data)} "
        f"training images, features: {report['feature_space']}"
    )
    if report.get("fd") is not None:
        print(f"Fréchet distance {report['fd']:.4g}")
    else:
        print(f"Fréchet distance unavailable: {report.get('fd_unavailable')}")
    if prdc is not None:
        print(
            "precision {precision:.3f}  recall {recall:.3f}  density {density:.3f}  "
            "coverage {coverage:.3f}  (k={k})".format(**prdc)
        )
    shares = report.get("class_proportions")
    if shares is not None:
        print(
            f"class shares, samples vs data: majority class {shares['majority']} "
            f"{shares['samples'][shares['majority']]:.3f} vs "
            f"{shares['data'][shares['majority']]:.3f} (shift {shares['majority_shift']:+.3f}), "
            f"total variation {shares['total_variation']:.3f}"
        )
    print(
        "channel mean shift (samples - data): "
        + ", ".join(f"{v:+.4f}" for v in shift["mean_shift"])
    )
    print(f"wrote {args.out}/evaluation.json, timesteps.csv, timesteps.png")
    return 0


def _sampling_methods() -> tuple[str, ...]:
    from debias.pipeline.sampling import METHODS

    return METHODS


def _add_sampling_args(parser, *, n_default: int, out_default: str) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint file or run folder")
    parser.add_argument(
        "--n", type=positive_int, default=n_default, help=f"samples (default: {n_default})"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="sampler steps, respaced (default: all T)"
    )
    parser.add_argument(
        "--method",
        default=None,
        choices=_sampling_methods(),
        help="ddpm (ancestral; learned variance when trained with it), ddim, dpm++2m "
        "(DPM-Solver++ 2M), unipc; flow models: euler, heun (default: ddpm, or euler for flow)",
    )
    parser.add_argument(
        "--eta", type=_number(0.0, None, low_open=False), default=0.0, help="DDIM eta (default: 0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument(
        "--member", default="", choices=("", "a", "b"), help="which model of a two-model run"
    )
    parser.add_argument(
        "--raw-weights", action="store_true", help="use the raw weights instead of the EMA"
    )
    parser.add_argument(
        "--device", type=_device, help="cpu, cuda, ... (default: a GPU if there is one)"
    )
    parser.add_argument("--out", default=out_default, help=f"output (default: {out_default})")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar on stderr (default: on)",
    )


def _add_sample(sub) -> None:
    sample = sub.add_parser(
        "sample", help="draw samples from a checkpoint: a PNG grid and an .npz of the arrays"
    )
    _add_sampling_args(sample, n_default=64, out_default="samples.png")
    sample.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="model batch size (default: all at once)",
    )
    sample.set_defaults(func=_sample)


def _add_evaluate(sub) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        help="precision/recall/density/coverage, Fréchet distance, colour shift and the "
        "per-timestep analyses of a checkpoint",
    )
    _add_sampling_args(evaluate, n_default=512, out_default="runs/evaluate")
    evaluate.add_argument(
        "--feature-weights",
        metavar="PATH",
        help="a local TorchScript feature extractor (e.g. Inception) for FD and PRDC; "
        "default: a small classifier trained on the run's data",
    )
    evaluate.set_defaults(func=_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="debias", description="Unbiased diffusion training: fused loss kernels and tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_sample(sub)
    _add_evaluate(sub)
    _add_score(sub)
    _add_module(
        sub,
        "study",
        "debias.pipeline.study",
        "each paper's claim as one command: train a grid over seeds, evaluate it, write "
        "study.json, study.md and plots to OUT/study-NAME/ (resumable)",
    )
    _add_module(
        sub,
        "info",
        "debias.info",
        "versions, compiled kernels, CPU features, backends and GPU (--json for bug reports)",
    )
    return parser


def _add_module(sub, name: str, module: str, text: str) -> None:
    """A subcommand whose options and work live in ``module`` (``add_arguments``, ``run``)."""
    import importlib

    owner = importlib.import_module(module)
    parser = sub.add_parser(name, help=text, description=text)
    owner.add_arguments(parser)
    parser.set_defaults(func=owner.run)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2: a user's mistake, reported on one
    line; any other exception propagates with its traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"debias {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
