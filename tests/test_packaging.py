"""The installed distribution: its layout and its command line."""

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import debias


def _installed_files() -> list[str]:
    try:
        files = importlib.metadata.files("debias-kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("debias-kernels is not pip-installed here (running from a source tree)")
    return [str(f) for f in files or []]


def test_no_top_level_triton_kernels():
    """Triton and PyPI both own a top-level `triton_kernels`: ours lives inside debias."""
    files = _installed_files()
    assert not any(f.startswith("triton_kernels/") for f in files), files
    if any(f.startswith("debias/") for f in files):  # a regular (not editable) install
        assert any(f.startswith("debias/triton_kernels/") for f in files)


def test_public_names():
    assert set(debias.__all__) >= {"NoiseSchedule", "add_noise", "fused_loss", "loss_weight"}
    importlib.import_module("debias.triton_kernels")  # importable without triton


def test_cli_help_and_errors():
    out = subprocess.run(
        [sys.executable, "-m", "debias.pipeline.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "score" in out.stdout
    argv = ["score", "--samples", "s.npy", "--train", "t.npy", "--k", "0"]
    bad = subprocess.run(
        [sys.executable, "-m", "debias.pipeline.cli", *argv], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "k" in bad.stderr


def test_wheel_without_extensions(tmp_path):
    """DEBIAS_NO_EXTENSIONS=1 builds a pure-Python wheel; triton_kernels lands in debias/, and
    so do the C++ sources, for the build on first use."""
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for name in ("debias", "triton_kernels", "csrc"):
        shutil.copytree(
            root / name, src / name, ignore=shutil.ignore_patterns("*.so", "__pycache__")
        )
    env = dict(os.environ, DEBIAS_NO_EXTENSIONS="1")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q"]
    out = subprocess.run(
        [*cmd, "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("debias_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.endswith((".so", ".pyd")) for n in names), names
    assert "debias/triton_kernels/__init__.py" in names
    assert not any(n.startswith("triton_kernels/") for n in names)
    for name in ("bindings.cpp", "noise_loss.h", "cuda/noise_loss.cu"):
        assert f"debias/csrc/{name}" in names, names
    assert "debias/_build.py" in names


def test_readme_commands():
    """README's first screen keeps its two commands: train, and run the tests."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    install = "pip install torch==2.13.0 ninja && pip install --no-build-isolation"
    assert f'{install} ".[test]" && pytest' in readme
    assert f'{install} ".[pipeline]" && debias train' in readme
