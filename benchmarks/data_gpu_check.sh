#!/usr/bin/env bash
# The data path on a GPU (issue 16), for a session lent one: about 6 minutes of device time.
#
#   Preparation, on the session's own machine (the device machine reaches nothing outside):
#     git archive 75408b7 | tar -x -C .before     # the loader before issue 16, for the A/B (an ignored folder)
#   Call, with carry [".before"] (and the venv as gpu_check.sh says), timeout_s 600:
#     bash benchmarks/data_gpu_check.sh
#
# Stages, each time-boxed, leaving 3 files in $OUT:
#   1. tests/test_residency.py on the GPU: the same batches on the device and streamed through pinned
#      buffers and asynchronous copies (the tests that skip on a CPU run here), then the whole file;
#   2. benchmarks/loader_before_after.py --device cuda: the CIFAR fast path before and after, on the card;
#   3. benchmarks/data_scale.py at 2,000 and 8,000 224-px JPEGs with resnet18 at width 0.5 on 224-px crops:
#      decode, loader alone (streamed and kdlab's choice) and one-epoch runs, host peak memory.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kdlab-data-gpu}
mkdir -p "$OUT"
export KDLAB_CACHE_DIR=${KDLAB_CACHE_DIR:-/tmp/kdlab-data-gpu-cache}

timeout 150 python -m pytest -o addopts="" -q tests/test_residency.py -rs > "$OUT/residency-tests.log" 2>&1
echo "residency tests: exit $? ($(tail -1 "$OUT/residency-tests.log"))"

if [ -d .before/kdlab ]; then
  timeout 150 python benchmarks/loader_before_after.py --before .before --device cuda --reps 8 \
    > "$OUT/loader-before-after-cuda.json" 2>&1
  echo "loader before/after: exit $?"
else
  echo "loader before/after: skipped (no .before/ checkout carried)"
fi

timeout 280 python benchmarks/data_scale.py --sizes 2000,8000 --model resnet18 --width 0.5 --crop 224 --batch 256 \
  --out "$OUT" > "$OUT/data-scale.log" 2>&1
echo "data_scale: exit $? (JSON in $OUT)"
