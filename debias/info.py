"""What this installation of debias runs: versions, the compiled kernels (built ahead of time
or on first use, against which torch), the CPU features they dispatch on, each op's backends
and the one it picks on each device, and the GPU. Paste ``--json`` into a bug report.

    python -m debias.info [--json] [--no-build]
    debias info [--json] [--no-build]

``collect()`` gathers the report as a dict of JSON types, ``format_report`` prints it, and
``add_arguments`` / ``run`` let a command line add it as a subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

# What the C++ kernels check on the CPU (csrc/noise_loss.cpp: the Philox normal generator;
# csrc/knn.cpp: the scans of the knn fast pass; both by __builtin_cpu_supports), and what the
# int8 fast pass of debias.knn needs (oneDNN's int8 products through torch._int_mm).
_CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
_OPS = ("add_noise", "fused_loss", "knn")
_DEVICES = ("cpu", "cuda")


def collect(build: bool = True) -> dict[str, Any]:
    """The report: plain dicts, lists, strings, numbers, booleans and None.

    Args:
        build: load the compiled kernels as the ops would, compiling them if this torch has
            none yet (default). False: never compile; report what is there.
    """
    import torch

    import debias
    from debias import _build
    from debias.ops import _backend

    if build:
        extension = _backend.extension()
    else:
        with _env(_build.NO_JIT_ENV, "1"):
            extension = _backend.extension()
    try:
        jit_name = _build.jit_name(torch.__version__)
        jit_dir = _build.jit_directory(jit_name)
        jit_cached = os.path.isfile(os.path.join(jit_dir, f"{jit_name}.so"))
    except FileNotFoundError:  # no C++ sources in this installation
        jit_dir, jit_cached = None, False
    return {
        "debias": {"version": debias.__version__, "path": os.path.dirname(debias.__file__)},
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None),
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "triton": _triton(),
        "cuda": _cuda(torch),
        "extension": {
            **extension,
            "jit_cache": jit_dir,
            "jit_cached": jit_cached,
            "no_jit": _build.flag(_build.NO_JIT_ENV),
        },
        "cpu": _cpu(torch, _backend),
        "ops": _ops(torch, _backend),
        "env": {
            name: os.environ.get(name)
            for name in (
                "DEBIAS_BACKEND",
                "DEBIAS_NO_JIT",
                "DEBIAS_KNN_FAST",
                "DEBIAS_NO_AVX2",
                "TRITON_INTERPRET",
                "TORCH_EXTENSIONS_DIR",
                "OMP_NUM_THREADS",
            )
        },
    }


@contextlib.contextmanager
def _env(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _triton() -> dict[str, Any]:
    """Triton's version without importing it (a second), and whether it runs interpreted."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"version": version, "interpreter": os.environ.get("TRITON_INTERPRET", "") == "1"}


def _cuda(torch) -> dict[str, Any]:
    """The GPUs torch sees, and nvcc (which builds the CUDA kernels ahead of time)."""
    nvcc = shutil.which("nvcc")
    nvcc_version = None
    if nvcc:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20)
            nvcc_version = (out.stdout.strip().splitlines() or [None])[-1]
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                }
            )
    return {
        "available": bool(devices),
        "torch_cuda": torch.version.cuda,
        "devices": devices,
        "nvcc": nvcc,
        "nvcc_version": nvcc_version,
    }


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _cpu(torch, _backend) -> dict[str, Any]:
    flags = _cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if flags is None:  # no /proc/cpuinfo: what torch's own dispatch found
        avx2 = capability in ("AVX2", "AVX512")
        features = {name: (avx2 if name in ("avx2", "fma") else None) for name in _CPU_FLAGS}
    else:
        features = {name: name in flags for name in _CPU_FLAGS}
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    vnni = bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
    forced_portable = os.environ.get("DEBIAS_NO_AVX2", "") not in ("", "0")
    wide = bool(features["avx2"]) and not forced_portable
    why_portable = "DEBIAS_NO_AVX2 set" if forced_portable else "no AVX2"
    return {
        "model": cpu_model(),
        "cores": os.cpu_count(),
        "features": features,
        "torch_capability": capability,
        "torch_amx_tile": amx,
        "torch_vnni": vnni,
        # Each kernel checks once per process and keeps its choice (csrc/*.cpp).
        "kernel_paths": {
            "noise_loss normal generator": (
                "avx2+fma" if wide and features["fma"] else f"portable ({why_portable})"
            ),
            "knn scan": "avx2" if wide else f"portable ({why_portable})",
        },
        "knn_fast_pass": _knn_fast_pass(amx or vnni),
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _knn_fast_pass(int8_units: bool) -> dict[str, Any]:
    """Which fast pass debias.knn takes on the cpu backend, as debias.ops.knn reports it."""
    from debias.ops import knn

    return knn.fast_pass_report(int8_units)


def _ops(torch, _backend) -> dict[str, Any]:
    """Per op and device: the backends built here (the default first) and the default with
    the reason, as ``_backend.resolve`` picks it with no ``backend=`` argument."""
    from debias.ops import knn

    report = {}
    for op in _OPS:
        report[op] = {}
        for name in _DEVICES:
            device = torch.device(name)
            supported = knn.supported_backends(device) if op == "knn" else _backend.BACKENDS
            built = [b for b in _backend.available(device) if b in supported]
            entry = {"backends": built, "device_present": _present(torch, name)}
            try:
                entry["default"] = _backend.resolve(None, device, supported)
                entry["why"] = _why(entry["default"], name, op, built, supported, _backend)
            except ValueError as err:  # DEBIAS_BACKEND names a backend that cannot run here
                entry["default"], entry["why"] = None, str(err)
            report[op][name] = entry
    return report


def _present(torch, device: str) -> bool:
    return device == "cpu" or torch.cuda.is_available()


def _why(default: str, device: str, op: str, built, supported, _backend) -> str:
    forced = os.environ.get("DEBIAS_BACKEND") or None
    if forced == default and forced in supported:
        return f"DEBIAS_BACKEND={forced}"
    ext = _backend.extension()
    if device == "cpu":
        if default == "cpu":
            how = {"aot": "built at install time", "jit": "compiled on first use"}[ext["kind"]]
            against = ext["built_against"]
            against = f"torch {against}" if against else "an unrecorded torch (an older build)"
            return f"the C++ kernels are loaded ({how}, against {against})"
        if ext["kind"] is None:
            return f"no C++ kernels: {ext['reason']}"
        return f"the C++ kernels have no {op} kernel"
    if default == "cuda":
        return "the CUDA kernels are built; Triton is not installed"
    if default == "triton":
        if "cuda" in built:
            return (
                "Triton leads the built CUDA kernels until a committed GPU benchmark row shows "
                "cuda faster (debias/ops/_backend.py, GPU_PREFERENCE)"
            )
        if ext["kind"] == "jit":
            return "Triton is installed; the build on first use has no CUDA kernels"
        return "Triton is installed; the C++ extension has no CUDA kernels"
    return "neither the CUDA kernels nor Triton are available"


def format_report(report: dict[str, Any]) -> str:
    """The report as text, one fact a line."""
    ext, cpu, gpu = report["extension"], report["cpu"], report["cuda"]
    lines = [
        f"debias {report['debias']['version']} ({report['debias']['path']})",
        f"python {report['python']['version']}, {report['platform']}",
        f"torch {report['torch']['version']} (CUDA {report['torch']['cuda']}, "
        f"{report['torch']['threads']} threads, CPU capability "
        f"{report['torch']['cpu_capability']})",
        f"triton {report['triton']['version']}"
        + (" (interpreter: TRITON_INTERPRET=1)" if report["triton"]["interpreter"] else ""),
        "",
        "C++ kernels:",
    ]
    if ext["kind"] is None:
        lines.append(f"  none: {ext['reason']}")
    else:
        how = {"aot": "built ahead of time", "jit": "compiled just in time"}[ext["kind"]]
        against = ext["built_against"] or "unknown (built before the record existed)"
        lines += [f"  {how}, against torch {against}", f"  {ext['path']}"]
        if ext["reason"]:
            lines.append(f"  (the ahead-of-time build is not used: {ext['reason']})")
    if ext["jit_cache"] is None:
        lines.append("  just-in-time build: impossible, no C++ sources in this installation")
    else:
        cached = "present" if ext["jit_cached"] else "empty"
        lines.append(f"  just-in-time cache: {ext['jit_cache']} ({cached})")
    if ext["no_jit"]:
        lines.append("  DEBIAS_NO_JIT is set: nothing is compiled on first use")
    flags = ", ".join(
        f"{k} {'yes' if v else 'no' if v is not None else '?'}" for k, v in cpu["features"].items()
    )
    lines += [
        "",
        f"CPU: {cpu['model']} ({cpu['cores']} cores)",
        f"  features: {flags}",
        f"  torch: capability {cpu['torch_capability']}, AMX tiles "
        f"{'yes' if cpu['torch_amx_tile'] else 'no'}, VNNI {'yes' if cpu['torch_vnni'] else 'no'}",
    ]
    lines += [f"  {k}: {v}" for k, v in cpu["kernel_paths"].items()]
    fast = dict(cpu["knn_fast_pass"])
    lines.append(f"  knn fast pass (DEBIAS_KNN_FAST={fast.pop('setting')}):")
    why = fast.pop("why", None) or fast.pop("error", None)
    lines += [f"    {k}: {v}" for k, v in fast.items()]
    if why:
        lines.append(f"    ({why})")
    lines += ["", "GPU:"]
    if gpu["devices"]:
        lines += [
            f"  cuda:{i} {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)"
            for i, d in enumerate(gpu["devices"])
        ]
    else:
        lines.append("  none visible to torch")
    lines.append(f"  nvcc: {gpu['nvcc_version'] or gpu['nvcc'] or 'not found'}")
    lines += ["", "Ops (default first; DEBIAS_BACKEND or backend= forces one):"]
    for op, devices in report["ops"].items():
        for device, entry in devices.items():
            note = "" if entry["device_present"] else " [no such device here]"
            lines.append(
                f"  {op:<10} {device:<4} -> {entry['default']}  "
                f"(built: {', '.join(entry['backends'])}){note}"
            )
            lines.append(f"  {'':<15} {entry['why']}")
    set_env = {k: v for k, v in report["env"].items() if v is not None}
    if set_env:
        lines += ["", "Environment: " + ", ".join(f"{k}={v}" for k, v in set_env.items())]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `debias info` / `python -m debias.info`."""
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--no-build",
        action="store_true",
        help="do not compile the C++ kernels if this torch has none yet; report what is there",
    )


def run(args: argparse.Namespace) -> int:
    """Prints the report for parsed ``args`` (see ``add_arguments``)."""
    report = collect(build=not args.no_build)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m debias.info",
        description="Versions, compiled kernels, CPU features, backends and GPU of this "
        "installation of debias (for bug reports: --json).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
