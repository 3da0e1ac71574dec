"""Shared fixtures: which backends can run here, and dtype tolerances."""

import os
import subprocess
import sys

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. The variable
# must be set before the kernels are imported (debias imports them on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A child Python (`python -c ...`, `python -m debias.info`) started from the source tree would
# put the tree's debias/ ahead of the installed package, which is the one under test (after a
# non-editable install the tree has no debias._C): children import what this process imports.
os.environ["PYTHONSAFEPATH"] = "1"

import pytest

from debias.ops import _backend

CPU = torch.device("cpu")
CPU_BACKENDS = ("torch", "cpu", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
}


def run_avx2_and_portable(script: str, tmp_path) -> tuple:
    """(what ``script`` saved with the AVX2 code, with the baseline code): the script runs in
    two child processes, DEBIAS_NO_AVX2=0 and 1, and torch.saves its results to argv[1]. The
    children run outside the source tree, whose debias/ holds no built extension when the
    package is installed rather than developed in place (as in CI)."""
    results = []
    for flag in ("0", "1"):
        path = tmp_path / f"isa_{flag}.pt"
        env = {**os.environ, "DEBIAS_NO_AVX2": flag}
        subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True, cwd=tmp_path)
        results.append(torch.load(path))
    return tuple(results)


def skip_unless_backend(backend: str, device: torch.device = CPU) -> None:
    if backend not in _backend.available(device):
        pytest.skip(f"backend {backend!r} is not built or cannot run on {device.type} here")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    skip_unless_backend(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): the pipeline's models are tiny, a
    second thread buys nothing, and on a shared 2-core machine two spinning OpenMP threads per
    process can slow a step 50x. Files of such tests set
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_indices(scheduler, timesteps) -> list[int]:
    """The table index of each timestep, as get_sigmas of diffusers' train_dreambooth_lora_
    {sd3,flux,sdxl}.py finds it (one host-synchronising lookup per sample)."""
    return [(scheduler.timesteps == t).nonzero().item() for t in timesteps]


def get_sigmas(scheduler, timesteps, n_dim=4, dtype=torch.float32):
    """Those scripts' get_sigmas (a closure over their scheduler there), on the CPU."""
    sigma = scheduler.sigmas.to(dtype=dtype)[step_indices(scheduler, timesteps)].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma
