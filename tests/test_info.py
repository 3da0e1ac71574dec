"""`python -m debias.info` / `debias info`: the report's keys, its JSON form, and that the
backend it names as the default is the one the ops run."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

import debias
from debias import info

OPS = ("add_noise", "fused_loss", "knn")


@pytest.fixture(scope="module")
def report() -> dict:
    return info.collect()


def test_keys(report):
    assert set(report) >= {"debias", "torch", "triton", "cuda", "extension", "cpu", "ops"}
    assert report["debias"]["version"] == debias.__version__
    assert report["torch"]["version"] == torch.__version__
    assert set(report["extension"]) >= {"kind", "path", "built_against", "reason", "jit_cache"}
    assert report["extension"]["kind"] in ("aot", "jit", None)
    assert set(report["cpu"]["features"]) >= {"avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"}
    assert set(report["cpu"]["kernel_paths"]) == {"noise_loss normal generator", "knn scan"}
    assert report["cpu"]["knn_fast_pass"]["setting"] in ("auto", "float32", "int8")
    assert report["cuda"]["available"] == torch.cuda.is_available()
    for op in OPS:
        for device in ("cpu", "cuda"):
            entry = report["ops"][op][device]
            assert entry["default"] == entry["backends"][0], entry
            assert "torch" in entry["backends"] and entry["why"]


def test_json_round_trip(report):
    assert json.loads(json.dumps(report)) == report


def test_text_report(report):
    text = info.format_report(report)
    assert f"torch {torch.__version__}" in text and "C++ kernels:" in text
    for op in OPS:
        assert op in text
    assert "knn fast pass" in text


def _ran_compiled(fn) -> bool:
    """Whether ``fn`` ran a kernel of the C++ extension (torch.ops.debias_C.*)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.name.startswith("debias_C::") for event in prof.events())


def test_default_is_what_the_ops_run(report):
    """The default named for the CPU is the backend each op takes with no backend= given."""
    ops = report["ops"]
    s = debias.NoiseSchedule.linear()
    x0, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 500, 999])
    _, noise = debias.add_noise(x0, t, s)
    assert noise.backend == ops["add_noise"]["cpu"]["default"]
    kernels = {"cpu": True, "torch": False}
    pred = torch.randn_like(x0)
    noise = torch.randn_like(x0)
    loss_ran = _ran_compiled(lambda: debias.fused_loss(pred, noise, t, s))
    assert loss_ran == kernels[ops["fused_loss"]["cpu"]["default"]]
    q, y = torch.randn(5, 16), torch.randn(40, 16)
    assert _ran_compiled(lambda: debias.knn(q, y, k=2)) == kernels[ops["knn"]["cpu"]["default"]]


def test_cli_hooks(capsys):
    """What `debias info` uses: add_arguments on a subparser, then run(args)."""
    parser = argparse.ArgumentParser(prog="debias")
    sub = parser.add_subparsers(dest="command", required=True)
    info.add_arguments(sub.add_parser("info"))
    args = parser.parse_args(["info", "--json"])
    assert info.run(args) == 0
    assert json.loads(capsys.readouterr().out)["torch"]["version"] == torch.__version__


def test_module_runs():
    out = subprocess.run(
        [sys.executable, "-m", "debias.info", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ops"]["add_noise"]["cpu"]["default"] in ("cpu", "torch")
    text = subprocess.run([sys.executable, "-m", "debias.info"], capture_output=True, text=True)
    assert text.returncode == 0 and "Ops (default first" in text.stdout, text.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "debias.info", "--nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2


@pytest.mark.parametrize(
    ("default", "built", "says"),
    [
        ("triton", ["triton", "cuda", "torch"], "GPU_PREFERENCE"),  # Triton leads the built CUDA
        ("cuda", ["cuda", "torch"], "Triton is not installed"),
    ],
)
def test_why_on_a_gpu(monkeypatch, default, built, says):
    """The reason given for the GPU default follows _backend.GPU_PREFERENCE: Triton first."""
    from debias.ops import _backend

    monkeypatch.delenv("DEBIAS_BACKEND", raising=False)
    assert _backend.GPU_PREFERENCE[0] == "triton"
    why = info._why(default, "cuda", "fused_loss", built, _backend.BACKENDS, _backend)
    assert says in why
