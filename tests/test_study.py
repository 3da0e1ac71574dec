"""`debias study`: tiny grids end to end, resume (between cells and from a cell's checkpoint),
determinism, the Student t interval, and argument errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest

from debias.pipeline import study
from debias.pipeline import train as train_module
from debias.pipeline.study import mean_interval, plan, run_study

# Cells that train in a second or two on one thread: a one-level UNet, 100 timesteps.
TINY = dict(
    base_channels=8,
    channel_mult=[1],
    attention_resolutions=[],
    num_timesteps=100,
    steps=20,
    batch_size=8,
    warmup=2,
    eval_every=10,
    eval_size=16,
    log_every=10,
    checkpoint_every=10,
)
WEIGHTING = dict(
    weightings=["constant", "debias"],
    variances=["fixed"],
    methods=["ddim"],
    sample_steps=[5],
    n_samples=48,
    timestep_images=32,
    timesteps=4,
    feature_steps=20,
)
DEPTH = dict(datasets=["gmm"], depths=[1, 2], n_samples=48, sample_steps=5, feature_steps=20)
BIASED = dict(memorize_size=4, train=dict(monitor_every=10, monitor_samples=16, sample_steps=5))


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, name="debias-weighting", options=WEIGHTING, **kwargs):
    kwargs.setdefault("seeds", 2)
    return run_study(
        name, tmp_path, quick=True, options=options, overrides=TINY, progress=False, **kwargs
    )


def _without_files(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "files"}


# ---- the interval -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values", [[1.0, 2.0], [0.3, 0.1, 0.7], [5.0, 5.5, 4.0, 6.2, 5.1]], ids=["n2", "n3", "n5"]
)
def test_mean_interval_is_the_student_t_interval(values):
    scipy_stats = pytest.importorskip("scipy.stats")
    n = len(values)
    mean = sum(values) / n
    sem = scipy_stats.sem(values)
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
    got = mean_interval(values)
    assert got["n"] == n and got["level"] == 0.95
    assert got["mean"] == pytest.approx(mean, rel=1e-12)
    assert got["std"] == pytest.approx(sem * math.sqrt(n), rel=1e-12)
    assert got["ci_low"] == pytest.approx(low, rel=1e-12)
    assert got["ci_high"] == pytest.approx(high, rel=1e-12)


def test_mean_interval_by_hand_and_edge_cases():
    # t_{0.975, 2} = 4.302652729749464; values 1, 2, 3: s = 1, half width 4.3027 / sqrt(3).
    got = mean_interval([1.0, None, 2.0, 3.0, float("nan")])
    assert got["n"] == 3 and got["mean"] == 2.0
    assert got["ci_high"] - 2.0 == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-12)
    one = mean_interval([0.5])
    assert one["mean"] == 0.5 and one["ci_low"] is None and one["std"] is None
    assert mean_interval([])["mean"] is None
    assert mean_interval([2.0, 2.0])["ci_low"] == 2.0
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], level=1.5)


# ---- argument errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="nope"), "name"),
        (dict(family="edm"), "family"),
        (dict(seeds=0), "seeds"),
        (dict(seeds=[1, 1]), "seeds"),
        (dict(seeds=[-1]), "seeds"),
        (dict(options={"bogus": 1}), "options"),
        (dict(options={"train": {"bogus": 1}}), "options"),
        (dict(overrides={"bogus": 1}), "overrides"),
        (dict(options={"methods": ["nope"]}), "methods"),
        (dict(options={"variances": ["random"]}), "variances"),
        (dict(options={"weightings": ["nope"]}), "weighting"),
        (dict(max_cells=-1), "max_cells"),
        (dict(name="depth-bias", options={"datasets": ["cifar"]}), "datasets"),
        (dict(name="depth-bias", options={"depths": [0]}), "depths"),
        (dict(name="depth-bias", options={"majority": 0.3}), "majority"),
        (dict(name="biased-generalization", options={"settings": ["x"]}), "settings"),
        (dict(name="biased-generalization", options={"memorize_size": 1}), "memorize_size"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, match):
    kwargs = {"name": "debias-weighting", **kwargs}
    with pytest.raises(ValueError, match=match):
        run_study(kwargs.pop("name"), tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "study-debias-weighting" / "cells").exists()


def test_flow_refuses_a_learned_variance(tmp_path):
    """A learned variance is a DDPM option: family='flow' refuses it."""
    with pytest.raises(ValueError, match="variances"):
        plan("debias-weighting", family="flow", options={"variances": ["learned"]})
    cells = plan("debias-weighting", family="flow", seeds=1, overrides=TINY)
    assert {c.group["variance"] for c in cells} == {"fixed"}
    assert all(c.config.family == "flow" for c in cells)


def test_plan_lists_the_grid():
    cells = plan("depth-bias", quick=True, seeds=3)
    assert len(cells) == 2 * 3 * 3  # datasets x depths x seeds
    assert len({c.key for c in cells}) == len(cells)
    digits = [c for c in cells if c.group["dataset"] == "digits-3-8"]
    assert all(c.config.classes == [3, 8] and c.config.proportions == [0.9, 0.1] for c in digits)
    assert sorted({c.config.num_res_blocks for c in cells}) == [1, 2, 3]
    full = plan("depth-bias", seeds=3)
    assert {c.key for c in full}.isdisjoint(c.key for c in cells)  # sizes differ: other folders


# ---- end to end, resume, determinism ------------------------------------------------------


def test_weighting_study_writes_everything_and_resumes_between_cells(tmp_path):
    whole = _run(tmp_path / "whole")
    folder = tmp_path / "whole" / "study-debias-weighting"
    for name in ("study.json", "study.md", "fd_vs_steps.png", "timesteps.png", "timing.json"):
        assert (folder / name).is_file(), name
    assert whole["status"] == "complete" and whole["cells_done"] == 4
    assert json.loads((folder / "study.json").read_text()) == whole
    group = whole["aggregates"]["variance=fixed,weighting=debias"]
    assert group["ddim/5/fd"]["n"] == 2 and group["ddim/5/fd"]["ci_low"] is not None
    assert {"ddim/5/precision", "ddim/5/channel_shift", "timesteps/99/x0_mse"} <= set(group)
    md = (folder / "study.md").read_text()
    assert "## What it showed" in md and "debias" in md
    assert any("FD at 5 ddim steps" in f for f in whole["findings"])

    # Interrupted after two cells, then rerun: the two are read, not trained again.
    cut = tmp_path / "cut"
    first = _run(cut, max_cells=2)
    assert first["status"] == "incomplete" and first["cells_done"] == 2
    results = sorted((cut / "study-debias-weighting" / "cells").glob("*/result.json"))
    assert len(results) == 2
    stamps = {p: p.stat().st_mtime_ns for p in results}
    trained = []
    final = _run(cut, on_cell=lambda cell, result: trained.append(cell.key))
    assert len(trained) == 2 and not {p.parent.name for p in results} & set(trained)
    assert {p: p.stat().st_mtime_ns for p in results} == stamps
    # Same numbers as the uninterrupted study (determinism across folders, too).
    assert _without_files(final) == _without_files(whole)
    again = []
    _run(cut, on_cell=lambda cell, result: again.append(cell.key))
    assert again == []


def test_a_cell_resumes_from_its_checkpoint_or_restarts_cleanly(tmp_path, monkeypatch):
    options = {**DEPTH, "depths": [1]}
    fresh = _run(tmp_path / "fresh", name="depth-bias", options=options, seeds=1)
    (cell,) = plan("depth-bias", quick=True, seeds=1, options=options, overrides=TINY)
    calls = []
    real_train = train_module.train

    def spy(config, run_dir, **kwargs):
        calls.append(kwargs.get("resume", False))
        return real_train(config, run_dir, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    # Half trained (a checkpoint at step 10 of 20), as a killed study leaves it.
    part = tmp_path / "part"
    run_dir = part / "study-depth-bias" / "cells" / cell.key / "run"
    real_train(dataclasses.replace(cell.config, steps=10), run_dir, progress=False)
    resumed = _run(part, name="depth-bias", options=options, seeds=1)
    assert calls == [True]
    assert resumed["cells"][0]["metrics"] == fresh["cells"][0]["metrics"]
    assert _without_files(resumed) == _without_files(fresh)

    # A broken checkpoint: the cell starts again from nothing and gets the same numbers.
    broken = tmp_path / "broken"
    run_dir = broken / "study-depth-bias" / "cells" / cell.key / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.safetensors").write_bytes(b"not a checkpoint")
    calls.clear()
    again = _run(broken, name="depth-bias", options=options, seeds=1)
    assert calls == [True, False]
    assert again["cells"][0]["metrics"] == fresh["cells"][0]["metrics"]


def test_a_cell_trained_twice_gives_the_same_numbers(tmp_path):
    options = {**WEIGHTING, "weightings": ["debias"]}
    a = _run(tmp_path / "a", options=options, seeds=1)["cells"][0]
    b = _run(tmp_path / "b", options=options, seeds=1)["cells"][0]
    assert a["metrics"] == b["metrics"] and a["extra"] == b["extra"]
    assert all(v is None or math.isfinite(v) for v in a["metrics"].values())


def test_learned_variance_with_every_default_sampler(tmp_path):
    options = {**WEIGHTING, "weightings": ["debias"], "variances": ["learned"], "methods": None}
    report = run_study(
        "debias-weighting",
        tmp_path,
        quick=True,
        seeds=1,
        options=options,
        overrides={**TINY, "eval_every": 0},
        progress=False,
    )
    (cell,) = report["cells"]
    assert cell["config"]["learn_sigma"] is True
    methods = report["options"]["methods"]
    assert methods == ["ddpm", "ddim", "dpm++2m"]
    for method in methods:
        assert math.isfinite(cell["metrics"][f"{method}/5/fd"])
    assert any(k.startswith("timesteps/") for k in cell["metrics"])


def test_flow_weighting_study_runs(tmp_path):
    options = {**WEIGHTING, "weightings": ["constant", "debias"], "methods": None}
    report = run_study(
        "debias-weighting",
        tmp_path,
        quick=True,
        seeds=1,
        family="flow",
        options=options,
        overrides=TINY,
        progress=False,
    )
    assert (tmp_path / "study-debias-weighting-flow" / "fd_vs_steps.png").is_file()
    assert report["options"]["variances"] == ["fixed"]
    assert report["options"]["methods"] == ["euler", "heun"]
    assert all(c["config"]["family"] == "flow" for c in report["cells"])
    assert any("lowest SNR" in f for f in report["findings"])


def test_depth_bias_study_end_to_end(tmp_path):
    report = _run(tmp_path, name="depth-bias", options=DEPTH)
    folder = tmp_path / "study-depth-bias"
    assert (folder / "majority_share.png").is_file() and (folder / "study.md").is_file()
    group = report["aggregates"]["dataset=gmm,depth=2"]
    assert group["data_majority_share"]["mean"] == pytest.approx(0.9, abs=0.01)
    assert 0.0 <= group["majority_share"]["mean"] <= 1.0
    assert {"gu_memorized_fraction", "nn_distance_median", "fd"} <= set(group)
    assert any("gmm, depth 1" in f for f in report["findings"])
    cell = next(iter((folder / "cells").iterdir()))
    assert (cell / "samples.png").is_file()


def test_biased_generalization_study_end_to_end(tmp_path):
    report = _run(tmp_path, name="biased-generalization", options=BIASED)
    folder = tmp_path / "study-biased-generalization"
    assert (folder / "curves.png").is_file()
    assert report["cells_done"] == 4
    for cell in report["cells"]:
        curves = cell["extra"]["curves"]
        assert curves["step"] == [10, 20]
        assert all(v is not None for v in curves["paired_distance_median"])
        assert cell["metrics"]["best_step"] in (10, 20)
        assert set(cell["extra"]["held_out"]) == {"a", "b"}
    memorize = [c for c in report["cells"] if c["group"]["setting"] == "memorize"]
    assert all(c["config"]["train_size"] == 4 and c["config"]["two_models"] for c in memorize)
    assert any(f.startswith("halves:") for f in report["findings"])


def test_command_line_arguments(tmp_path):
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(
        [
            "depth-bias",
            "--quick",
            "--seeds",
            "2",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--max-cells",
            "0",
        ]
    )
    assert args.name == "depth-bias" and args.quick and args.seeds == 2
    assert study.run(args) == 3  # nothing trained: incomplete
    assert (tmp_path / "study-depth-bias" / "study.json").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["nope"])


# ---- the real quick size ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", study.STUDIES)
def test_quick_study_runs(tmp_path, name):
    report = run_study(name, tmp_path, quick=True, progress=False)
    assert report["status"] == "complete" and not report["failed"]
    assert report["findings"]
