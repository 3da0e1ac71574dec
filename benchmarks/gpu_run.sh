#!/usr/bin/env bash
# Everything a GPU machine is needed for, in one command that ends inside its budget (530 s,
# for a 10-minute limit) whatever fails. From the repository root (the GPU machine needs no
# git: the caller names the commit):
#
#     OUT=/some/dir DEBIAS_GIT_SHA=$(git rev-parse HEAD) bash benchmarks/gpu_run.sh
#
# Parts, in order, each under its own time limit (SIGINT, then SIGKILL 10 s later); a part
# that fails or runs out of time does not stop the next:
#   env         nvidia-smi, versions, the GPU's compute capability (env.txt)
#   build       pip install -e . against the machine's torch, nothing downloaded, the CUDA
#               kernels for this GPU's arch alone, nvcc --resource-usage in the log; if it fails,
#               build-fallback installs the package without compiled code, so that the triton
#               and torch rows still run (DEBIAS_NO_JIT=1: no compiling on first use either)
#   info        python -m debias.info: the kernels and backends found (env.txt)
#   tests       the GPU tests: those marked gpu and the Triton knn kernel tests (not so marked;
#               they run on a GPU when one is there); not the slow ones
#   loss, loss-flow   bench_noise_loss.py: the DDPM cases; then the flow-matching cases (the
#               diffusers scripts' cosmap, and sd-scripts' huber + alpha mask + loss_weights
#               on continuous sigmas: the flow_huber family) and the training step. eager, compile, triton, cuda (each GPU backend in both gradient
#               designs). Each result is appended to a JSONL file as its test ends, so a part
#               stopped at its limit keeps what it finished
#   loss-report noise_loss_<gpu>.csv and .md
#   knn, knn-report   bench_knn.py: debias on triton and cuda, cdist+topk, faiss where a faiss
#               with GPU support imports; knn_<gpu>.csv and .md
#   large       the GPU tests of more than 2^31 elements (slow, ~25 GB each), with the time left
# $OUT gets env.txt, summary.txt (per part: status, seconds, what it produced; rewritten after
# each part), the four report files and logs.tar.gz (every log, the JSONL results).
# Without a CUDA device every part after env is skipped, and the script exits 0; else it exits
# 1 when a part failed or ran out of time.
#
# Settings: PYTHON (python3); DEBIAS_GPU_BUDGET (seconds, 530);
# DEBIAS_GPU_PARTS (default "build tests loss knn large"; say "build loss" to rerun only the
# loss-side benchmark); DEBIAS_GIT_SHA (written into every result); MAX_JOBS (cores).
# Pure-Python wheels in .whl/ (diffusers, say, which the GPU image lacks) are installed first,
# into a private folder.
set -uo pipefail # no -e: every part runs, whatever the one before did

OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
BUDGET=${DEBIAS_GPU_BUDGET:-530}
PARTS=" ${DEBIAS_GPU_PARTS:-build tests loss knn large} "
GRACE=10 # seconds between SIGINT (pytest still prints its summary) and SIGKILL
# Seconds kept for the parts after the one running: the least each of them gets, its SIGKILL
# grace included; a part may also use whatever the ones before it leave, up to its own cap
# (the part's second argument).
MIN_FALLBACK=30 MIN_INFO=15 MIN_TESTS=45 MIN_LOSS=90 MIN_FLOW=30 MIN_KNN=60 MIN_REPORT=15
AFTER_TESTS=$((MIN_LOSS + MIN_FLOW + MIN_KNN + 2 * MIN_REPORT)) # 210
AFTER_BUILD=$((MIN_TESTS + AFTER_TESTS))                        # 255
export PYTHONUNBUFFERED=1 DEBIAS_GIT_SHA=${DEBIAS_GIT_SHA:-}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$OUT"
WORK=$(mktemp -d)
STARTED=$(date -u '+%F %T')
LINES=()
FAILED=0

# ---- bookkeeping ----------------------------------------------------------------------------

