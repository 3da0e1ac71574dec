"""`debias train`: a diffusion model trained with the fused ops, watched for memorization.

One step: draw a batch (an epoch-wise permutation of the training split), timesteps
(``debias.sample_timesteps``: uniform for DDPM; uniform, logit-normal or SD3's mode density
for rectified flow), ``debias.add_noise`` (noise drawn inside the kernel), the UNet,
``debias.fused_loss`` with the chosen weighting and target, AdamW with gradient clipping, an
EMA of the weights. With ``learn_sigma`` the UNet outputs 2C channels and the loss is
guided-diffusion's hybrid: ``fused_loss`` on the first C (read in place) plus the
variational-bound term on the last C with the mean detached, times T/1000 (RESCALED_MSE).

The step makes no host synchronisation: per-step statistics, the NaN check included, are
accumulated on the device and read every ``log_every`` steps (and before any evaluation,
sample grid or checkpoint, so a non-finite loss never reaches a checkpoint).

Everything random comes from one ``torch.Generator`` per process (batch order, timesteps,
the Philox key of the noise) plus torch's global generator (dropout), and all of it is in the
checkpoint: a run resumed from step s computes the same losses as one that never stopped.

A run folder ``runs/<name>/`` holds config.json, checkpoints/ (last.safetensors and one file
per checkpoint step), metrics.csv + metrics.jsonl (loss overall and per t-bucket, held-out
loss, learning rate, throughput), samples/step_<step>.png, the monitor's monitor.csv,
monitor.json and monitor.png, and summary.json when the run ends.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import debias
from debias.checks import check_float, check_int
from debias.pipeline import checkpoint as ckpt
from debias.pipeline.data import (
    ImageData,
    disjoint_splits,
    load_data,
    select_classes,
    set_proportions,
    split_held_out,
)
from debias.pipeline.unet import UNet
from debias.pipeline.variance import DDPM_PREDICTIONS
from debias.schedules import TIMESTEP_SCHEMES
from debias.weighting import FAMILY_WEIGHTINGS

FAMILIES = ("ddpm", "flow")
# Per family: the schedules, and the targets it trains (the first is the default): DDPM's
# three, which the samplers and the learned variance invert; on flow schedules rectified flow's
# velocity eps - x0, as SD3 / Flux train it.
SCHEDULES = {"ddpm": ("linear", "cosine"), "flow": ("flow_matching",)}
PREDICTIONS = {"ddpm": DDPM_PREDICTIONS, "flow": ("flow",)}
REPORT_TO = ("none", "tensorboard")
SPLITS = ("full", "a", "b")
BUCKETS = 10  # per-t loss buckets of T/10 timesteps each


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint.

    The defaults train the embedded example: the bundled 8x8 digits, debias weighting, a small
    ADM UNet, a few minutes on a 2-core CPU.
    """

    # data
    data: str = "digits"
    image_size: int | None = None  # resize to this side; None keeps the source's
    classes: list[int] | None = None  # keep only these labels
    proportions: list[float] | None = None  # class fractions after `classes`, e.g. [0.9, 0.1]
    held_out: float = 0.1  # fraction kept out of training, for the held-out loss
    split: str = "full"  # "a" / "b": train on one of two disjoint halves of the training split
    two_models: bool = False  # train a second model on split B in the same run
    train_size: int | None = None  # use only the first n training images (memorization studies)
    # model
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1  # depth: residual blocks per resolution level
    attention_resolutions: list[int] = field(default_factory=lambda: [4])
    dropout: float = 0.0
    # diffusion
    family: str = "ddpm"  # "ddpm" or "flow" (rectified flow, as SD3 / Flux train)
    schedule: str | None = None  # ddpm: "linear" (default) or "cosine"; flow: flow_matching
    num_timesteps: int = 1000
    prediction: str | None = None  # default: "epsilon" for ddpm, "flow" (eps - x0) for flow
    weighting: str = "debias"
    learn_sigma: bool = False  # ddpm: learned variance, guided-diffusion's hybrid loss
    timestep_sampling: str = "uniform"  # flow: also "logit_normal" or "mode"
    shift: float = 1.0  # flow: the scheduler's shift (SD3 uses 3)
    # optimisation
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    # what the run writes
    log_every: int = 10
    eval_every: int = 250
    eval_size: int = 256
    sample_every: int = 500
    sample_steps: int = 50
    sample_method: str | None = None  # sampler of grids and the monitor; default per family
    checkpoint_every: int = 500
    monitor_every: int = 500
    monitor_samples: int = 64
    stop_on_memorization: bool = False
    report_to: str = "none"  # "tensorboard": also write the scalars and grids for TensorBoard

    def __post_init__(self) -> None:
        _check_config(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**values)


