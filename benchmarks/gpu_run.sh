#!/usr/bin/env bash
# Everything the GPU machine is for, in one call: build debias with its CUDA kernels, the
# kernels' resource usage, the GPU tests, the noise_loss benchmark and its report, the knn
# benchmark and its report, then the CPU tests with whatever time is left. From the repository
# root:
#
#     OUT=/some/dir bash benchmarks/gpu_run.sh
#
# Each stage runs under its own time limit and a failing stage does not stop the next; the
# exit status of each is in $OUT/summary.txt. What lands in $OUT (8 files):
#   env.txt             nvidia-smi, versions
#   resource_usage.txt  nvcc --resource-usage for sm_90, per kernel of csrc/cuda/*.cu
#   bench.json          pytest-benchmark's JSON of the DDPM cases and the training step
#                       (CUDA-event times in extra_info)
#   bench_flow.json     the same for the flow-matching cases
#   noise_loss_<gpu>.csv, noise_loss_<gpu>.md   the report of both (also in
#                       benchmarks/results/)
#   logs.tar.gz         every stage's full log, and the knn benchmark's knn.json and its
#                       report knn_<gpu>.csv/.md (also in benchmarks/results/)
#   summary.txt         each stage's exit status (124: out of time), the elapsed time and the
#                       knn report's Markdown
# Settings: PYTHON (python3), DEBIAS_GPU_BUDGET (seconds for the whole run, 500),
# DEBIAS_GPU_XDIST (pytest-xdist workers for the GPU tests, 4; 0 runs them in one process),
# DEBIAS_GIT_SHA (recorded in the report where the tree has no .git).
set -euo pipefail

OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
# One device call may run 10 minutes; the stages share this budget, leaving time for the
# files to be copied back.
BUDGET=${DEBIAS_GPU_BUDGET:-500}
# Kept back for the noise_loss benchmark and its report while the tests run before it, and
# for the knn benchmark and its report while both run before it (the knn stage then also gets
# whatever the noise_loss benchmark leaves, before the CPU tests get the rest). Of the
# noise_loss reserve, FLOW_RESERVE is kept for its flow-matching cases (4 cases, two of them
# compiled by Inductor) while the DDPM ones run, so that running out of time cuts both
# families rather than the one that runs last.
BENCH_RESERVE=210
FLOW_RESERVE=60
KNN_RESERVE=90
XDIST_WORKERS=${DEBIAS_GPU_XDIST:-4}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
declare -A RC=()
ORDER=()

# run_stage NAME LIMIT CMD...: runs CMD under min(LIMIT, what is left of the budget), its
# output in $LOGS/NAME.log (and on stdout with TEE=1), and records its exit status. On time
# out the command first gets SIGINT, so that pytest still writes its reports (the benchmark
# JSON included), then SIGKILL 20 s later.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  ((limit > left)) && limit=$left
  ORDER+=("$name")
  if ((limit < 20)); then
    echo "== $name: skipped, ${left}s of the budget left"
    RC[$name]="skipped (no time left)"
    return 0
  fi
  echo "== $name (at ${SECONDS}s, limit ${limit}s): $*"
  set +e
  if [[ ${TEE:-0} == 1 ]]; then
    timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    RC[$name]=${PIPESTATUS[0]}
  else
    timeout -s INT -k 20 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    RC[$name]=$?
  fi
  set -e
  echo "== $name: exit ${RC[$name]} at ${SECONDS}s"
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . # after every stage: a killed run keeps its logs
}

# ---- the machine ---------------------------------------------------------------------------
{
  date -u '+%F %T UTC'
  nvidia-smi || true
  nvcc --version | tail -2 || true
  "$PY" - <<'EOF' || true
import importlib.metadata as m, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory >> 20, "MiB")
for name in ("triton", "diffusers", "pytest", "pytest-benchmark", "pytest-xdist", "setuptools", "ninja"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
EOF
  echo "cpus $(nproc)"
} 2>&1 | tee "$OUT/env.txt"

