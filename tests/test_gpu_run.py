"""benchmarks/gpu_run.sh, the one command a GPU lease runs, checked where there is no GPU: it
must finish, say why each GPU part was skipped and exit 0; and report.py must turn the
benchmarks' JSONL results, which the script reports from, into the CSV every row of which
names its device, versions, commit and date."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("env", "build", "info", "tests", "loss", "loss-flow", "loss-report", "knn", "large")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs everything")
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_without_cuda_every_gpu_part_is_skipped_and_the_run_succeeds(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "DEBIAS_GPU_BUDGET": "60", "PYTHON": sys.executable}
    start = time.monotonic()
    run = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert time.monotonic() - start < 60
    summary = (tmp_path / "summary.txt").read_text()
    lines = {line.split()[0]: line for line in summary.splitlines()[2:] if line.strip()}
    assert lines["env"].split()[1] == "ok", summary
    for part in PARTS[1:]:
        assert "skipped: no CUDA device" in lines[part], summary
    # what comes back from the device: at most 8 files
    assert {p.name for p in tmp_path.iterdir()} == {"env.txt", "summary.txt", "logs.tar.gz"}


def test_report_reads_jsonl_and_drops_a_torn_last_line(tmp_path):
    info = dict(
        kind="loss_side",
        family="ddpm",
        shape="8x3x32x32",
        dtype="fp32",
        numel=24576,
        bytes=6 * 24576 * 4,
        device="NVIDIA H100 80GB HBM3",
        device_type="cuda",
        threads=16,
        torch="2.11.0+cu130",
        triton="3.6.0",
        copy_gbps=3000.0,
        peak_mem_bytes=2**20,
        command="pytest benchmarks/bench_noise_loss.py -k ddpm",
        check="passed",
        median_s=1e-5,
        q20_s=0.9e-5,
        q80_s=1.1e-5,
        rounds=200,
    )
    lines = [
        json.dumps(
            dict(
                name=f"test_noise_loss[ddpm-fp32-8x3x32x32-{provider}]",
                date="2026-12-06T20:00:00+00:00",
                git_sha="abc1234",
                extra_info={**info, "provider": provider, "backend": backend},
                stats={},
            )
        )
        for provider, backend in (("eager", ""), ("triton", "triton"))
    ]
    path = tmp_path / "noise_loss.jsonl"
    path.write_text("\n".join(lines) + '\n{"name": "cut off by a kil')
    # report.py imports its neighbours from its own folder, which PYTHONSAFEPATH (set by
    # conftest) would take off sys.path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    run = subprocess.run(
        [sys.executable, "benchmarks/report.py", str(path), "--out-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    with (tmp_path / "noise_loss_nvidia-h100-80gb-hbm3.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["eager", "triton"]
    for r in rows:
        assert r["device"] == "NVIDIA H100 80GB HBM3"
        assert (r["torch"], r["triton"]) == ("2.11.0+cu130", "3.6.0")
        assert (r["git_sha"], r["date"]) == ("abc1234", "2026-12-06 20:00:00")
    assert (tmp_path / "noise_loss_nvidia-h100-80gb-hbm3.md").is_file()
