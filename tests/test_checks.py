"""The shared argument checks (debias/checks.py) and the door of every public entry point:
bad input is a TypeError or ValueError that names the argument."""

import math

import numpy as np
import pytest
import torch

import debias
from debias import checks


@pytest.mark.parametrize(
    "kwargs, value, error, words",
    [
        (dict(low=0.0, high=1.0), 0.0, ValueError, r"x must lie in \(0, 1\]"),
        (dict(low=0.0, high=1.0, high_inclusive=False), 1.0, ValueError, r"\(0, 1\)"),
        (dict(low=-1.0, inclusive=True, high=1.0), 1.5, ValueError, r"\[-1, 1\]"),
        (dict(high=2.0), 3.0, ValueError, "x must be <= 2"),
        (dict(low=0.0), -1.0, ValueError, "x must be > 0"),
        (dict(), math.inf, ValueError, "finite"),
        (dict(), "1", TypeError, "x must be a number"),
        (dict(), True, TypeError, "x must be a number"),
    ],
)
def test_check_float_refuses(kwargs, value, error, words):
    with pytest.raises(error, match=words):
        checks.check_float("x", value, **kwargs)


def test_check_float_accepts_the_ends_it_includes():
    assert checks.check_float("x", 1, 0.0, high=1.0) == 1.0
    assert checks.check_float("x", np.float32(0.5), 0.0, high=1.0, high_inclusive=False) == 0.5
    assert checks.check_float("x", -1.0, -1.0, inclusive=True, high=1.0) == -1.0


@pytest.mark.parametrize(
    "x, kwargs, error, words",
    [
        ([1.0, 2.0], {}, TypeError, "x must be a torch.Tensor"),
        (np.zeros((2, 3), np.float32), {}, TypeError, "x must be a torch.Tensor"),
        (np.zeros((2, 3), np.int64), dict(numpy=True), TypeError, "x must hold floats"),
        (torch.zeros(2, 3, dtype=torch.int64), {}, TypeError, "x must be float32"),
        (torch.zeros(2, 3, device="meta"), {}, ValueError, "x is a meta tensor"),
        (torch.tensor(1.0), {}, ValueError, "x must be a non-empty"),
        (torch.zeros(3), {}, ValueError, "x must be a non-empty"),
        (torch.zeros(0, 3), {}, ValueError, "x must be a non-empty"),
        (torch.zeros(2, 3), dict(dim=4, layout="[N, C, H, W]"), ValueError, r"\[N, C, H, W\]"),
        (torch.tensor([[0.0, 1.0], [math.nan, 0.0]]), {}, ValueError, "x row 1 contains NaN"),
    ],
)
def test_check_samples_refuses(x, kwargs, error, words):
    with pytest.raises(error, match=words):
        checks.check_samples("x", x, **kwargs)


def test_check_samples_takes_numpy_floats_when_asked():
    out = checks.check_samples("x", np.ones((2, 3), np.float32), numpy=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)


def test_check_finite_rows_counts_from_start():
    x = torch.zeros(4, 2)
    x[2, 1] = math.inf
    with pytest.raises(ValueError, match="database row 12 contains NaN or infinity"):
        checks.check_finite_rows("database", x, start=10)


def test_noise_ops_trace_meta_tensors():
    """add_noise and fused_loss are torch.library custom ops with fake (meta) implementations
    so that torch.compile traces them: on meta tensors they return meta results of the right
    shapes instead of refusing them."""
    schedule = debias.NoiseSchedule.linear(1000)
    x0 = torch.empty(2, 3, 4, device="meta")
    t = torch.zeros(2, dtype=torch.int64, device="meta")
    x_t, _ = debias.add_noise(x0, t, schedule)
    assert x_t.is_meta and x_t.shape == x0.shape
    loss = debias.fused_loss(torch.empty(2, 3, 4, device="meta"), torch.empty_like(x0), t, schedule)
    assert loss.is_meta and loss.shape == ()


def test_check_all_reads_the_message_only_when_it_fails():
    """check_all: nothing when every element holds (the message is not even built), else a
    ValueError with the message; on a CPU tensor the test is read on the host."""
    built = []

    def message():
        built.append(True)
        return "x must be positive"

    checks.check_all(torch.tensor([True, True]), message, "x")
    checks.check_all(torch.tensor([], dtype=torch.bool), message, "x")
    assert built == []
    with pytest.raises(ValueError, match="x must be positive"):
        checks.check_all(torch.tensor([True, False]), message, "x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_check_range_refuses_exactly_the_values_outside(dtype):
    """check_range: finite and in [low, high] (low excluded with open_low) passes without
    building the message; any NaN, infinity or value out of range raises with the mask of
    exactly the failing elements."""
    seen = []

    def message(bad):
        seen.append(bad.tolist())
        return "x out of range"

    ok = torch.tensor([0.0, 0.25, 1.0], dtype=dtype)
    checks.check_range(ok, message, "x", low=0.0, high=1.0)
    checks.check_range(ok[:0], message, "x", low=1.0, open_low=True)
    checks.check_range(ok * 1e3, message, "x")  # finite, no bound
    assert seen == []
    cases = [
        ([0.5, math.nan, 0.1], dict(low=0.0), [False, True, False]),
        ([0.5, math.inf, 0.1], dict(), [False, True, False]),
        ([-math.inf, 0.5, 0.1], dict(), [True, False, False]),
        ([0.5, -0.25, 0.1], dict(low=0.0), [False, True, False]),
        ([0.5, 1.5, 1.0], dict(low=0.0, high=1.0), [False, True, False]),
        ([0.5, 0.0, 0.1], dict(low=0.0, open_low=True), [False, True, False]),
    ]
    for values, bounds, bad in cases:
        with pytest.raises(ValueError, match="x out of range"):
            checks.check_range(torch.tensor(values, dtype=dtype), message, "x", **bounds)
        assert seen.pop() == bad, (values, bounds)
