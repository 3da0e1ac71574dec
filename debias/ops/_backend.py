"""Which implementation runs an op: `torch` (the reference), `cpu` (C++), `triton`, `cuda`.

Order of precedence: the op's ``backend=`` argument, then the environment variable
DEBIAS_BACKEND, then the default for the tensors' device.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")


try:
    _C = importlib.import_module("debias._C")
except ImportError as err:  # built with DEBIAS_NO_EXTENSIONS=1, or without a compiler
    _C, _MISSING = None, str(err)
_warned = False


def compiled():
    """The compiled extension ``debias._C`` (which registers ``torch.ops.debias_C``), or None;
    the first eager call without it warns once."""
    global _warned
    if _C is None and not _warned and not torch.compiler.is_compiling():
        _warned = True
        warnings.warn(
            f"debias: the compiled kernels (debias._C) are not available ({_MISSING}); every "
            "op runs on its torch backend, which is correct but slower. Reinstall with "
            "`pip install --no-build-isolation .` to build them.",
            RuntimeWarning,
            stacklevel=4,
        )
    return _C


def available(device: torch.device) -> tuple[str, ...]:
    """Backends that can run on ``device``, the default first."""
    if device.type == "cpu":
        found = ("cpu", "torch") if compiled() is not None else ("torch",)
        # The Triton interpreter runs the GPU kernels on CPU tensors, slowly: a test backend,
        # never the default.
        return found + (("triton",) if triton_interpreted() else ())
    if device.type != "cuda":
        return ("torch",)
    found = [name for name, ok in (("cuda", _cuda_kernels()), ("triton", _triton())) if ok]
    # The default on a GPU is the faster of cuda and triton in benchmarks/results/
    # noise_loss_<gpu>.csv. No GPU row exists yet (benchmarks/gpu_run.sh makes one), so cuda
    # leads provisionally: it needs no JIT compilation on first use.
    found.sort(key=GPU_PREFERENCE.index)
    return (*found, "torch")


GPU_PREFERENCE = ["cuda", "triton"]


def triton_interpreted() -> bool:
    """Triton is installed and runs in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1" and _triton()


@functools.cache
def _triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _cuda_kernels() -> bool:
    """debias._C was built with its CUDA kernels (an extension built against CPU torch has
    none)."""
    return has_kernel("add_noise", "CUDA")


def has_kernel(op: str, dispatch_key: str) -> bool:
    """``torch.ops.debias_C.<op>`` is built and has a kernel for ``dispatch_key``."""
    if compiled() is None or not hasattr(torch.ops.debias_C, op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"debias_C::{op}", dispatch_key)


def resolve(
    backend: str | None, device: torch.device, supported: tuple[str, ...] = BACKENDS
) -> str:
    """The backend to run on ``device``: ValueError naming ``backend`` if it cannot run.
    ``supported``: the backends the op has (default: all)."""
    source = "backend"
    if backend is None:
        backend = os.environ.get("DEBIAS_BACKEND") or None
        source = "DEBIAS_BACKEND"
        if backend in BACKENDS and backend not in supported:
            backend = None  # a process-wide choice; an op without that backend keeps its default
    choices = tuple(b for b in available(device) if b in supported)
    if backend is None:
        return choices[0]
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if backend not in choices:
        raise ValueError(
            f"{source}={backend!r} cannot run on {device.type} tensors in this build; "
            f"available there: {choices}"
        )
    return backend