write_summary() {
  {
    echo "debias GPU run, git ${DEBIAS_GIT_SHA:-unknown}, started $STARTED UTC;" \
      "${SECONDS}s of a ${BUDGET}s budget"
    printf '%-12s %-24s %6s  %s\n' part status time produced
    printf '%s\n' "${LINES[@]}"
    failures=$(grep -hE '^(FAILED|ERROR) ' "$WORK"/*.log 2>/dev/null)
    if [[ -n $failures ]]; then
      echo "failed tests ($(wc -l <<<"$failures")):"
      head -n 30 <<<"$failures"
    fi
  } >"$OUT/summary.txt"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" .
}

# record NAME STATUS SECONDS NOTE
record() {
  LINES+=("$(printf '%-12s %-24s %5ss  %s' "$1" "$2" "$3" "$4")")
  case $2 in failed* | timed*) FAILED=1 ;; esac
  write_summary
}

# part NAME CAP KEEP CMD...: CMD, its output in $WORK/NAME.log, for at most CAP seconds and
# never into the KEEP seconds kept for the parts after it (nor, SIGKILL's grace included, past
# the budget). Sets STATUS and TOOK; the caller records them with what the part produced.
part() {
  local name=$1 cap=$2 keep=$3 limit rc start=$SECONDS
  shift 3
  limit=$((BUDGET - SECONDS - keep - GRACE))
  ((limit > cap)) && limit=$cap
  TOOK=0
  if ((limit < 5)); then
    STATUS="skipped: ${limit}s left"
    return 1
  fi
  echo "== $name at ${SECONDS}s, limit ${limit}s: $*"
  timeout -s INT -k "$GRACE" "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  TOOK=$((SECONDS - start))
  case $rc in
    0) STATUS=ok ;;
    124 | 137) STATUS="timed out (${limit}s)" ;;
    5) STATUS="ok: no tests selected" ;; # pytest's status when -m/-k selects nothing
    *) STATUS="failed (exit $rc)" ;;
  esac
  tail -n 5 "$WORK/$name.log"
  return $rc
}

# report NAME JSONL KEEP PATTERN: report.py on a benchmark's results, its files into $OUT.
report() {
  if [[ -s $2 ]]; then
    part "$1" 30 "$3" "$PY" benchmarks/report.py "$2" --out-dir "$OUT"
    record "$1" "$STATUS" "$TOOK" "$(files "$4")"
  else
    record "$1" "skipped: no results" 0 ""
  fi
}

# pytest's last summary line in a part's log ("3 failed, 40 passed, 2 skipped in 81.2s").
pytest_line() {
  grep -E '(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s' \
    "$WORK/$1.log" 2>/dev/null | tail -n 1 | sed -E 's/^=+ | =+$//g'
}

# Lines of a JSONL file, 0 where there is none.
count() {
  if [[ -s $1 ]]; then wc -l <"$1"; else echo 0; fi
}

# The files in $OUT that match a pattern, on one line.
files() {
  (cd "$OUT" && compgen -G "$1" | xargs)
}

wants() {
  [[ $PARTS == *" $1 "* ]]
}

# ---- env ------------------------------------------------------------------------------------

# shellcheck disable=SC2329 # run by `bash -c env_report`, under part's time limit
env_report() {
  date -u '+%F %T UTC'
  timeout 20 nvidia-smi || echo "nvidia-smi: not available"
  (nvcc --version || echo "nvcc: not found") | tail -n 2
  "$PY" - <<'EOF'
import importlib.metadata as m, os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__,
      "| cuda", torch.version.cuda)
for name in ("triton", "pytest", "pytest-benchmark", "pytest-xdist", "setuptools", "ninja",
             "diffusers", "faiss-cpu", "faiss-gpu"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
print("cpus", os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "|", p.multi_processor_count, "SMs |", p.total_memory >> 20, "MiB")
    print(f"arch {p.major}.{p.minor}")
else:
    print("arch none")
EOF
}
export -f env_report
export PY
part env 60 0 bash -c env_report
cp "$WORK/env.log" "$OUT/env.txt"
ARCH=$(sed -n 's/^arch //p' "$WORK/env.log" | tail -n 1)
DEVICE=$(sed -n 's/^device //p' "$WORK/env.log" | tail -n 1)
record env "$STATUS" "$TOOK" "${DEVICE:-no CUDA device}; $(grep -m1 '^python' "$WORK/env.log")"

if [[ -z $ARCH || $ARCH == none ]]; then
  why="no CUDA device"
  [[ $STATUS == ok ]] || why="env failed"
  for name in build info tests loss loss-flow loss-report knn knn-report large; do
    record "$name" "skipped: $why" 0 ""
  done
  cat "$OUT/summary.txt"
  exit "$FAILED"
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# ---- build ----------------------------------------------------------------------------------

PIP_INSTALL=("$PY" -m pip install -v --no-index --no-build-isolation --no-deps
  --disable-pip-version-check -e .)
if wants build; then
  # One arch (this GPU's) keeps nvcc's share of the build short.
  part build 240 $((AFTER_BUILD + MIN_FALLBACK + MIN_INFO)) env TORCH_CUDA_ARCH_LIST="$ARCH" \
    NVCC_APPEND_FLAGS=--resource-usage "${PIP_INSTALL[@]}"
  grep -E 'ptxas info|bytes stack frame' "$WORK/build.log" 2>/dev/null |
    (c++filt 2>/dev/null || cat) >"$WORK/resource_usage.txt"
  kernels=$(grep -c 'Used [0-9]* registers' "$WORK/resource_usage.txt")
  record build "$STATUS" "$TOOK" "sm_${ARCH/./}; resource_usage.txt: $kernels kernels"
  if [[ $STATUS != ok ]]; then
    # The package without compiled code: triton and torch still run; nothing compiles on first
    # use (a failing build would be retried, minutes each, in every process).
    export DEBIAS_NO_JIT=1
    part build-fallback 60 $((AFTER_BUILD + MIN_INFO)) \
      env DEBIAS_NO_EXTENSIONS=1 "${PIP_INSTALL[@]}"
    record build-fallback "$STATUS" "$TOOK" "without compiled code; DEBIAS_NO_JIT=1"
  fi
fi
part info 60 "$AFTER_BUILD" "$PY" -m debias.info
cat "$WORK/info.log" >>"$OUT/env.txt" 2>/dev/null
# e.g. "add_noise cuda -> cuda (built: cuda, triton, torch)"
record info "$STATUS" "$TOOK" "$(grep -m1 -E '^ +add_noise +cuda' "$WORK/info.log" 2>/dev/null |
  xargs)"

# ---- GPU tests ------------------------------------------------------------------------------

# A test module that fails to import must not stop the others' tests.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs --tb=short --continue-on-collection-errors)
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n 4) # Triton compiles each kernel variant on first use, one at a time per process
fi
if wants tests; then
  # -k matches marker and module names as well as test names. test_gpu_compile.py needs no
  # GPU (CI runs it).
  part tests 150 "$AFTER_TESTS" "${PYTEST[@]}" tests -m "not slow" --maxfail=20 \
    -k "triton_candidates or (gpu and not test_gpu_compile.py)" ${XDIST[@]+"${XDIST[@]}"}
  record tests "$STATUS" "$TOOK" "$(pytest_line tests)"
fi

# ---- benchmarks: each result lands in a JSONL file as its test ends --------------------------

LOSS=$WORK/noise_loss.jsonl KNN=$WORK/knn.jsonl
if wants loss; then
  BENCH=(env DEBIAS_BENCH_JSONL="$LOSS" "${PYTEST[@]}" benchmarks/bench_noise_loss.py)
  part loss 180 $((MIN_FLOW + MIN_KNN + 2 * MIN_REPORT)) "${BENCH[@]}" -k ddpm
  record loss "$STATUS" "$TOOK" "rows: $(count "$LOSS"); $(pytest_line loss)"
  before=$(count "$LOSS")
  part loss-flow 90 $((MIN_KNN + 2 * MIN_REPORT)) "${BENCH[@]}" -k "flow or train_step"
  record loss-flow "$STATUS" "$TOOK" \
    "rows: $(($(count "$LOSS") - before)); $(pytest_line loss-flow)"
  report loss-report "$LOSS" $((MIN_KNN + MIN_REPORT)) 'noise_loss_*'
fi
if wants knn; then
  part knn 150 "$MIN_REPORT" env DEBIAS_BENCH_JSONL="$KNN" "${PYTEST[@]}" benchmarks/bench_knn.py
  faiss=$(grep -m1 -oE 'SKIPPED.*faiss.*' "$WORK/knn.log" 2>/dev/null | sed -E 's/.*: //')
  record knn "$STATUS" "$TOOK" "rows: $(count "$KNN"); $(pytest_line knn)${faiss:+; faiss: $faiss}"
  report knn-report "$KNN" 0 'knn_*'
fi

# ---- the tests of more than 2^31 elements, with the time left --------------------------------

if wants large; then
  if ((BUDGET - SECONDS - GRACE >= 60)); then
    part large 600 0 "${PYTEST[@]}" tests -m "gpu and slow" --maxfail=4
    record large "$STATUS" "$TOOK" "$(pytest_line large)"
  else
    record large "skipped: $((BUDGET - SECONDS))s left" 0 ""
  fi
fi

cat "$OUT/summary.txt"
exit "$FAILED"
