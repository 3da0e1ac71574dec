"""Training steps per second of `debias train`, for two source trees side by side.

    python benchmarks/train_throughput.py --tree before=/tmp/old --tree after=. --repeats 3

Each tree runs the same run (the embedded example's UNet on the digits, no evaluation,
samples or checkpoints, one log row every 50 steps) in a fresh subprocess with that tree first
on ``sys.path``; the trees alternate, so drift of a shared machine hits both alike. Prints one
row per run and the median steps/s per tree; ``--json`` writes them too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_RUN = """
import json, sys, tempfile, torch
torch.set_num_threads({threads})
from debias.pipeline.train import TrainConfig, train
config = TrainConfig(steps={steps}, batch_size={batch}, log_every=50, eval_every=0,
                     sample_every=0, monitor_every=0, checkpoint_every=0, seed=0)
with tempfile.TemporaryDirectory() as run:
    summary = train(config, run, progress=False, device="{device}")
print(json.dumps({{"steps_per_s": summary["steps_per_s"], "file": __import__("debias").__file__}}))
"""


def _one(tree: Path, args: argparse.Namespace) -> dict:
    code = _RUN.format(threads=args.threads, steps=args.steps, batch=args.batch, device=args.device)
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"{tree}: the run failed\n{out.stderr[-2000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(row["file"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: imported debias from {row['file']}, not from the tree")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree)
    results: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(args.repeats):
        for name, path in trees.items():
            rate = _one(Path(path), args)["steps_per_s"]
            results[name].append(rate)
            print(f"repeat {r}  {name:>10}  {rate:8.2f} steps/s", flush=True)
    medians = {name: statistics.median(rates) for name, rates in results.items()}
    for name, rate in medians.items():
        print(f"median  {name:>10}  {rate:8.2f} steps/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "median": medians}, indent=2))


if __name__ == "__main__":
    main()
