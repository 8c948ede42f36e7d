#!/usr/bin/env bash
# Issue 21's run on a lent GPU machine (see the device tool), in one call:
#   bash bench/gpu_run.sh [build] [cuda-tests] [tests] [sanitize] [bench]   (no argument: all)
#   bash bench/gpu_run.sh dry      # here, without a GPU: the CPU parts of each stage
#
# Stages in order of value, so that a call cut short still brings back what
# matters; each stage's log goes under $OUT as it runs (the device tool returns
# $OUT even from a call past its limit):
#   build       PGEST_CUDA_ARCHS=90 (sm_90 only: the H100/H200), no build isolation
#   cuda-tests  tests/test_cuda.py (same draws as the CPU, sync-free step under
#               set_sync_debug_mode("error"), CUDA-graph capture and replay)
#   tests       the rest of the suite with the GPU present (tests parametrised over
#               helpers.DEVICES run on "cuda" too); junit XML + tracebacks
#   sanitize    compute-sanitizer memcheck over bench/gpu_sanitize.py --small,
#               then racecheck and synccheck --small, then memcheck at full shapes
#   bench       bench/gpu_bench.py (its tables into $OUT)
# Liger-Kernel (the bench's comparison) is not on the GPU image: where the call
# carries .whl/ (the device README: `echo /.whl/ >> .git/info/exclude`, then
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl
# liger-kernel==VERSION` here, and carry=[".whl"]), its wheels go to /tmp/site.
# GPU_RUN_BUDGET (seconds, default 500) is the whole run's deadline: a stage
# gets the time left (capped), and one that cannot get its minimum is skipped
# and said so. The summary table is printed last (the device tool returns the
# output's tail).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-run}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
stages="${*:-build cuda-tests tests sanitize bench}"
budget="${GPU_RUN_BUDGET:-500}"
t0=$SECONDS
summary=()
status=0
has() { [[ " $stages " == *" $1 "* ]]; }
# CMake needs nvcc on PATH (or CUDACXX): the image's toolkit may sit outside it
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH="/usr/local/cuda/bin:$PATH"; fi

# run NAME CAP MIN CMD...: CMD under timeout min(CAP, time left), output to
# $OUT/NAME.log (its last lines echoed), its rc and seconds into the summary.
run() {
  local name=$1 cap=$2 min=$3; shift 3
  local left=$((budget - (SECONDS - t0)))
  if ((left < min)); then
    summary+=("$(printf '%-22s %8s %6s' "$name" skipped "${left}s")")
    return
  fi
  local lim=$((cap < left ? cap : left)) s=$SECONDS rc
  echo "=== $name (limit ${lim}s): $*"
  timeout --kill-after=10 "$lim" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 15 "$OUT/$name.log"
  ((rc != 0)) && status=1
  ((rc == 124 || rc == 137)) && rc="timeout"
  summary+=("$(printf '%-22s %8s %6s' "$name" "rc=$rc" "$((SECONDS - s))s")")
}

if has dry; then
  # The scripts' own code on the CPU, before device time is spent on them.
  bash -n "$0" || exit 1
  run dry-sanitize 300 1 python bench/gpu_sanitize.py --small --device cpu
  run dry-bench 300 1 python bench/gpu_bench.py --dry-run --out "$OUT"
  run dry-cuda-tests 120 1 bash -c "cd tests && python -m pytest test_cuda.py -q -p no:cacheprovider -rfEs"
else
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    nvcc --version | tail -n 2
  } >"$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
fi

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && echo "carried wheels: $(ls .whl)"
fi

if has build; then
  run build 300 60 env PGEST_CUDA=ON PGEST_CUDA_ARCHS="${PGEST_CUDA_ARCHS:-90}" MAX_JOBS="$(nproc)" \
    pip install --no-build-isolation --no-deps -v .
  # from tests/ and bench/: the installed pgest, not the checkout's pgest/ (no _C there)
  python -c "import pgest; print(pgest.build_info())" | tee -a "$OUT/machine.txt" || {
    echo "=== the build did not install: nothing else can run"; printf '%s\n' "${summary[@]}"; exit 1; }
fi

# pytest-xdist where the machine has it: the suite is mostly CPU tests.
workers=()
python -c "import xdist" 2>/dev/null && workers=(-n 8)
pytest_args=(-q -p no:cacheprovider -rfE --tb=long)
has cuda-tests && run cuda-tests 180 30 bash -c \
  "cd tests && python -m pytest test_cuda.py ${pytest_args[*]} --junitxml=$OUT/junit-cuda.xml"
has tests && run tests 300 60 env OMP_NUM_THREADS=2 bash -c \
  "cd tests && python -m pytest . --ignore=test_cuda.py ${workers[*]} ${pytest_args[*]} --junitxml=$OUT/junit-suite.xml"
if has sanitize; then
  san=(compute-sanitizer --error-exitcode 1 --print-limit 20)
  run memcheck-small 150 40 "${san[@]}" --tool memcheck python bench/gpu_sanitize.py --small
  run racecheck-small 200 60 "${san[@]}" --tool racecheck python bench/gpu_sanitize.py --small
  run synccheck-small 150 40 "${san[@]}" --tool synccheck python bench/gpu_sanitize.py --small
fi
has bench && run bench 240 90 python bench/gpu_bench.py --out "$OUT"
has sanitize && run memcheck-full 240 90 compute-sanitizer --error-exitcode 1 --print-limit 20 \
  --tool memcheck python bench/gpu_sanitize.py

{
  echo "=== summary (budget ${budget}s, used $((SECONDS - t0))s; logs in $OUT)"
  printf '%s\n' "${summary[@]}"
} | tee "$OUT/summary.txt"
exit $status
