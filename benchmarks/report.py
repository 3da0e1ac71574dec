"""Turn bench_noise_loss.py's ``--benchmark-json`` output into a CSV and a Markdown table.

    python benchmarks/report.py bench.json [more.json ...] [--out-dir benchmarks/results]

Several files are reported as one run: their results in order, the commit and date of the
first JSON. Files ending in ``.jsonl`` are the benchmarks' DEBIAS_BENCH_JSONL output (one
result a line, each with its own date and commit; gpu_run.sh reports from these).

bench_knn.py's results (extra_info ``op == "knn"``, in the same JSON or their own) go to
report_knn.py, which writes ``knn_<device>.csv/.md`` the same way; report_common.py holds
what the two share.

Writes ``noise_loss_<device>.csv`` (one row per case and provider, and per provider of the
training step; a case is family, dtype and shape: "flow bf16 4x16x64x64") and
``noise_loss_<device>.md`` (providers side by side, then one line per case and provider with
its bandwidth, memory and the performance targets), and prints the Markdown. A provider whose
correctness check did not pass is left out: no speed-up is reported for a wrong answer.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Beside this file: its directory is sys.path[0] for a script.
import report_knn
from report_common import (
    RESULTS,
    busy_warning,
    load,
    num,
    provenance,
    side_by_side,
    slug,
    timing,
    verdict,
    write_csv,
)

CHECKED = ("passed", "reference")  # what the bench writes in extra_info["check"]
# Targets for the fused GPU providers, on the cases whose fp32 tensors are at least 64 MiB
# (bandwidth-bound; smaller ones are bound by launches): a share of the measured copy
# bandwidth, and speed-ups over eager and over torch.compile.
TARGET_MIN_FP32_BYTES = 64 * 2**20
TARGET_COPY, TARGET_EAGER, TARGET_COMPILE = 0.85, 4.0, 1.3
GPU_BACKENDS = ("triton", "cuda")
# Target for the `cpu` provider (the CPU backend's default design) on every CPU case of
# every family: at least this speed-up over eager.
TARGET_CPU_EAGER = 3.0
COLUMNS = (
    "device", "device_type", "threads", "malloc", "torch", "triton", "git_sha", "date",
    "kind", "family", "shape", "dtype", "provider", "design", "model", "timer", "median_ms",
    "q20_ms", "q80_ms", "rounds", "elements_per_s", "bytes_per_step", "gb_per_s", "copy_gb_per_s",
    "copy_fraction", "vs_eager", "vs_compile", "peak_mem_mib", "targets", "loss_side_ms",
    "loss_share", "other_cpu",
)  # fmt: skip


def _targets(r: dict[str, Any]) -> str | None:
    """ "met", or "missed: ..." naming each target missed; None where no target applies."""
    if r["kind"] != "loss_side":
        return None
    if r["device_type"] == "cpu":
        if r["provider"] != "cpu":
            return None
        return verdict((("eager", r["vs_eager"], TARGET_CPU_EAGER),), "×")
    if r["device_type"] != "cuda":
        return None
    if r["backend"] not in GPU_BACKENDS or r["numel"] * 4 < TARGET_MIN_FP32_BYTES:
        return None
    return verdict(
        (
            ("copy", r["copy_fraction"], TARGET_COPY),
            ("eager", r["vs_eager"], TARGET_EAGER),
            ("compile", r["vs_compile"], TARGET_COMPILE),
        )
    )


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per benchmark that passed its check, in the order the suite ran them."""
    out = []
    for bench in data["benchmarks"]:
        info, times = bench["extra_info"], timing(bench)
        if info.get("check") not in CHECKED:
            print(f"not reported: {bench['name']} (check: {info.get('check')})", file=sys.stderr)
            continue
        sha, date = provenance(data, bench)
        # CUDA results carry their own (CUDA-event) times; on the CPU pytest-benchmark's.
        median = times["median_s"]
        kind = info.get("kind", "loss_side")
        row = {
            "device": info["device"],
            "device_type": info.get("device_type", "cpu"),
            "threads": info["threads"],
            "malloc": info.get("malloc", ""),
            "torch": info["torch"],
            "triton": info["triton"],
            "git_sha": sha,
            "date": date,
            "kind": kind,
            "family": info.get("family", "ddpm"),  # results from before flow cases: DDPM
            "shape": info["shape"],
            "dtype": info["dtype"],
            "provider": info["provider"],
            "backend": info.get("backend", ""),
            "design": info.get("design", ""),
            "default_designs": info.get("default_designs", ""),
            "model": info.get("model", ""),
            "timer": info.get("timer", "pytest-benchmark (host clock)"),
            "numel": info["numel"],
            "median_ms": median * 1e3,
            "q20_ms": times["q20_s"] * 1e3,
            "q80_ms": times["q80_s"] * 1e3,
            "rounds": times["rounds"],
            "elements_per_s": round(info["numel"] / median),
            "bytes_per_step": None,
            "gb_per_s": None,
            "copy_gb_per_s": info["copy_gbps"],
            "copy_method": info.get("copy_method", ""),
            "copy_fraction": None,
            "peak_mem_mib": info["peak_mem_bytes"] / 2**20,
            "loss_side_ms": None,
            "loss_share": None,
            "other_cpu": info.get("other_cpu"),
            "command": info["command"],
        }
        if kind == "loss_side":
            row["bytes_per_step"] = info["bytes"]
            row["gb_per_s"] = info["bytes"] / median / 1e9
            row["copy_fraction"] = row["gb_per_s"] / info["copy_gbps"]
        else:  # train_step: the network dominates; the question is the loss side's share
            row["loss_side_ms"] = info["loss_side_median_s"] * 1e3
            row["loss_share"] = info["loss_side_median_s"] / median
        out.append(row)
    # Ratios are times: a baseline's median over this provider's, same case (>1 is faster).
    medians = {(*_case(r), r["provider"]): r["median_ms"] for r in out}
    for r in out:
        for base in ("eager", "compile"):
            ref = medians.get((*_case(r), base))
            r[f"vs_{base}"] = ref / r["median_ms"] if ref else None
        r["targets"] = _targets(r)
    return out


