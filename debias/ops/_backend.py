"""Which implementation runs an op: `torch` (the reference), `cpu` (C++), `triton`, `cuda`.

The C++ kernels load on first use: the ahead-of-time build `debias._C` when it matches this
torch, else the same sources compiled here once and cached (debias/_build.py; DEBIAS_NO_JIT=1
turns that off).

Order of precedence: the op's ``backend=`` argument, then the environment variable
DEBIAS_BACKEND, then the default for the tensors' device.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
import warnings

import torch

from debias import _build

BACKENDS = ("torch", "cpu", "triton", "cuda")


# The compiled kernels, loaded on first use by _load(): the ahead-of-time build debias._C when
# it was built against this torch, else the same sources compiled here (debias/_build.py).
_C = None
_MISSING = "not loaded yet"
_EXTENSION: dict = {"kind": None, "path": None, "built_against": None, "reason": _MISSING}
_loaded = False
_load_lock = threading.Lock()
_warned = False


def compiled():
    """The compiled extension (which registers ``torch.ops.debias_C``), or None: loaded on the
    first call (see ``extension``); without it the first eager call warns once."""
    global _warned
    _ensure_loaded()
    if _C is None and not _warned and not torch.compiler.is_compiling():
        _warned = True
        warnings.warn(
            f"debias: the compiled kernels (debias._C) are not available ({_MISSING}); every "
            f"op runs on its torch backend, which is correct but slower. {_remedy()}",
            RuntimeWarning,
            stacklevel=4,
        )
    return _C


def extension() -> dict:
    """How the compiled kernels were obtained, after loading them if not done yet:
    ``kind`` "aot" (debias._C, built at install time), "jit" (compiled here on first use,
    kept in torch's extension cache) or None; ``path`` of the library; ``built_against``: the
    torch version recorded in it (None when the library predates the record); ``reason``: why
    the ahead-of-time build was not used, or why there are no kernels."""
    compiled()
    return dict(_EXTENSION)


def _remedy() -> str:
    """How to get the kernels, for the warning."""
    if _build.flag(_build.NO_JIT_ENV):
        return (
            f"Unset {_build.NO_JIT_ENV} to compile them on first use, or build them at install "
            "time: `pip install ninja && pip install --no-build-isolation .`"
        )
    if "failed" in _MISSING:
        return (
            "Fix the build error printed above, or build them at install time with "
            "`pip install --no-build-isolation .`; DEBIAS_NO_JIT=1 stops the attempts."
        )
    return (
        "To get them, install a C++ compiler (g++) and ninja (`pip install ninja`): they then "
        "compile on first use; or build them at install time with "
        "`pip install --no-build-isolation .`"
    )


# Under torch.compile the first use loads at trace time and the graph keeps the answer.
@torch.compiler.assume_constant_result
def _ensure_loaded() -> bool:
    if not _loaded:
        with _load_lock:
            if not _loaded:
                _load()
    return True


def _load() -> None:
    """Sets _C and _EXTENSION: the ahead-of-time debias._C when its recorded torch is this
    one (or it has no record: a build made before the record existed, trusted as before);
    otherwise, or when it fails to import, the CPU kernels compiled here; else nothing.

    A process that blocks the module (``sys.modules["debias._C"] = None``, the standard way to
    make an import fail) gets no compiled kernels at all, as an install without them would
    have had before the build on first use existed."""
    global _C, _MISSING, _loaded
    info = {"kind": None, "path": None, "built_against": None, "reason": None}
    blocked = "debias._C" in sys.modules and sys.modules["debias._C"] is None
    spec = None if blocked else importlib.util.find_spec("debias._C")
    reasons = []
    if blocked:
        reasons.append("the import of debias._C is blocked in this process")
    elif spec is None or not spec.origin:
        reasons.append("debias._C is not installed")
    else:
        stamp = _build.read_stamp(spec.origin)
        if stamp is not None and stamp != torch.__version__:
            # Never imported: it may load and misbehave against this torch.
            reasons.append(
                f"debias._C was built against torch {stamp}, this is {torch.__version__}"
            )
        else:
            try:
                _C = importlib.import_module("debias._C")
                info.update(kind="aot", path=spec.origin, built_against=stamp)
            except (ImportError, OSError) as err:  # e.g. an undefined symbol of another torch
                reasons.append(f"debias._C does not load with torch {torch.__version__}: {err}")
    if _C is None and not blocked:
        why = None if _build.flag(_build.NO_JIT_ENV) else _build.missing_tools()
        if _build.flag(_build.NO_JIT_ENV):
            reasons.append(f"{_build.NO_JIT_ENV} is set")
        elif why is not None:
            reasons.append(f"cannot compile them here: {why}")
        else:
            try:
                _C, path = _build.jit_load()
                info.update(kind="jit", path=path, built_against=torch.__version__)
            except Exception as err:  # a failed build: the torch backend, and say why
                print(f"debias: compiling the C++ kernels failed:\n{err}", file=sys.stderr)
                lines = [line for line in str(err).strip().splitlines() if line.strip()]
                reasons.append(f"compiling them here failed: {' / '.join(lines[-3:])}")
    info["reason"] = "; ".join(reasons) or None
    _MISSING = info["reason"] or ""
    _EXTENSION.update(info)
    _loaded = True


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
    found.sort(key=GPU_PREFERENCE.index)
    return (*found, "torch")


# The default on a GPU is the faster of triton and cuda in a committed benchmark row
# (benchmarks/results/noise_loss_<gpu>.csv, which benchmarks/gpu_run.sh writes). No GPU row is
# committed yet: benchmarks/results/ holds CPU rows only. Triton leads until then, and the
# order flips only when a committed row shows cuda faster; that row is cited here.
GPU_PREFERENCE = ("triton", "cuda")


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
