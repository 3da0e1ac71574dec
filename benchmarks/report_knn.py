"""The knn part of benchmarks/report.py: bench_knn.py's results as ``knn_<device>.csv`` (one
row per case and provider) and ``knn_<device>.md`` (providers side by side, then the details
and the targets). report.py sends the results whose extra_info says ``op == "knn"`` here:

    python benchmarks/report.py knn.json [--out-dir benchmarks/results]

Only providers that passed their check are in the JSON at all: a debias provider whose indices
differ from the float64 brute force fails its test before it is timed. cdist+topk and faiss
are reported with their agreement, whatever it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from report_common import (
    busy_warning,
    num,
    provenance,
    side_by_side,
    slug,
    timing,
    verdict,
    write_csv,
)

# Targets for the `debias` provider (the C++ CPU backend) on the in-memory CPU cases.
TARGET_FAISS, TARGET_CDIST = 1.5, 2.0
BASELINES = ("cdist+topk", "faiss")
COLUMNS = (
    "device", "device_type", "threads", "faiss_threads", "torch", "triton", "faiss", "git_sha",
    "date", "case", "n", "m", "d", "k", "streamed", "provider", "timer", "median_ms", "q20_ms",
    "q80_ms", "rounds", "vs_cdist", "vs_faiss", "gflops", "mm_fp32_gflops", "mm_fraction",
    "mm_tf32_gflops", "tf32_fraction", "peak_rss_mib", "peak_anon_mib", "check", "exact_rows",
    "check_queries", "recall", "targets", "other_cpu", "cdist_block_queries",
)  # fmt: skip


def _targets(r: dict[str, Any]) -> str | None:
    """ "met", or "missed: ..." naming each target missed; None where no target applies."""
    if r["device_type"] != "cpu" or r["streamed"] or r["provider"] != "debias":
        return None
    checks = (("faiss", r["vs_faiss"], TARGET_FAISS), ("cdist+topk", r["vs_cdist"], TARGET_CDIST))
    return verdict(checks, "×")


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per knn result, in the order the suite ran them."""
    out = []
    for bench in data["benchmarks"]:
        info, times = bench["extra_info"], timing(bench)
        sha, date = provenance(data, bench)
        median = times["median_s"]
        mm32, mm_tf32 = info.get("mm_fp32_gflops"), info.get("mm_tf32_gflops")
        gflops = info["flops"] / median / 1e9
        peak_anon = info.get("peak_anon_bytes")
        out.append(
            {
                **{
                    key: info.get(key, "")
                    for key in (
                        "device",
                        "device_type",
                        "threads",
                        "faiss_threads",
                        "torch",
                        "triton",
                        "faiss",
                        "case",
                        "n",
                        "m",
                        "d",
                        "k",
                        "streamed",
                        "provider",
                        "timer",
                        "check",
                        "exact_rows",
                        "check_queries",
                        "recall",
                        "other_cpu",
                        "cdist_block_queries",
                        "command",
                        "mm_method",
                        "peak_method",
                    )
                },
                "git_sha": sha,
                "date": date,
                "median_ms": median * 1e3,
                "q20_ms": times["q20_s"] * 1e3,
                "q80_ms": times["q80_s"] * 1e3,
                "rounds": times["rounds"],
                "gflops": gflops,
                "mm_fp32_gflops": mm32,
                "mm_fraction": gflops / mm32 if mm32 else None,
                "mm_tf32_gflops": mm_tf32,
                "tf32_fraction": gflops / mm_tf32 if mm_tf32 else None,
                "peak_rss_mib": info["peak_rss_bytes"] / 2**20,
                "peak_anon_mib": None if peak_anon is None else peak_anon / 2**20,
            }
        )
    # Ratios are times: a baseline's median over this provider's, same case (>1 is faster).
    medians = {(r["case"], r["provider"]): r["median_ms"] for r in out}
    for r in out:
        for base, column in zip(BASELINES, ("vs_cdist", "vs_faiss"), strict=True):
            ref = medians.get((r["case"], base))
            r[column] = ref / r["median_ms"] if ref else None
        r["targets"] = _targets(r)
    return out


def _exact(r: dict[str, Any]) -> str:
    text = f"{r['exact_rows']}/{r['check_queries']}"
    return text if r["check"] == "exact" else f"{text} (recall {r['recall']:.3f})"