# Fields a resumed run may change; every other one must match the checkpoint's.
RESUMABLE = frozenset(
    {"steps", "log_every", "eval_every", "sample_every", "checkpoint_every", "monitor_every",
     "stop_on_memorization", "report_to", "sample_method"}
)  # fmt: skip


def _check_config(c: TrainConfig) -> None:
    for name in (
        "base_channels",
        "num_res_blocks",
        "num_timesteps",
        "steps",
        "batch_size",
        "log_every",
        "eval_size",
        "sample_steps",
        "monitor_samples",
    ):
        check_int(name, getattr(c, name), 1)
    for name in ("warmup", "eval_every", "sample_every", "checkpoint_every", "monitor_every"):
        check_int(name, getattr(c, name), 0)  # 0 turns the periodic job off
    if c.family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {c.family!r}")
    # Unset family-dependent fields take the family's default (stored resolved).
    c.schedule = SCHEDULES[c.family][0] if c.schedule is None else c.schedule
    c.prediction = PREDICTIONS[c.family][0] if c.prediction is None else c.prediction
    choices = {
        "schedule": SCHEDULES[c.family],
        "prediction": PREDICTIONS[c.family],
        "weighting": FAMILY_WEIGHTINGS[c.family],
        "timestep_sampling": TIMESTEP_SCHEMES[c.family],
        "split": SPLITS,
        "report_to": REPORT_TO,
    }
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            raise ValueError(
                f"{name} must be one of {allowed} for family {c.family!r}, got {getattr(c, name)!r}"
            )
    if c.sample_method is not None:
        from debias.pipeline.sampling import DDPM_METHODS, FLOW_METHODS

        methods = DDPM_METHODS if c.family == "ddpm" else FLOW_METHODS
        if c.sample_method not in methods:
            raise ValueError(
                f"sample_method must be one of {methods} for family {c.family!r}, got "
                f"{c.sample_method!r}"
            )
    if c.learn_sigma and c.family != "ddpm":
        raise ValueError("learn_sigma applies to family 'ddpm' (a flow model has no variance)")
    c.shift = check_float("shift", c.shift, low=0.0)
    if c.family != "flow" and c.shift != 1.0:
        raise ValueError(f"shift applies to family 'flow' only, got {c.shift} for {c.family!r}")
    for name in ("held_out", "ema_decay"):
        check_float(name, getattr(c, name), 0.0, inclusive=True, high=1.0, high_inclusive=False)
    check_float("lr", c.lr, 0.0)
    for name in ("grad_clip", "weight_decay", "dropout"):  # grad_clip 0: no clipping
        check_float(name, getattr(c, name), 0.0, inclusive=True)
    if c.two_models and c.split != "full":
        raise ValueError("two_models trains on both halves; leave split at 'full'")
    if c.train_size is not None:
        check_int("train_size", c.train_size, 1)
    if c.report_to == "tensorboard":
        _summary_writer()  # fails here, with the install line, when tensorboard is missing
    if c.held_out == 0 and (c.eval_every or c.monitor_every):
        raise ValueError(
            "held_out=0 leaves no held-out images for eval_every / monitor_every; set both to 0"
        )


# ---- data and model ------------------------------------------------------------------------


def prepare_data(c: TrainConfig) -> tuple[list[ImageData], ImageData]:
    """``([train] or [train_a, train_b], held_out)`` as the config describes, seeded."""
    data = load_data(c.data, size=c.image_size, seed=c.seed)
    if c.classes is not None:
        data = select_classes(data, c.classes)
    if c.proportions is not None:
        classes = c.classes if c.classes is not None else list(range(len(c.proportions)))
        if len(classes) != len(c.proportions):
            raise ValueError(
                f"proportions has {len(c.proportions)} entries for {len(classes)} classes"
            )
        data = set_proportions(data, dict(zip(classes, c.proportions, strict=True)), seed=c.seed)
    if c.held_out > 0:
        train, held = split_held_out(data, c.held_out, seed=c.seed)
    else:
        train, held = data, data.subset(torch.zeros(0, dtype=torch.long))
    if c.split != "full" or c.two_models:
        halves = disjoint_splits(train, seed=c.seed)
        parts = list(halves) if c.two_models else [halves[SPLITS.index(c.split) - 1]]
    else:
        parts = [train]
    if c.train_size is not None:
        if c.train_size > min(len(p) for p in parts):
            raise ValueError(
                f"train_size={c.train_size} but the training split holds "
                f"{min(len(p) for p in parts)} images"
            )
        parts = [p.subset(torch.arange(c.train_size)) for p in parts]
    return parts, held


