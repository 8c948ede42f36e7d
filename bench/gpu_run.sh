#!/usr/bin/env bash
# One call on a lent GPU machine (see the device tool): build, CUDA tests,
# benchmarks. Writes bench/results/<gpu>-<date>.{json,md} under $OUT too.
#   run: bash bench/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
pip install --no-build-isolation . 2>&1 | tail -3
python -c "import pgest; print(pgest.build_info())"
(cd tests && python -m pytest test_cuda.py -q -x) || true
python bench/gpu_bench.py --out "${OUT:-bench/results}"
