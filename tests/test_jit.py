"""The C++ kernels on every install path (debias/_build.py, debias/ops/_backend.py): the record
of the torch a library was built against, the choice between the ahead-of-time build and the
build on first use, the lock that keeps concurrent processes from building twice, and a plain
`pip install .` into a fresh environment that ends up on the `cpu` backend."""

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from debias import _build

ROOT = Path(__file__).resolve().parents[1]
# A library this test suite builds: another torch's record, as a stand-in for debias._C.
_OTHER_TORCH = "1.0.0"


def _python(code: str, env: dict | None = None, cwd: Path | None = None, exe=sys.executable):
    out = subprocess.run(
        [str(exe), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=1800,
    )
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out


# ---- the record and the one list of sources -----------------------------------------------


def test_stamp_round_trip(tmp_path):
    source = _build.write_stamp(tmp_path, "2.13.0+cpu")
    text = Path(source).read_text()
    assert "2.13.0+cpu" in text and 'extern "C"' in text
    mtime = os.path.getmtime(source)
    assert _build.write_stamp(tmp_path, "2.13.0+cpu") == source
    assert os.path.getmtime(source) == mtime  # unchanged: ninja does not rebuild
    library = tmp_path / "lib.so"
    library.write_bytes(b"\x7fELF junk" + b"debias-built-against-torch=2.13.0+cpu\0" + b"more")
    assert _build.read_stamp(library) == "2.13.0+cpu"
    library.write_bytes(b"\x7fELF no record here")
    assert _build.read_stamp(library) is None
    assert _build.read_stamp(tmp_path / "missing.so") is None
    with pytest.raises(ValueError, match="version"):
        _build.write_stamp(tmp_path, 'x"; evil')


def test_build_module_needs_no_torch():
    """setup.py executes debias/_build.py by path in a build environment without torch."""
    code = f"""
    import importlib.util, sys
    sys.modules["torch"] = None  # any import of torch fails
    spec = importlib.util.spec_from_file_location("b", {str(ROOT / "debias" / "_build.py")!r})
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    print(len(b.cpu_sources(b.source_dir())), " ".join(b.CXX_FLAGS))
    """
    out = _python(code)
    count, flags = out.stdout.split(maxsplit=1)
    assert int(count) == len(list((ROOT / "csrc").glob("*.cpp"))) and "-O3" in flags


def test_setup_without_torch_builds_pure_python():
    """With no torch in the build environment (pip's build isolation) setup.py builds no
    extension and says so; it never imports torch-dependent package code."""
    code = """
    import runpy, sys
    sys.modules["torch"] = None
    sys.argv = ["setup.py", "--name"]
    runpy.run_path("setup.py", run_name="__main__")
    """
    out = _python(code, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "debias-kernels"
    assert "pure-Python wheel" in out.stderr and "compile on first use" in out.stderr


# ---- which library loads ------------------------------------------------------------------

_DECIDE = """
import importlib, json, sys, torch
from debias import _build
from debias.ops import _backend
calls = []
def fake_jit():  # stands in for a real build: the in-tree library, never imported before
    calls.append(1)
    return importlib.import_module("debias._C"), "/jit/debias_C.so"
_build.jit_load = fake_jit
{patch}
x_t, noise = __import__("debias").add_noise(torch.randn(2, 3, 4), torch.tensor([0, 9]),
                                           __import__("debias").NoiseSchedule.linear())
print(json.dumps({{"ext": _backend.extension(), "jit_calls": len(calls),
                   "backend": noise.backend}}))
"""


def _decide(patch: str, env: dict | None = None) -> dict:
    if importlib.util.find_spec("debias._C") is None:
        pytest.skip("needs an ahead-of-time debias._C to stand in for both builds")
    out = _python(_DECIDE.format(patch=textwrap.dedent(patch)), env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_matching_aot_build_is_preferred():
    got = _decide(f"_build.read_stamp = lambda path: {torch.__version__!r}")
    assert got["ext"]["kind"] == "aot" and got["jit_calls"] == 0, got
    assert got["ext"]["built_against"] == torch.__version__ and got["backend"] == "cpu"


def test_version_mismatch_triggers_the_build():
    """A debias._C recorded for another torch is never imported (it might load and
    misbehave): the kernels are compiled for this torch instead."""
    got = _decide(f"_build.read_stamp = lambda path: {_OTHER_TORCH!r}")
    assert got["ext"]["kind"] == "jit" and got["jit_calls"] == 1, got
    assert f"built against torch {_OTHER_TORCH}" in got["ext"]["reason"]
    assert got["backend"] == "cpu"


def test_unloadable_aot_build_triggers_the_build():
    """A debias._C that fails to load (an undefined symbol of another torch)."""
    patch = """
    _real = importlib.import_module
    def _import(name, *a):
        if name == "debias._C":
            raise ImportError("debias/_C.so: undefined symbol: _ZN3c1017RegisterOperators")
        return _real(name, *a)
    _backend.importlib = type("I", (), {"import_module": staticmethod(_import),
                                        "util": importlib.util})
    _build.jit_load = lambda: (calls.append(1), (_real("debias._C"), "/jit/debias_C.so"))[1]
    """
    got = _decide(patch)
    assert got["ext"]["kind"] == "jit" and got["jit_calls"] == 1, got
    assert "undefined symbol" in got["ext"]["reason"] and got["backend"] == "cpu"


def test_no_jit_and_no_compiler_fall_back_with_a_hint():
    """DEBIAS_NO_JIT=1, or no compiler: the torch backend, and a warning saying how to get
    the kernels."""
    patch = f"_build.read_stamp = lambda path: {_OTHER_TORCH!r}"
    got = _decide(patch, env={"DEBIAS_NO_JIT": "1"})
    assert got["ext"]["kind"] is None and got["jit_calls"] == 0 and got["backend"] == "torch"
    assert "DEBIAS_NO_JIT" in got["ext"]["reason"]
    code = f"""
    import warnings, torch, debias
    from debias import _build
    _build.read_stamp = lambda path: {_OTHER_TORCH!r}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_t, noise = debias.add_noise(torch.randn(2, 3), torch.tensor([0, 9]),
                                      debias.NoiseSchedule.linear())
    assert noise.backend == "torch", noise.backend
    (message,) = [str(w.message) for w in caught if "debias._C" in str(w.message)]
    print(message)
    """
    out = _python(code, env={"CXX": "no-such-compiler-here"})
    assert "no C++ compiler" in out.stdout and "g++" in out.stdout, out.stdout


def test_failed_build_falls_back_with_the_error(tmp_path):
    """A build that fails (here: a broken source) prints the compiler's error and leaves the
    torch backend, with a warning that says so."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bindings.cpp").write_text("this is not C++;\n")
    code = f"""
    import warnings, torch, debias
    from pathlib import Path
    from debias import _build
    from debias.ops import _backend
    _build.read_stamp = lambda path: {_OTHER_TORCH!r}
    _build.source_dir = lambda: Path({str(tmp_path / "src")!r})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_t, noise = debias.add_noise(torch.randn(2, 3), torch.tensor([0, 9]),
                                      debias.NoiseSchedule.linear())
    assert noise.backend == "torch", noise.backend
    assert _backend.extension()["kind"] is None
    (message,) = [str(w.message) for w in caught if "debias._C" in str(w.message)]
    print(message)
    """
    out = _python(code, env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")})
    assert "compiling them here failed" in out.stdout and "build error" in out.stdout
    assert "compiling the C++ kernels failed" in out.stderr and "bindings.cpp" in out.stderr


# ---- the lock -----------------------------------------------------------------------------

_TINY = 'extern "C" int debias_lock_test_answer() { return 42; }\n'

_BUILDER = """
import ctypes, sys
from debias import _build
path = _build.build_and_load("debias_lock_test", [sys.argv[1]], sys.argv[2],
                             is_python_module=False)
print(ctypes.CDLL(path).debias_lock_test_answer())
"""


def test_lock_two_processes_build_once(tmp_path):
    """Two processes start while a third holds the lock: both wait, then one compiles and the
    other finds the library built; both load it. A tiny stand-in source keeps this fast."""
    source = tmp_path / "tiny.cpp"
    source.write_text(_TINY)
    directory = tmp_path / "cache" / "debias_lock_test"
    directory.mkdir(parents=True)
    with open(directory / "debias_build.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _BUILDER, str(source), str(directory)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        # Each says that it waits: both are blocked on the lock now.
        for p in procs:
            assert any("waiting for another process" in line for line in p.stderr), p.wait()
        fcntl.flock(held, fcntl.LOCK_UN)
    results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    for (out, err), code in results:
        assert code == 0, err
        assert out.strip() == "42"
    compiled = [err for (_, err), _ in results if "compiling" in err]
    assert len(compiled) == 1, [err for (_, err), _ in results]
    assert "done in" in compiled[0]


def test_lock_survives_a_killed_build(tmp_path):
    """A build killed mid-way leaves torch's own lock file; the next build is not stuck."""
    source = tmp_path / "tiny.cpp"
    source.write_text(_TINY)
    directory = tmp_path / "debias_lock_test"
    directory.mkdir()
    (directory / "lock").write_text("")  # what torch's FileBaton leaves behind
    out = subprocess.run(
        [sys.executable, "-c", _BUILDER, str(source), str(directory)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr


# ---- a fresh environment ------------------------------------------------------------------

_RUN_OP = """
import json, torch, debias
from debias.ops import _backend
x0 = torch.randn(4, 3, 8, 8)
t = torch.tensor([0, 10, 500, 999])
s = debias.NoiseSchedule.linear()
x_t, noise = debias.add_noise(x0, t, s)
pred = torch.randn_like(x0, requires_grad=True)
debias.fused_loss(pred, noise, t, s).backward()
ref = debias.add_noise(x0, t, s, noise=noise.materialize(), backend="torch")[0]
torch.testing.assert_close(x_t, ref)
print(json.dumps({"backend": noise.backend, "ext": _backend.extension(),
                  "file": debias.__file__}))
"""


def _copy_source(dest: Path) -> Path:
    """The source tree as an sdist would hold it: no built libraries, no build folders."""
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("debias", "triton_kernels", "csrc"):
        shutil.copytree(
            ROOT / name, dest / name, ignore=shutil.ignore_patterns("*.so", "__pycache__")
        )
    return dest


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    """A new virtual environment with torch (the one installed here) and numpy, then a plain
    `pip install .` (build isolation, so no torch in the build environment), and its own
    extension cache."""
    base = tmp_path_factory.mktemp("fresh")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
    exe = venv / "bin" / "python"
    pip = [str(exe), "-m", "pip", "install", "-q"]
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    subprocess.run([*pip, torch_pin, "numpy"], check=True, timeout=1800)
    src = _copy_source(base / "src")
    # -v shows the build backend's output, where setup.py says what it built.
    plain = [str(exe), "-m", "pip", "install", "-v", str(src)]
    out = subprocess.run(plain, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "pure-Python wheel" in out.stdout + out.stderr
    site = Path(
        subprocess.check_output(
            [str(exe), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    env = {"TORCH_EXTENSIONS_DIR": str(base / "cache"), "PYTHONPATH": "", "DEBIAS_BACKEND": ""}
    return {"exe": exe, "site": site, "env": env, "cwd": base, "src": src}


def _run_op(fresh_env) -> tuple[dict, str]:
    out = _python(_RUN_OP, env=fresh_env["env"], cwd=fresh_env["cwd"], exe=fresh_env["exe"])
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.slow
def test_plain_pip_install_runs_cpu_kernels(fresh_env):
    """`pip install .` with build isolation: a wheel without the extension; the first call
    compiles the kernels (one line with the time), later processes reuse them."""
    site = fresh_env["site"]
    assert not list((site / "debias").glob("_C*.so"))
    assert (site / "debias" / "csrc" / "bindings.cpp").is_file()
    got, err = _run_op(fresh_env)
    assert got["file"].startswith(str(site)), got["file"]
    assert got["backend"] == "cpu" and got["ext"]["kind"] == "jit", (got, err)
    assert got["ext"]["built_against"] == torch.__version__
    (line,) = [x for x in err.splitlines() if "compiling" in x]
    assert "done in" in line
    again, err = _run_op(fresh_env)
    assert again["backend"] == "cpu" and "compiling" not in err, err


@pytest.mark.slow
def test_fresh_env_mismatched_or_broken_library(fresh_env):
    """A debias._C recorded for another torch, or one that does not load, in the installed
    package: the kernels of the build on first use run instead (the cache from the test
    above, so nothing compiles)."""
    fake = fresh_env["site"] / "debias" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    try:
        fake.write_bytes(
            b"\x7fELF" + b"debias-built-against-torch=" + _OTHER_TORCH.encode() + b"\0"
        )
        got, _ = _run_op(fresh_env)
        assert got["backend"] == "cpu" and got["ext"]["kind"] == "jit", got
        assert f"built against torch {_OTHER_TORCH}" in got["ext"]["reason"]
        fake.write_bytes(b"not a library at all")
        got, _ = _run_op(fresh_env)
        assert got["backend"] == "cpu" and got["ext"]["kind"] == "jit", got
        assert "does not load" in got["ext"]["reason"]
    finally:
        fake.unlink(missing_ok=True)
    out = _python(
        "import sys; from debias.info import main; sys.exit(main(['--json']))",
        env=fresh_env["env"],
        cwd=fresh_env["cwd"],
        exe=fresh_env["exe"],
    )
    report = json.loads(out.stdout)
    assert report["extension"]["kind"] == "jit" and report["ops"]["add_noise"]["cpu"]["default"]
    assert report["ops"]["add_noise"]["cpu"]["default"] == "cpu"


@pytest.mark.slow
def test_aot_build_records_its_torch(fresh_env):
    """`pip install --no-build-isolation .` builds debias._C ahead of time with the record of
    its torch; it is then preferred over the cached build on first use."""
    exe = fresh_env["exe"]
    pip = [str(exe), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "setuptools>=70.1", "ninja"], check=True, timeout=1800)
    aot = [*pip, "--no-build-isolation", "--no-deps", str(fresh_env["src"])]
    out = subprocess.run(aot, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    (library,) = (fresh_env["site"] / "debias").glob("_C*.so")
    assert _build.read_stamp(library) == torch.__version__
    got, err = _run_op(fresh_env)
    assert got["ext"]["kind"] == "aot" and got["backend"] == "cpu", (got, err)
    assert got["ext"]["built_against"] == torch.__version__
