"""Checkpoints in safetensors, written atomically.

A checkpoint is one ``.safetensors`` file: every tensor of the training state under a dotted
name (``model.``, ``ema.``, ``optim.``, ``rng.``, ...) and, in the header's metadata under
``"debias"``, a JSON document with everything that is not a tensor (step, config, optimizer
hyper-parameters). Writing goes to a temporary file in the same folder, is flushed to disk and
then renamed over the target, so a crash or Ctrl-C mid-write never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "debias-checkpoint-1"
LAST = "last.safetensors"


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Writes ``tensors`` and the JSON-serialisable ``meta`` to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or strided storage; a contiguous CPU copy of each is cheap here.
    flat = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    header = {"debias": json.dumps({"format": FORMAT, **meta})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(flat, str(tmp), metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ValueError: the file is missing, truncated, corrupt or not a debias checkpoint.
    """
    from safetensors import SafetensorError, safe_open

    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("debias")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"checkpoint {path} is corrupt or unreadable: {err}") from err
    try:
        meta = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {path} has a corrupt header: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a {FORMAT} file")
    return tensors, meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a path that is the file itself or a run folder (its last one)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / LAST, path / LAST):
            if candidate.is_file():
                return candidate
        raise ValueError(f"checkpoint: no {LAST} in the run folder {path}")
    if not path.is_file():
        raise ValueError(f"checkpoint: no such file or run folder: {path}")
    return path


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.`` with the prefix removed."""
    cut = len(prefix) + 1
    return {name[cut:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}


def with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": t for name, t in tensors.items()}


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as flat tensors plus its JSON-serialisable param groups."""
    state = opt.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"{index}.{slot}"] = torch.as_tensor(value)
    return tensors, state["param_groups"]


def load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, _, slot = name.partition(".")
        state.setdefault(int(index), {})[slot] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise ValueError(f"checkpoint: optimizer state does not fit this model: {err}") from err


def load_module_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` with a ValueError that names what did not fit."""
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint: the {what} weights do not fit this model: {err}") from err