# Pure-Python wheels brought along in .whl/ for packages the machine lacks (diffusers, for
# the UNet2DModel training step and the diffusers drop-in test), into a private folder.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# ---- build ---------------------------------------------------------------------------------
# The kernels' registers, shared memory and spills, compiled as setup.py compiles them but
# for sm_90 alone; in the background, beside the build.
resource_usage() {
  shopt -s nullglob
  local files=(csrc/cuda/*.cu) f
  ((${#files[@]})) || echo "no csrc/cuda/*.cu"
  for f in "${files[@]}"; do
    echo "== $f"
    # c++filt, where installed, spells out the kernels' template arguments
    nvcc -arch=sm_90 --resource-usage -O3 --use_fast_math -std=c++17 -DDEBIAS_WITH_CUDA \
      -Icsrc -c "$f" -o "/tmp/$(basename "$f").o" 2>&1 | (c++filt 2>/dev/null || cat) ||
      echo "nvcc exit $?"
  done
}
resource_usage >"$OUT/resource_usage.txt" 2>&1 &
RESOURCE_PID=$!

# No index: nothing can be downloaded there, and torch/triton are the machine's own.
run_stage build 300 "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e .
tail -n 15 "$LOGS/build.log" || true
TEE=1 run_stage backends 60 "$PY" -c "import torch; from debias.ops import _backend; \
print('backends on cuda:', _backend.available(torch.device('cuda')))"
wait "$RESOURCE_PID" || true

# ---- tests on the GPU ----------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs --tb=short)
XDIST=()
if ((XDIST_WORKERS > 0)) && "$PY" -c "import xdist" 2>/dev/null; then
  # Triton compiles each kernel variant on first use, one at a time per process
  XDIST=(-n "$XDIST_WORKERS")
fi
# Up to ten failures rather than -x: one lease should show as many problems as it can.
TEE=1 run_stage gpu-tests $((BUDGET - SECONDS - BENCH_RESERVE - KNN_RESERVE - 50)) \
  "${PYTEST[@]}" tests -m "gpu and not slow" --maxfail=10 ${XDIST[@]+"${XDIST[@]}"}
# The tests of more than 2^31 elements take ~25 GB each: one at a time, in one process.
TEE=1 run_stage gpu-tests-large $((BUDGET - SECONDS - BENCH_RESERVE - KNN_RESERVE)) \
  "${PYTEST[@]}" tests -m "gpu and slow" --maxfail=4

# ---- benchmark and report ------------------------------------------------------------------
# Case ids start with the family (ddpm-..., flow-...); the training step is a DDPM one.
run_stage bench $((BUDGET - SECONDS - FLOW_RESERVE - KNN_RESERVE - 30)) \
  "${PYTEST[@]}" benchmarks/bench_noise_loss.py -k "not flow" --benchmark-json="$OUT/bench.json"
tail -n 25 "$LOGS/bench.log" || true
run_stage bench-flow $((BUDGET - SECONDS - KNN_RESERVE - 30)) \
  "${PYTEST[@]}" benchmarks/bench_noise_loss.py -k flow --benchmark-json="$OUT/bench_flow.json"
tail -n 25 "$LOGS/bench-flow.log" || true
BENCH_JSONS=()
for json in "$OUT/bench.json" "$OUT/bench_flow.json"; do
  if [[ -s $json ]]; then
    BENCH_JSONS+=("$json")
  fi
done
if ((${#BENCH_JSONS[@]})); then
  TEE=1 run_stage report 60 "$PY" benchmarks/report.py "${BENCH_JSONS[@]}" \
    --out-dir benchmarks/results
  # the report names its files after the GPU: the newest two are this run's
  for ext in csv md; do
    newest=$(ls -t benchmarks/results/noise_loss_*."$ext" 2>/dev/null | head -n 1 || true)
    if [[ -n $newest ]]; then
      cp "$newest" "$OUT/"
    fi
  done
fi

# ---- knn benchmark and report: into the logs tarball (the file count in $OUT stays 8) -------
# Cases in order of priority (bench_knn.GPU_CASES): cut short at its limit, pytest still writes
# the JSON of the cases it finished.
run_stage knn-bench $((BUDGET - SECONDS - 30)) \
  "${PYTEST[@]}" benchmarks/bench_knn.py --benchmark-json="$LOGS/knn.json"
tail -n 25 "$LOGS/knn-bench.log" || true
if [[ -s $LOGS/knn.json ]]; then
  TEE=1 run_stage knn-report 30 "$PY" benchmarks/report.py "$LOGS/knn.json" \
    --out-dir benchmarks/results
  # the newest two are this run's, if the report ran (the CPU ones are in the repository)
  for ext in csv md; do
    newest=$(ls -t benchmarks/results/knn_*."$ext" 2>/dev/null | head -n 1 || true)
    if [[ ${RC[knn-report]} == 0 && -n $newest ]]; then
      cp "$newest" "$LOGS/"
    fi
  done
fi

# ---- the CPU tests, with the time left (CI runs them too) -----------------------------------
run_stage cpu-tests $((BUDGET - SECONDS - 5)) "${PYTEST[@]}" tests -m "not gpu" -x
tail -n 15 "$LOGS/cpu-tests.log" || true

# ---- summary -------------------------------------------------------------------------------
status=0
for name in "${ORDER[@]}"; do
  if [[ ${RC[$name]} != 0 ]]; then
    status=1
  fi
done
cat "$LOGS"/*.log | grep -E '^(FAILED|ERROR) ' >"$LOGS/failures.txt" || true
{
  echo "stage exit status (124: stopped at its time limit)"
  for name in "${ORDER[@]}"; do
    printf '  %-16s %s\n' "$name" "${RC[$name]}"
  done
  echo "failed tests: $(wc -l <"$LOGS/failures.txt")"
  head -n 30 "$LOGS/failures.txt"
  echo "elapsed ${SECONDS}s of a ${BUDGET}s budget"
  for md in "$LOGS"/knn_*.md; do
    if [[ -e $md ]]; then
      echo
      cat "$md"
    fi
  done
} | tee "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
exit "$status"