def _side_by_side(table: list[dict[str, Any]]) -> list[str]:
    def ratios(r: dict[str, Any]) -> list[str]:
        return [
            f"{r[c]:.2f}× {b}"
            for b, c in zip(BASELINES, ("vs_cdist", "vs_faiss"), strict=True)
            if b != r["provider"] and r[c] is not None
        ]

    intro = (
        "Median seconds per search (all n queries); in brackets the speed-up over cdist+topk"
        " and over faiss."
    )
    return side_by_side(
        table, lambda r: r["case"], intro, lambda r: f"{r['median_ms'] / 1e3:.3g}", ratios
    )


def _details(table: list[dict[str, Any]]) -> list[str]:
    on_gpu = table[0]["device_type"] == "cuda"
    with_targets = any(r["targets"] is not None for r in table)
    mm = "of fp32 mm | of tf32 mm" if on_gpu else "of mm"
    lines = [
        "Per case and provider: median time with the 20th–80th percentiles; GFLOP/s of"
        " 2 n m d; its share of the measured rate of one float32 matrix product of the same"
        " shape; peak memory (CPU: resident-set growth of one call and its anonymous part;"
        " CUDA: allocator peak); exactness: checked queries whose k indices equal the float64"
        " brute force's, in order (recall: share of its neighbours found).",
        "",
        f"| case | provider | median ms (q20–q80) | vs cdist | vs faiss | GFLOP/s | {mm}"
        " | peak MiB (anon) | exact |" + (" targets |" if with_targets else ""),
        "|---|---|---:|---:|---:|---:|"
        + "---:|" * (2 if on_gpu else 1)
        + "---:|---|"
        + ("---|" if with_targets else ""),
    ]
    for r in table:
        peak = f"{r['peak_rss_mib']:.0f}"
        if r["peak_anon_mib"] is not None:
            peak += f" ({r['peak_anon_mib']:.0f})"
        cells = [
            r["case"],
            r["provider"],
            f"{r['median_ms']:.4g} ({r['q20_ms']:.4g}–{r['q80_ms']:.4g})",
            num(r["vs_cdist"], ".2f", "×"),
            num(r["vs_faiss"], ".2f", "×"),
            f"{r['gflops']:.1f}",
            num(r["mm_fraction"], ".0%"),
            *([num(r["tf32_fraction"], ".0%")] if on_gpu else []),
            peak,
            _exact(r),
        ]
        if with_targets:
            cells.append(r["targets"] or "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(table: list[dict[str, Any]], report_command: str) -> str:
    first = table[0]
    on_gpu = first["device_type"] == "cuda"
    title = first["device"] if on_gpu else f"{first['device']} ({first['threads']} threads)"
    faiss_threads = next((r["faiss_threads"] for r in table if r["faiss_threads"]), "")
    faiss = next((r["faiss"] for r in table if r["faiss"]), "")
    provenance = (
        f"torch {first['torch']}"
        + (f", triton {first['triton']}" if first["triton"] else "")
        + (f", faiss {faiss}" if faiss else "")
        + f", git {first['git_sha'] or 'unknown'}, {first['date']} UTC; threads: torch"
        f" {first['threads']}"
        + (f", faiss {faiss_threads}" if faiss_threads else "")
        + f"; timer: {', '.join(dict.fromkeys(r['timer'] for r in table))}."
    )
    lines = [
        f"# knn on {title}",
        "",
        provenance + " Produced by:",
        "",
        f"    {first['command']}",
        f"    {report_command}",
        "",
        *_side_by_side(table),
        "",
        *_details(table),
    ]
    mm = dict.fromkeys(f"{r['case']}: {r['mm_method']}" for r in table if r["mm_method"])
    peak = dict.fromkeys(r["peak_method"] for r in table if r["peak_method"])
    lines += [
        "",
        "Matrix product rates: " + "; ".join(mm) + ".",
        "Peak memory: " + "; ".join(peak) + ".",
    ]
    graded = [r for r in table if r["targets"] is not None]
    if graded:
        met = [r["case"] for r in graded if r["targets"] == "met"]
        lines += [
            "",
            f"Targets, `debias` on the in-memory CPU cases: at least {TARGET_FAISS:g}×"
            f" faiss and {TARGET_CDIST:g}× cdist+topk. Both met on {len(met)} of"
            f" {len(graded)}: {', '.join(met) or 'none'}.",
        ]
    lines += busy_warning(table)
    return "\n".join(lines) + "\n"


def write(data: dict[str, Any], out_dir: Path, report_command: str) -> str:
    """Writes knn_<device>.csv and .md into ``out_dir``; returns the Markdown."""
    table = rows(data)
    name = f"knn_{slug(table[0]['device'])}"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(table, out_dir / f"{name}.csv", COLUMNS)
    text = markdown(table, report_command)
    (out_dir / f"{name}.md").write_text(text)
    return text
