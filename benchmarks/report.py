"""Turn bench_noise_loss.py's ``--benchmark-json`` output into a CSV and a Markdown table.

    python benchmarks/report.py bench.json [--out-dir benchmarks/results]

Writes ``noise_loss_<device>.csv`` (one row per case and provider) and ``noise_loss_<device>.md``
(one line per case, providers side by side), and prints the Markdown. A provider whose
correctness check did not pass is left out: no speed-up is reported for a wrong answer.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CHECKED = ("passed", "reference")  # what the bench writes in extra_info["check"]
BUSY = 0.05  # share of CPU time used by other processes above which a result is flagged
COLUMNS = (
    "device", "threads", "malloc", "torch", "triton", "git_sha", "date", "shape", "dtype",
    "provider", "median_ms", "q20_ms", "q80_ms", "rounds", "elements_per_s", "gb_per_s",
    "copy_gb_per_s", "copy_fraction", "vs_eager", "vs_compile", "peak_mem_mib", "other_cpu",
)  # fmt: skip


def slug(name: str) -> str:
    """``"AMD EPYC 7B13"`` -> ``"amd-epyc-7b13"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_sha(commit: dict[str, Any]) -> str:
    """Short sha of the benchmarked tree; "-dirty" when it had uncommitted changes."""
    sha = (commit.get("id") or "")[:7]
    return f"{sha}-dirty" if sha and commit.get("dirty") else sha


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per benchmark that passed its check, in the order the suite ran them."""
    sha = git_sha(data.get("commit_info") or {})
    date = data.get("datetime", "")[:19].replace("T", " ")
    out = []
    for bench in data["benchmarks"]:
        info, stats = bench["extra_info"], bench["stats"]
        if info.get("check") not in CHECKED:
            print(f"not reported: {bench['name']} (check: {info.get('check')})", file=sys.stderr)
            continue
        median = stats["median"]
        gbps = info["bytes"] / median / 1e9
        out.append(
            {
                "device": info["device"],
                "threads": info["threads"],
                "malloc": info.get("malloc", ""),
                "torch": info["torch"],
                "triton": info["triton"],
                "git_sha": sha,
                "date": date,
                "shape": info["shape"],
                "dtype": info["dtype"],
                "provider": info["provider"],
                "median_ms": median * 1e3,
                "q20_ms": info["q20_s"] * 1e3,
                "q80_ms": info["q80_s"] * 1e3,
                "rounds": stats["rounds"],
                "elements_per_s": round(info["numel"] / median),
                "gb_per_s": gbps,
                "copy_gb_per_s": info["copy_gbps"],
                "copy_fraction": gbps / info["copy_gbps"],
                "peak_mem_mib": info["peak_mem_bytes"] / 2**20,
                "other_cpu": info.get("other_cpu"),
            }
        )
    # Ratios are times: a baseline's median over this provider's, same case (>1 is faster).
    medians = {(r["dtype"], r["shape"], r["provider"]): r["median_ms"] for r in out}
    for r in out:
        for base in ("eager", "compile"):
            ref = medians.get((r["dtype"], r["shape"], base))
            r[f"vs_{base}"] = ref / r["median_ms"] if ref else None
    return out


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else value


def write_csv(table: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in table:
            writer.writerow({k: _fmt(r[k]) for k in COLUMNS})


def _ratio(value: float | None, base: str) -> str | None:
    return None if value is None else f"{value:.2f}× {base}"


def markdown(table: list[dict[str, Any]], bench_command: str, report_command: str) -> str:
    """One line per case: M elements/s of each provider, with its speed-up over eager and
    compile in brackets."""
    first = table[0]
    providers = list(dict.fromkeys(r["provider"] for r in table))
    cases = list(dict.fromkeys((r["dtype"], r["shape"]) for r in table))
    by_key = {(r["dtype"], r["shape"], r["provider"]): r for r in table}
    lines = [
        f"# noise_loss on {first['device']} ({first['threads']} threads)",
        "",
        f"torch {first['torch']}"
        + (f", triton {first['triton']}" if first["triton"] else "")
        + f", git {first['git_sha'] or 'unknown'}, {first['date']} UTC;"
        + f" malloc: {first['malloc'] or 'default'};"
        + f" measured copy bandwidth {first['copy_gb_per_s']:.1f} GB/s. Produced by:",
        "",
        f"    {bench_command}",
        f"    {report_command}",
        "",
        "Million elements per second for one loss side (noising + weighted loss + backward),"
        " median; in brackets the speed-up over eager and over compile.",
        "",
        "| case | " + " | ".join(providers) + " |",
        "|---|" + "---:|" * len(providers),
    ]
    for dtype, shape in cases:
        cells = []
        for provider in providers:
            r = by_key.get((dtype, shape, provider))
            if r is None:
                cells.append("—")
                continue
            ratios = []
            if provider != "eager":
                ratios.append(_ratio(r["vs_eager"], "eager"))
            if provider not in ("eager", "compile"):
                ratios.append(_ratio(r["vs_compile"], "compile"))
            ratios = [x for x in ratios if x]
            cell = f"{r['elements_per_s'] / 1e6:.1f}"
            cells.append(cell + (f" ({', '.join(ratios)})" if ratios else ""))
        lines.append(f"| {dtype} {shape} | " + " | ".join(cells) + " |")
    busy = [r for r in table if (r["other_cpu"] or 0.0) > BUSY]
    if busy:
        worst = max(r["other_cpu"] for r in busy)
        lines += [
            "",
            f"Warning: other processes used up to {worst:.0%} of the machine's CPU time while "
            f"{len(busy)} of these {len(table)} results were timed; they are not clean.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest --benchmark-json output")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    data = json.loads(args.json.read_text())
    table = rows(data)
    if not table:
        sys.exit(f"{args.json}: no benchmark passed its check; nothing to report")
    name = f"noise_loss_{slug(table[0]['device'])}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(table, args.out_dir / f"{name}.csv")
    bench_command = data["benchmarks"][0]["extra_info"]["command"]
    text = markdown(table, bench_command, shlex.join(["python", *sys.argv]))
    (args.out_dir / f"{name}.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