def _case(r: dict[str, Any]) -> tuple[str, str, str, str]:
    """What makes two results the same case: kind, family, dtype, shape."""
    return r["kind"], r["family"], r["dtype"], r["shape"]


def case_label(r: dict[str, Any]) -> str:
    """``"flow bf16 4x16x64x64"``."""
    return f"{r['family']} {r['dtype']} {r['shape']}"


def _ratio(value: float | None, base: str) -> str | None:
    return None if value is None else f"{value:.2f}× {base}"


def _side_by_side(loss: list[dict[str, Any]]) -> list[str]:
    """One line per case: M elements/s of each provider, with its speed-up over eager and
    compile in brackets."""

    def ratios(r: dict[str, Any]) -> list[str]:
        bases = [b for b in ("eager", "compile") if r["provider"] not in ("eager", b)]
        return [x for x in (_ratio(r[f"vs_{b}"], b) for b in bases) if x]

    intro = (
        "Million elements per second for one loss side (noising + weighted loss + backward),"
        " median; in brackets the speed-up over eager and over compile."
    )
    return side_by_side(
        loss, case_label, intro, lambda r: f"{r['elements_per_s'] / 1e6:.1f}", ratios
    )


def _details(loss: list[dict[str, Any]]) -> list[str]:
    """One line per case and provider: time, bandwidth, memory, targets."""
    with_targets = any(r["targets"] is not None for r in loss)
    lines = [
        "Per case and provider: median time with the 20th–80th percentiles; GB/s of the bytes"
        " the fused design must move (kept gradient 6N, recompute 5N, N = numel × itemsize;"
        " eager, compile and cpu against 6N; flow, whose target reads x0, 7N in both);"
        " the share of the copy bandwidth; peak memory one step allocates.",
        "",
        "| case | provider | design | median ms (q20–q80) | GB/s | of copy | vs eager"
        " | vs compile | peak MiB |" + (" targets |" if with_targets else ""),
        "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---|" if with_targets else ""),
    ]
    for r in loss:
        cells = [
            case_label(r),
            r["provider"],
            r["design"] or "—",
            f"{r['median_ms']:.4g} ({r['q20_ms']:.4g}–{r['q80_ms']:.4g})",
            f"{r['gb_per_s']:.1f}",
            f"{r['copy_fraction']:.0%}",
            num(r["vs_eager"], ".2f", "×"),
            num(r["vs_compile"], ".2f", "×"),
            f"{r['peak_mem_mib']:.1f}",
        ]
        if with_targets:
            cells.append(r["targets"] or "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _target_summary(loss: list[dict[str, Any]]) -> list[str]:
    graded = [r for r in loss if r["targets"] is not None]
    if not graded:
        return []
    if graded[0]["device_type"] == "cpu":
        missed = [
            f"{case_label(r)} ({num(r['vs_eager'], '.2f', '×')})"
            for r in graded
            if r["targets"] != "met"
        ]
        families = ", ".join(dict.fromkeys(r["family"] for r in graded))
        return [
            f"Target, the `cpu` provider on every case ({families}): at least"
            f" {TARGET_CPU_EAGER:g}× eager. Met on {len(graded) - len(missed)} of {len(graded)}"
            + (f"; missed on {', '.join(missed)}." if missed else "."),
        ]
    shapes = ", ".join(dict.fromkeys(r["shape"] for r in graded))
    met = [f"{r['provider']} {r['dtype']} {r['shape']}" for r in graded if r["targets"] == "met"]
    return [
        f"Targets, fused GPU providers on the cases whose fp32 tensors are at least"
        f" {TARGET_MIN_FP32_BYTES >> 20} MiB ({shapes}): at least {TARGET_COPY:.0%} of the"
        f" copy bandwidth, {TARGET_EAGER:g}× eager and {TARGET_COMPILE:g}× compile."
        f" All three met on {len(met)} of {len(graded)}: {', '.join(met) or 'none'}.",
    ]


def _train_table(train: list[dict[str, Any]]) -> list[str]:
    first = train[0]
    return [
        f"## One training step, {first['dtype']} {first['shape']}",
        "",
        f"Model: {first['model']}. A step is noising, the network's forward, the loss and the"
        " whole backward, no optimizer step (gradients only, set to None before each step);"
        " the loss side is the same ops with the network's output replaced by a leaf tensor,"
        " timed the same way. Share: loss side over step, medians. eager is the loss as"
        " trainers write it today (before), the fused providers are after.",
        "",
        "| provider | design | step ms (q20–q80) | loss side ms | loss share | vs eager |"
        " peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['provider']} | {r['design'] or '—'} | {r['median_ms']:.4g}"
            f" ({r['q20_ms']:.4g}–{r['q80_ms']:.4g}) | {r['loss_side_ms']:.4g}"
            f" | {r['loss_share']:.1%} | {num(r['vs_eager'], '.2f', '×')}"
            f" | {r['peak_mem_mib']:.1f} |"
            for r in train
        ),
    ]