def build_schedule(c: TrainConfig) -> debias.NoiseSchedule:
    make = getattr(debias.NoiseSchedule, c.schedule)
    if c.family == "flow":
        return make(c.num_timesteps, shift=c.shift, prediction_type=c.prediction)
    return make(c.num_timesteps, prediction_type=c.prediction)


def build_model(c: TrainConfig, shape: tuple[int, int, int]) -> UNet:
    channels, height, width = shape
    if height != width:
        raise ValueError(f"data: images must be square, got {height}x{width}")
    return UNet(
        image_size=height,
        in_channels=channels,
        out_channels=2 * channels if c.learn_sigma else channels,
        base_channels=c.base_channels,
        channel_mult=tuple(c.channel_mult),
        num_res_blocks=c.num_res_blocks,
        attention_resolutions=tuple(c.attention_resolutions),
        dropout=c.dropout,
    )


# ---- one model's training state ------------------------------------------------------------


class _Member:
    """A model with its EMA, optimizer, data order and random stream."""

    def __init__(
        self,
        tag: str,
        data: ImageData,
        model: nn.Module,
        c: TrainConfig,
        rank: int,
        device: torch.device,
    ) -> None:
        self.tag = tag  # "" for the only model, "a" / "b" for two
        self.data = data
        self.images = data.images.to(device)  # small sets: kept on the device, no copy a step
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.gen = torch.Generator().manual_seed(_stream_seed(c.seed, tag, rank))
        # The permutation is shared by all ranks (same seed), each takes its slice of a batch.
        self.order_gen = torch.Generator().manual_seed(_stream_seed(c.seed, tag, -1))
        self.perm = torch.randperm(len(data), generator=self.order_gen)
        self.pos = 0

    def next_indices(self, batch: int, rank: int, world: int) -> torch.Tensor:
        """This rank's rows of the next global batch, drawing a new epoch order as needed."""
        total = batch * world
        taken = []
        while total > 0:
            if self.pos == len(self.perm):
                self.perm = torch.randperm(len(self.data), generator=self.order_gen)
                self.pos = 0
            part = self.perm[self.pos : self.pos + total]
            self.pos += len(part)
            total -= len(part)
            taken.append(part)
        rows = torch.cat(taken)
        return rows[rank * batch : (rank + 1) * batch]

    @torch.no_grad()
    def update_ema(self, step: int, decay: float) -> None:
        # The usual warm-up keeps early EMA weights from being dominated by the random init.
        decay = min(decay, (1 + step) / (10 + step))
        ema = list(self.ema.parameters())
        torch._foreach_lerp_(ema, list(self.model.parameters()), 1.0 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            b_ema.copy_(b)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        prefix = f"{self.tag}." if self.tag else ""
        opt_tensors, groups = ckpt.optimizer_state(self.opt)
        tensors = {
            **ckpt.with_prefix(prefix + "model", self.model.state_dict()),
            **ckpt.with_prefix(prefix + "ema", self.ema.state_dict()),
            **ckpt.with_prefix(prefix + "optim", opt_tensors),
            prefix + "data.perm": self.perm,
            prefix + "data.order_rng": self.order_gen.get_state(),
        }
        return tensors, {"param_groups": groups, "pos": self.pos}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        prefix = f"{self.tag}." if self.tag else ""
        ckpt.load_module_state(self.model, ckpt.split_prefix(tensors, prefix + "model"), "model")
        ckpt.load_module_state(self.ema, ckpt.split_prefix(tensors, prefix + "ema"), "EMA")
        opt = ckpt.split_prefix(tensors, prefix + "optim")
        ckpt.load_optimizer_state(self.opt, opt, meta["param_groups"])
        self.perm = tensors[prefix + "data.perm"].clone()
        if len(self.perm) != len(self.data):
            raise ValueError(
                f"checkpoint: it was trained on {len(self.perm)} images, this data has "
                f"{len(self.data)}"
            )
        self.order_gen.set_state(tensors[prefix + "data.order_rng"])
        self.pos = meta["pos"]


def _stream_seed(seed: int, tag: str, rank: int) -> int:
    return (seed * 1_000_003 + {"": 0, "a": 0, "b": 1}[tag] * 7919 + rank + 1) % 2**63


# ---- the run -------------------------------------------------------------------------------


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stopped and kept its last good checkpoint."""


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _distributed(device: str | None) -> _Dist:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo
    on CPUs; each process takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = (device is None and torch.cuda.is_available()) or str(device).startswith("cuda")
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo")
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.cuda.set_device(dev)
        return _Dist(rank, world, dev)
    if device is None:
        return _Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    return _Dist(device=torch.device(device))


class _Interrupt:
    """Ctrl-C sets a flag that the loop reads between steps, so the checkpoint it writes is a
    step boundary (exact resume). A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Interrupt:
        with contextlib.suppress(ValueError):  # not the main thread: no handler, no flag
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """Runs one training job in ``run_dir``. See the module docstring for what it writes.

    Args:
        config: the run's :class:`TrainConfig`.
        run_dir: the run folder; must not hold a checkpoint unless ``resume``.
        resume: continue from ``run_dir/checkpoints/last.safetensors``; ``config`` may differ
            from the stored one only in :data:`RESUMABLE` fields.
        device: "cpu", "cuda", "cuda:1"...; default a GPU when there is one.
        progress: a tqdm bar on the main process.
        bf16: autocast the model to bfloat16 (default: on a GPU).
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        device: str | None = None,
        progress: bool = True,
        bf16: bool | None = None,
    ) -> None:
        self.c = config
        self.dir = Path(run_dir)
        self.dist = _distributed(device)
        self.progress = progress and self.dist.main
        self.bf16 = self.dist.device.type == "cuda" if bf16 is None else bf16
        last = self.dir / "checkpoints" / ckpt.LAST
        stored = None
        if resume:
            tensors, stored = ckpt.load_checkpoint(last)
            _check_resumable(stored["config"], config)
        elif last.exists():
            raise ValueError(
                f"run folder {self.dir} already holds a checkpoint; pass --resume to continue it "
                "or choose another --name"
            )
        parts, self.held = prepare_data(config)
        self.schedule = build_schedule(config)
        tags = ["a", "b"] if config.two_models else [""]
        if config.batch_size % self.dist.world:
            raise ValueError(
                f"batch_size={config.batch_size} must divide among {self.dist.world} processes"
            )
        self.local_batch = config.batch_size // self.dist.world
        self.members = []
        for tag, part in zip(tags, parts, strict=True):
            torch.manual_seed(config.seed)  # both models of a pair start from the same weights
            model = build_model(config, part.shape).to(self.dist.device)
            self.members.append(_Member(tag, part, model, config, self.dist.rank, self.dist.device))
        self.forward = [self._wrap(m.model) for m in self.members]
        self.monitor = self._make_monitor(parts)
        self.step = 0
        self.best = {"step": None, "held_out_loss": math.inf}
        self._last_good: Path | None = None
        self._last_saved = -1
        if stored is not None:
            self._restore(tensors, stored)
            self._last_saved = self.step
        self._stats = [_Interval(self.dist.device, config.num_timesteps) for _ in self.members]

    # ---- set-up ---------------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _make_monitor(self, parts: list[ImageData]):
        if not self.c.monitor_every or not self.dist.main:
            return None
        from debias.pipeline.monitor import MemorizationMonitor

        return MemorizationMonitor(
            parts[0].images,
            self.held.images,
            train_b=parts[1].images if len(parts) == 2 else None,
            seed=self.c.seed,
        )

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["world"] != self.dist.world:
            raise ValueError(
                f"checkpoint: written by {meta['world']} processes, resumed with "
                f"{self.dist.world}; resume with the same number"
            )
        for m, m_meta in zip(self.members, meta["members"], strict=True):
            m.load(tensors, m_meta)
            m.gen.set_state(tensors[f"rng.gen.{m.tag or '-'}.{self.dist.rank}"])
        torch.set_rng_state(tensors["rng.torch"])
        if self.dist.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.dist.device)
        self.step = meta["step"]
        self.best = meta["best"]
        if self.monitor is not None and meta.get("monitor") is not None:
            self.monitor.load_state_dict(meta["monitor"])
        self._last_good = self.dir / "checkpoints" / ckpt.LAST
        if self.dist.main:
            _truncate_logs(self.dir, self.step)

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Trains to ``config.steps``; returns the summary (also written as summary.json).

        Raises:
            NonFiniteLoss: the loss became NaN/inf (no checkpoint is written after it).
        """
        from tqdm import tqdm

        c = self.c
        if self.dist.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
        self._logs = _Logs(self.dir, c.report_to) if self.dist.main else None
        start_step, started = self.step, time.perf_counter()
        bar = tqdm(
            total=c.steps,
            initial=self.step,
            desc=f"train {self.dir.name}",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        stopped = None
        try:
            with _Interrupt() as interrupt:
                while self.step < c.steps:
                    for i, member in enumerate(self.members):
                        self._train_step(i, member)
                    self.step += 1
                    bar.update(1)
                    if self.progress and self.step % c.log_every == 0:
                        bar.set_postfix(loss=f"{self._stats[0].last:.4f}")
                    reason = self._periodic()
                    if reason is None and interrupt.requested:
                        reason = "interrupted"
                    # Every process stops at the same step boundary. With several processes
                    # that takes a collective, so it is taken at log and monitor steps only
                    # (Ctrl-C under torchrun acts at the next log step).
                    if self.dist.world == 1 or self._due(c.log_every) or self._due(c.monitor_every):
                        if self._any(reason is not None):
                            stopped = reason or "stopped with the other processes"
                            break
            bar.close()
            self._check_finite()
            self._flush_logs(force=True)
            if self._last_saved != self.step:
                self.save()
        finally:
            bar.close()
            if self._logs is not None:
                self._logs.close()
        elapsed = time.perf_counter() - started
        return self._finish(stopped or "completed", (self.step - start_step) / max(elapsed, 1e-9))

    def _due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0

    def _train_step(self, i: int, m: _Member) -> None:
        c, dev = self.c, self.dist.device
        rows = m.next_indices(self.local_batch, self.dist.rank, self.dist.world)
        x0 = m.images[rows.to(dev, non_blocking=True)]
        t = debias.sample_timesteps(
            len(rows), self.schedule, c.timestep_sampling, generator=m.gen
        ).to(dev, non_blocking=True)
        x_t, noise = debias.add_noise(x0, t, self.schedule, generator=m.gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward[i](x_t, t)
        losses = self._losses(out, noise, x0, x_t, t, c.weighting)
        m.opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        clip = c.grad_clip if c.grad_clip > 0 else math.inf
        grad_norm = nn.utils.clip_grad_norm_(m.model.parameters(), clip)
        lr = c.lr * min(1.0, (self.step + 1) / c.warmup) if c.warmup else c.lr
        for group in m.opt.param_groups:
            group["lr"] = lr
        m.opt.step()
        m.update_ema(self.step, c.ema_decay)
        self._stats[i].add(losses.detach(), t, grad_norm.detach(), lr, self.step + 1)

    def _losses(self, out, noise, x0, x_t, t, weighting: str, vb: bool = True) -> torch.Tensor:
        """Per-sample loss ``[B]``: the weighted loss on the prediction channels, plus with
        ``learn_sigma`` (and ``vb``) the vb term on the variance channels (mean detached)
        x T/1000."""
        c = self.c
        channels = x0.shape[1]
        losses = debias.fused_loss(
            out[:, :channels],
            noise,
            t,
            self.schedule,
            weighting,
            prediction=c.prediction,
            x0=None if c.prediction == "epsilon" else x0,
            reduction="none",
        )
        if c.learn_sigma and vb:
            from debias.pipeline.variance import vb_loss

            vb = vb_loss(
                out[:, channels:], out[:, :channels], x0, x_t, t, self.schedule, c.prediction
            )
            losses = losses + vb * (c.num_timesteps / 1000.0)
        return losses

    def _periodic(self) -> str | None:
        """Logging, held-out loss, sample grids, monitor and checkpoints due at this step;
        returns why the run stops, if it does."""
        c, due = self.c, self._due
        if any(
            due(e)
            for e in (
                c.log_every,
                c.eval_every,
                c.monitor_every,
                c.sample_every,
                c.checkpoint_every,
            )
        ):
            self._check_finite()
        held = self._evaluate() if due(c.eval_every) and self.dist.main else None
        if due(c.log_every) or due(c.eval_every):  # every process: the row is all-reduced
            self._flush_logs(held=held)
        reason = None
        if self.dist.main:
            grid = None
            if due(c.monitor_every):
                grid, reason = self._watch(held)
            if due(c.sample_every):
                self._save_grid(grid)
        if due(c.checkpoint_every):
            self.save()
        return reason  # only the main process scores; run() takes the stop to every process

    def _check_finite(self) -> None:
        """Raises :class:`NonFiniteLoss` when a loss since the last check was NaN or inf (read
        from the device-side statistics: one synchronisation per check, not per step)."""
        first = torch.stack([stats.first_bad for stats in self._stats]).min()
        if self.dist.world > 1:
            import torch.distributed as dist

            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first.item())
        if first == _NO_STEP:
            return
        pairs = zip(self.members, self._stats, strict=True)
        seen = [(m, s) for m, s in pairs if int(s.first_bad.item()) == first]
        if not seen:  # another process saw it
            what, tag = "the loss became non-finite on another process", ""
        else:
            m, stats = seen[0]
            tag = f" (model {m.tag})" if m.tag else ""
            loss = stats.bad_loss.item()
            what = (
                f"the loss became {loss}"
                if not math.isfinite(loss)
                else f"the gradient norm became non-finite (loss {loss:.4g})"
            )
        kept = (
            f"the last good checkpoint is {self._last_good}"
            if self._last_good is not None
            else "no checkpoint had been written yet"
        )
        self._flush_logs(force=True)
        raise NonFiniteLoss(
            f"{what} at step {first}{tag}; the run stopped at step {self.step} and {kept}"
        )

    def _any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop must be taken together)."""
        if self.dist.world == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)], device=self.dist.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    # ---- held-out loss, samples, monitor --------------------------------------------------

    @torch.no_grad()
    def _evaluate(self) -> list[dict[str, float]]:
        """The EMA models' loss on a fixed held-out batch: the same images, timesteps
        (stratified over [0, T)) and noise at every evaluation, so the curve is comparable."""
        c, dev = self.c, self.dist.device
        x0 = self.held.images[: c.eval_size].to(dev)
        n = len(x0)
        index = torch.linspace(0, c.num_timesteps - 1, n).round().long()
        t = (index if c.family == "ddpm" else self.schedule.timesteps[index]).to(dev)
        gen = torch.Generator().manual_seed(c.seed + 17)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        x_t, _ = debias.add_noise(x0, t, self.schedule, noise=noise)
        rows = []
        for m in self.members:
            out = m.ema(x_t, t).float()
            # The loss the run minimises (with learn_sigma: the hybrid) and the plain MSE.
            weighted = self._losses(out, noise, x0, x_t, t, c.weighting).mean()
            mse = self._losses(out, noise, x0, x_t, t, "constant", vb=False).mean()
            rows.append({"held_out_loss": weighted.item(), "held_out_mse": mse.item()})
        if rows[0]["held_out_loss"] < self.best["held_out_loss"]:
            self.best = {"step": self.step, "held_out_loss": rows[0]["held_out_loss"]}
        return rows

    def draw(self, n: int, seed: int) -> list[torch.Tensor]:
        """n samples from each EMA model with the same starting and reverse noise."""
        from debias.pipeline.sampling import sample

        shape = (n, *self.members[0].data.shape)
        return [
            sample(
                m.ema,
                self.schedule,
                shape,
                steps=self.c.sample_steps,
                method=self.c.sample_method,
                generator=seed,
            ).cpu()
            for m in self.members
        ]

    def _watch(self, held: list[dict] | None) -> tuple[list[torch.Tensor], str | None]:
        samples = self.draw(self.c.monitor_samples, self.c.seed + 29)
        loss = held[0]["held_out_loss"] if held is not None else None
        row = self.monitor.measure(
            self.step,
            samples[0],
            samples_b=samples[1] if len(samples) == 2 else None,
            held_out_loss=loss,
        )
        self._logs.monitor(row)
        self.monitor.plot(self.dir / "monitor.png")
        (self.dir / "monitor.json").write_text(json.dumps(self.monitor.summary(), indent=2))
        if self.c.stop_on_memorization and self.monitor.should_stop:
            return samples, f"memorization detected (drift from step {self.monitor.drift_step})"
        return samples, None

    def _save_grid(self, samples: list[torch.Tensor] | None) -> None:
        if samples is None:
            samples = self.draw(self.c.monitor_samples, self.c.seed + 29)
        for s, m in zip(samples, self.members, strict=True):
            suffix = f"_{m.tag}" if m.tag else ""
            save_grid(s, self.dir / "samples" / f"step_{self.step:07d}{suffix}.png")
            self._logs.grid(f"samples{suffix}", s, self.step)

    # ---- files ----------------------------------------------------------------------------

    def _flush_logs(self, held: list[dict] | None = None, force: bool = False) -> None:
        rows = []
        for i, (m, stats) in enumerate(zip(self.members, self._stats, strict=True)):
            row = stats.row(self.dist.world) if (stats.count or force) else None
            if row is None and held is None:
                continue
            row = {"step": self.step, "model": m.tag or "-", **(row or {})}
            if held is not None:
                row.update(held[i])
            rows.append(row)
        if self._logs is not None and rows:
            for row in rows:
                self._logs.metrics(row)

    def save(self) -> Path | None:
        """Writes checkpoints/last.safetensors and step_<step>.safetensors (main process);
        every process takes part (their random streams are gathered)."""
        gens = {}
        for m in self.members:
            states = _gather(m.gen.get_state(), self.dist.world)
            for r, state in enumerate(states):
                gens[f"rng.gen.{m.tag or '-'}.{r}"] = state
        self._last_saved = self.step
        if not self.dist.main:
            return None
        tensors, members = dict(gens), []
        for m in self.members:
            t, meta = m.state()
            tensors.update(t)
            members.append(meta)
        tensors["rng.torch"] = torch.get_rng_state()
        if self.dist.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.dist.device)
        meta = {
            "step": self.step,
            "world": self.dist.world,
            "config": self.c.to_dict(),
            "model_config": self.members[0].model.config,
            "members": members,
            "best": self.best,
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
            "debias_version": debias.__version__,
        }
        folder = self.dir / "checkpoints"
        path = ckpt.save_checkpoint(folder / f"step_{self.step:07d}.safetensors", tensors, meta)
        ckpt.save_checkpoint(folder / ckpt.LAST, tensors, meta)
        self._last_good = folder / ckpt.LAST
        return path

    def _finish(self, status: str, steps_per_s: float) -> dict[str, Any]:
        summary = {
            "status": status,
            "step": self.step,
            "steps_per_s": steps_per_s,
            "held_out_loss_min": self.best,
            "monitor": self.monitor.summary() if self.monitor is not None else None,
            "checkpoint": str(self._last_good),
            "run_dir": str(self.dir),
        }
        if self.dist.main:
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary


def _gather(state: torch.Tensor, world: int) -> list[torch.Tensor]:
    if world == 1:
        return [state]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, state)
    return out


def _check_resumable(stored: dict, config: TrainConfig) -> None:
    given = config.to_dict()
    differ = sorted(k for k in given if k not in RESUMABLE and given[k] != stored.get(k))
    if differ:
        pairs = ", ".join(f"{k}: checkpoint {stored.get(k)!r} vs now {given[k]!r}" for k in differ)
        raise ValueError(f"checkpoint does not match this run's settings ({pairs})")


_NO_STEP = 2**62  # first_bad before any non-finite loss


class _Interval:
    """Loss statistics since the last log row, kept on the device (no sync per step), and the
    first step whose loss or gradient norm was not finite (kept until read)."""

    def __init__(self, device: torch.device, num_timesteps: int) -> None:
        self.device = device
        self.num_timesteps = num_timesteps
        self.last = math.nan
        self.first_bad = torch.full((), _NO_STEP, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)  # its mean loss
        self._reset()

    def _reset(self) -> None:
        self.sum = torch.zeros(BUCKETS, dtype=torch.float64, device=self.device)
        self.num = torch.zeros(BUCKETS, dtype=torch.float64, device=self.device)
        self.grad = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count, self.images, self.lr = 0, 0, math.nan
        self.started = time.perf_counter()

    def add(self, losses, t, grad_norm, lr, step: int) -> None:
        # Bucket b holds t in [b T/10, (b + 1) T/10): integer DDPM steps, float flow times.
        bucket = (t.double() * BUCKETS / self.num_timesteps).long().clamp_(0, BUCKETS - 1)
        self.sum.index_add_(0, bucket, losses.double())
        self.num.index_add_(0, bucket, torch.ones_like(losses, dtype=torch.float64))
        self.grad += grad_norm.double()
        bad = ~(torch.isfinite(losses).all() & torch.isfinite(grad_norm))
        first = bad & (self.first_bad == _NO_STEP)
        self.bad_loss = torch.where(first, losses.double().mean(), self.bad_loss)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.count += 1
        self.images += len(losses)
        self.lr = lr

    def row(self, world: int) -> dict[str, float] | None:
        if not self.count:
            return None
        total, num = self.sum, self.num
        if world > 1:
            import torch.distributed as dist

            both = torch.stack((total, num))
            dist.all_reduce(both)
            total, num = both[0], both[1]
        elapsed = time.perf_counter() - self.started
        total, num = total.tolist(), num.tolist()
        row = {"loss": sum(total) / sum(num)}
        self.last = row["loss"]
        for b in range(BUCKETS):
            row[f"loss_t{b}"] = total[b] / num[b] if num[b] else math.nan
        row.update(
            lr=self.lr,
            grad_norm=self.grad.item() / self.count,
            img_per_s=self.images * world / elapsed,
        )
        self._reset()
        return row


_METRIC_FIELDS = [
    "step",
    "model",
    "loss",
    *[f"loss_t{b}" for b in range(BUCKETS)],
    "lr",
    "grad_norm",
    "img_per_s",
    "held_out_loss",
    "held_out_mse",
]


class _Logs:
    """metrics.csv / metrics.jsonl and monitor.csv, appended row by row and flushed; with
    ``report_to="tensorboard"`` the same scalars and the sample grids also go to
    ``run_dir/tensorboard`` (``tensorboard --logdir runs``)."""

    def __init__(self, run_dir: Path, report_to: str) -> None:
        self.dir = run_dir
        self.board = None
        if report_to == "tensorboard":
            self.board = _summary_writer()(log_dir=str(run_dir / "tensorboard"))

    def metrics(self, row: dict) -> None:
        _append(self.dir / "metrics.jsonl", self.dir / "metrics.csv", _METRIC_FIELDS, row)
        self._scalars("train", row)

    def monitor(self, row: dict) -> None:
        _append(self.dir / "monitor.jsonl", self.dir / "monitor.csv", None, row)
        self._scalars("monitor", row)

    def grid(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.board is not None:
            self.board.add_image(tag, (grid_image(images) + 1) / 2, step)
            self.board.flush()

    def _scalars(self, group: str, row: dict) -> None:
        if self.board is None:
            return
        prefix = f"{group}/" + (f"{row['model']}/" if row.get("model", "-") != "-" else "")
        for key, value in row.items():
            if key not in ("step", "model") and isinstance(value, (int, float)):
                if not isinstance(value, bool) and math.isfinite(value):
                    self.board.add_scalar(prefix + key, value, row["step"])
        self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _summary_writer():
    """torch's SummaryWriter, which needs the tensorboard package (an optional extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(
            "report_to='tensorboard' needs the tensorboard package: pip install "
            f"'debias-kernels[tensorboard]' (or pip install tensorboard) ({err})"
        ) from None
    return SummaryWriter


def _append(jsonl: Path, csv_path: Path, fields: list[str] | None, row: dict) -> None:
    with open(jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")
    flat = {k: v for k, v in row.items() if not isinstance(v, (list, dict))}
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(flat), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(flat)


def _truncate_logs(run_dir: Path, step: int) -> None:
    """Drops log rows written after the checkpoint a run resumes from (they are redone)."""
    for stem, fields in (("metrics", _METRIC_FIELDS), ("monitor", None)):
        jsonl = run_dir / f"{stem}.jsonl"
        if not jsonl.exists():
            continue
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if r["step"] <= step]
        jsonl.unlink()
        (run_dir / f"{stem}.csv").unlink(missing_ok=True)
        for r in keep:
            _append(jsonl, run_dir / f"{stem}.csv", fields, r)


def grid_image(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """``[n, C, H, W]`` images in [-1, 1] tiled into one ``[C, H', W']`` image, 1-pixel
    borders, ``nrow`` per row (default: a square)."""
    n, channels, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    pad = 1
    grid = torch.full((channels, ncol * (h + pad) + pad, nrow * (w + pad) + pad), -1.0)
    for i, img in enumerate(images.detach().cpu().float().clamp(-1, 1)):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = img
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """A PNG grid of ``[n, C, H, W]`` images in [-1, 1]; small images are enlarged (nearest)
    so an 8x8 digit stays visible."""
    from PIL import Image

    grid = grid_image(images, nrow)
    channels = grid.shape[0]
    pixels = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    scale = max(1, 512 // max(grid.shape[1:]))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def train(config: TrainConfig, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Builds a :class:`Trainer` and runs it; see there for the arguments."""
    return Trainer(config, run_dir, **kwargs).run()


def load_model(
    path: str | Path, *, ema: bool = True, member: str = ""
) -> tuple[UNet, debias.NoiseSchedule, dict]:
    """``(model, schedule, meta)`` from a checkpoint file or run folder, in eval mode.

    Args:
        ema: the EMA weights (default) or the raw ones.
        member: "a" or "b" for a two-model run.
    """
    tensors, meta = ckpt.load_checkpoint(path)
    config = TrainConfig.from_dict(meta["config"])
    if config.two_models and member not in ("a", "b"):
        raise ValueError("member: this checkpoint holds two models; pass member='a' or 'b'")
    prefix = (f"{member}." if member else "") + ("ema" if ema else "model")
    model = UNet(**meta["model_config"])
    ckpt.load_module_state(model, ckpt.split_prefix(tensors, prefix), prefix)
    return model.eval(), build_schedule(config), meta
