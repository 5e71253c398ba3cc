#!/usr/bin/env bash
# kdlab against torchdistill 1.1.5 on the same KD job (issue 8, target 4), as one device call.
#
# Prepare here once, in the repository root (the GPU machine has no network; torchdistill travels as
# its one pure-Python wheel, installed there without its dependencies: what it imports for this
# pipeline, torch, torchvision, numpy, PyYAML and Pillow, is already on that machine; pandas, wandb
# and trackio are imported only by its trackers, which this job does not use):
#     mkdir -p .data && cp -r ../shared/datasets/cifar10-jpeg .data/    # 18 MB, decoded there on every core
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         -d .whl torchdistill==1.1.5                                   # 95 kB; .data/ and .whl/ are git-ignored
# .data/ must hold only cifar10-jpeg/ when carried: decoded batches (180 MB) are over the 64 MiB limit.
# Then one device call with carry [".data", ".whl"]:
#     bash benchmarks/torchdistill_check.sh full    # 40 epochs, teacher trained first
#     bash benchmarks/torchdistill_check.sh short   # 10 epochs (the teacher's too)
# Estimates for one H200 from ../shared/gpu-results/2026-11-28-h200 (the engine before CUDA graphs, so an
# upper bound for the kdlab parts): full about 5-6 min (teacher ~100 s, torchdistill ~80-150 s, kdlab KD
# ~110 s, decoding and start-ups ~30 s); short about 2.5 min. full measures what the issue asks: img/s and the accuracy after the preset's 40
# epochs. short measures the same steady-state img/s (epochs 2-10 of each side) but the accuracies of a
# 10-epoch job, and its overall img/s carries kdlab's compilation over fewer epochs.
# Extra arguments go to torchdistill_check.py (e.g. --epochs 20, --no-persistent-workers).
# Everything lands in $OUT (copied back: the JSON, the log, gpu.csv): commit the JSON under benchmarks/results/.
set -euo pipefail
mode=${1:-full}
shift || true
case "$mode" in
full) epochs=() ;;
short) epochs=(--epochs 10) ;;
*) echo "unknown mode $mode: full or short" >&2; exit 2 ;;
esac
OUT=${OUT:-benchmarks/results/local}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if ! "$PYTHON" -c "import torchdistill" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/torchdistill-1.1.5-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
fi
"$PYTHON" -c "import torch, torchvision, torchdistill; print('torch', torch.__version__, 'torchvision',
    torchvision.__version__, 'torchdistill', torchdistill.__version__)"
if [ ! -d .data/cifar-10-batches-py ]; then
    start=$(date +%s)
    "$PYTHON" benchmarks/prepare_cifar10_jpeg.py .data/cifar10-jpeg .data
    echo "data decoded in $(( $(date +%s) - start ))s"
fi
# Time-boxed under a 10-minute call; the JSON is rewritten after each side, so a timeout keeps what was done.
timeout "${TDCHECK_S:-560}" "$PYTHON" benchmarks/torchdistill_check.py --data-dir .data --out "$OUT" \
    ${epochs[@]+"${epochs[@]}"} "$@" 2>&1 | tee "$OUT/torchdistill-$mode.log"