def markdown(table: list[dict[str, Any]], bench_command: str, report_command: str) -> str:
    first = table[0]
    loss = [r for r in table if r["kind"] == "loss_side"]
    train = [r for r in table if r["kind"] == "train_step"]
    on_gpu = first["device_type"] == "cuda"
    title = first["device"] if on_gpu else f"{first['device']} ({first['threads']} threads)"
    provenance = (
        f"torch {first['torch']}"
        + (f", triton {first['triton']}" if first["triton"] else "")
        + f", git {first['git_sha'] or 'unknown'}, {first['date']} UTC;"
        + ("" if on_gpu else f" malloc: {first['malloc'] or 'default'};")
        + f" measured copy bandwidth {first['copy_gb_per_s']:.1f} GB/s"
        + (f" ({first['copy_method']})" if first["copy_method"] else "")
        + f"; timer: {first['timer']}."
    )
    if first["default_designs"]:
        provenance += (
            f" Gradient design of each GPU backend by default: {first['default_designs']}."
        )
    lines = [
        f"# noise_loss on {title}",
        "",
        provenance + " Produced by:",
        "",
        f"    {bench_command}",
        f"    {report_command}",
        "",
    ]
    if loss:
        lines += [*_side_by_side(loss), "", *_details(loss)]
        summary = _target_summary(loss)
        if summary:
            lines += ["", *summary]
    if train:
        lines += ["", *_train_table(train)]
    lines += busy_warning(table)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "json", type=Path, nargs="+", help="pytest --benchmark-json output(s), or .jsonl files"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    data = load(args.json)
    report_command = shlex.join(["python", *sys.argv])
    # One JSON may hold both suites (`pytest benchmarks/`): knn results carry op="knn".
    by_op: dict[str, list[dict[str, Any]]] = {}
    for bench in data["benchmarks"]:
        by_op.setdefault(bench["extra_info"].get("op", "noise_loss"), []).append(bench)
    if "knn" in by_op:
        knn_data = {**data, "benchmarks": by_op["knn"]}
        print(report_knn.write(knn_data, args.out_dir, report_command), end="")
    if "noise_loss" not in by_op:
        return
    table = rows({**data, "benchmarks": by_op["noise_loss"]})
    if not table:
        names = " ".join(map(str, args.json))
        sys.exit(f"{names}: no benchmark passed its check; nothing to report")
    name = f"noise_loss_{slug(table[0]['device'])}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(table, args.out_dir / f"{name}.csv", COLUMNS)
    # one command per benchmark JSON that went into the table (gpu_run.sh runs two)
    bench_commands = "\n    ".join(dict.fromkeys(r["command"] for r in table))
    text = markdown(table, bench_commands, report_command)
    (args.out_dir / f"{name}.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
