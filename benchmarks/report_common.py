"""What report.py (noise_loss) and report_knn.py (knn) share: provenance, verdicts on targets,
cell formatting, the CSV writer and the busy-machine warning. Both import this module and
nothing of each other; report.py is the command that sends each result to its op's report."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BUSY = 0.05  # share of CPU time used by other processes above which a result is flagged


def slug(name: str) -> str:
    """``"AMD EPYC 7B13"`` -> ``"amd-epyc-7b13"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def load(paths: Sequence[Path]) -> dict[str, Any]:
    """One run from pytest's ``--benchmark-json`` files and the benchmarks' DEBIAS_BENCH_JSONL
    files (``.jsonl``, one result a line; a torn last line, left by a run killed mid-write, is
    dropped): their results in order, the commit and date of the first JSON."""
    first: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    for path in paths:
        if path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                try:
                    results.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        else:
            data = json.loads(path.read_text())
            results += data["benchmarks"]
            first = first or data
    return {**first, "benchmarks": results}


def provenance(data: dict[str, Any], bench: dict[str, Any]) -> tuple[str, str]:
    """(git sha, "YYYY-MM-DD HH:MM:SS" UTC) of one result: its own (a JSONL line's), else its
    file's (--benchmark-json's commit_info and datetime)."""
    sha = bench.get("git_sha") or git_sha(data.get("commit_info") or {})
    date = bench.get("date") or data.get("datetime", "")
    return sha, date[:19].replace("T", " ")


def timing(bench: dict[str, Any]) -> dict[str, Any]:
    """median_s, q20_s, q80_s and rounds of one result: the benchmark's own, in extra_info
    (CUDA events, the CPU quantiles, the stand-in for a missing pytest-benchmark), else
    pytest-benchmark's stats (min and max standing in for the quantiles)."""
    info, stats = bench["extra_info"], bench.get("stats") or {}
    theirs = dict(median_s="median", q20_s="min", q80_s="max", rounds="rounds")
    return {key: info[key] if key in info else stats[theirs[key]] for key in theirs}


def git_sha(commit: dict[str, Any]) -> str:
    """Short sha of the benchmarked tree; "-dirty" when it had uncommitted changes. Where
    pytest-benchmark found no git (a copy of the tree without .git: id "unversioned"),
    DEBIAS_GIT_SHA."""
    sha = commit.get("id") or ""
    if sha in ("", "unversioned"):
        return os.environ.get("DEBIAS_GIT_SHA", "")
    sha = sha[:7]
    return f"{sha}-dirty" if commit.get("dirty") else sha


def verdict(checks: Any, unit: str = "") -> str:
    """ "met", or "missed: ..." naming each (name, measured, goal) whose measurement is
    missing or below its goal."""
    missed = []
    for name, value, goal in checks:
        if value is None:
            missed.append(f"{name} not measured")
        elif value < goal:
            missed.append(f"{name} {value:.2f}{unit} < {goal:g}{unit}")
    return "missed: " + "; ".join(missed) if missed else "met"


def fmt(value: Any) -> Any:
    """A CSV cell: floats to 4 significant digits, None as empty."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else value


def num(value: float | None, spec: str, suffix: str = "") -> str:
    """A Markdown cell: ``value`` in ``spec`` with ``suffix``, or a dash where unmeasured."""
    return "—" if value is None or value == "" else f"{value:{spec}}{suffix}"


def write_csv(table: list[dict[str, Any]], path: Path, columns: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in table:
            writer.writerow({k: fmt(r[k]) for k in columns})


def busy_warning(table: list[dict[str, Any]]) -> list[str]:
    """Markdown lines warning that other processes used the machine while results were
    timed (none when the machine was quiet)."""
    busy = [r for r in table if (r["other_cpu"] or 0.0) > BUSY]
    if not busy:
        return []
    worst = max(r["other_cpu"] for r in busy)
    return [
        "",
        f"Warning: other processes used up to {worst:.0%} of the machine's CPU time while "
        f"{len(busy)} of these {len(table)} results were timed; they are not clean.",
    ]


def side_by_side(
    table: list[dict[str, Any]],
    case_of: Callable[[dict[str, Any]], str],
    intro: str,
    value: Callable[[dict[str, Any]], str],
    ratios: Callable[[dict[str, Any]], list[str]],
) -> list[str]:
    """A Markdown table, one line per case and one column per provider (in the order they
    first appear): ``value(r)`` with ``ratios(r)`` in brackets, a dash where a provider has no
    result for the case; ``intro`` above it."""
    providers = list(dict.fromkeys(r["provider"] for r in table))
    by_key = {(case_of(r), r["provider"]): r for r in table}
    lines = [
        intro,
        "",
        "| case | " + " | ".join(providers) + " |",
        "|---|" + "---:|" * len(providers),
    ]
    for case in dict.fromkeys(case_of(r) for r in table):
        cells = []
        for provider in providers:
            r = by_key.get((case, provider))
            if r is None:
                cells.append("—")
                continue
            shown = ratios(r)
            cells.append(value(r) + (f" ({', '.join(shown)})" if shown else ""))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines
