#!/usr/bin/env bash
# On a lent GPU machine (see the device tool), in one call or split over
# several (the machine keeps the install while it stays warm):
#   bash bench/gpu_run.sh [build] [cuda-tests] [tests] [sanitize] [bench]   (no argument: all)
# build: pip install --no-build-isolation . ; cuda-tests: tests/test_cuda.py;
# tests: the whole suite on the installed package; sanitize: compute-sanitizer
# memcheck and synccheck over bench/gpu_sanitize.py, racecheck over its small
# shapes; bench: bench/gpu_bench.py, results under $OUT (or bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
stages="${*:-build cuda-tests tests sanitize bench}"
status=0
has() { [[ " $stages " == *" $1 "* ]]; }
step() { echo "=== $*"; "$@" || { echo "=== FAILED ($?): $*"; status=1; }; }

if has build; then
  pip install --no-build-isolation . 2>&1 | tail -3
  python -c "import pgest; print(pgest.build_info())" || exit 1
fi
# from tests/: the installed pgest, not the checkout's pgest/ (no _C there)
has cuda-tests && step bash -c "cd tests && timeout 540 python -m pytest test_cuda.py -q -p no:cacheprovider -rf"
has tests && step bash -c "cd tests && timeout 540 python -m pytest . -q -p no:cacheprovider -rf -x"
if has sanitize; then
  for tool in memcheck synccheck; do
    step timeout 300 compute-sanitizer --tool "$tool" --error-exitcode 1 python bench/gpu_sanitize.py
  done
  step timeout 300 compute-sanitizer --tool racecheck --error-exitcode 1 python bench/gpu_sanitize.py --small
fi
has bench && step python bench/gpu_bench.py --out "${OUT:-bench/results}"
exit $status
