#!/usr/bin/env bash
# The prepared device check for a session lent a GPU (15 minutes of device time in all).
# Prepare here first (data travels as the 18 MB JPEG copy, decoded on the device):
#     mkdir -p .data && cp -r ../shared/datasets/cifar10-jpeg .data/ && echo /.data/ >> .git/info/exclude
# Then one device call per stage, e.g. `bash benchmarks/gpu_check.sh bench` with carry [".data"]:
#     bench   engine vs eager loop per model, KD vs alone per pair (throughput, ratios, memory)   ~5 min
#     grid    the 15-run study with the fast preset, timed, then its report                     <=10 min (target)
#     paper   resnet18 teacher + resnet18_half alone and distilled with the paper preset         ~20 min: split it
# Everything lands in $OUT (copied back): commit it under benchmarks/results/.
set -euo pipefail
stage=${1:-bench}
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/torch.txt"
if [ ! -d .data/cifar-10-batches-py ]; then
    python3 .data/cifar10-jpeg/make_cifar10_batches.py .data
fi
case "$stage" in
bench)
    python3 -m kdlab.cli bench --preset fast --warmup 30 --steps 100 --out "$OUT" 2>&1 | tee "$OUT/bench.log"
    python3 -m kdlab.cli bench --preset fast --what throughput --set compile=reduce-overhead --warmup 30 \
        --steps 100 --out "$OUT" 2>&1 | tee "$OUT/bench-cudagraphs.log"
    ;;
grid)
    start=$(date +%s)
    python3 -m kdlab.cli grid --preset fast --data-dir .data --runs-dir "$OUT/runs" --quiet 2>&1 | tee "$OUT/grid.log"
    echo "grid wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/grid.log"
    python3 -m kdlab.cli report --runs-dir "$OUT/runs" --format json > "$OUT/study.json"
    python3 -m kdlab.cli report --runs-dir "$OUT/runs" --compare-paper --out "$OUT/report" > "$OUT/study.md"
    rm -rf "$OUT/runs/checkpoints"  # weights stay behind; the database and report come back
    ;;
paper)
    python3 -m kdlab.cli grid --preset paper --teachers resnet18 --students resnet18 --data-dir .data \
        --runs-dir "$OUT/runs-paper" --quiet 2>&1 | tee "$OUT/paper.log"
    rm -rf "$OUT/runs-paper/checkpoints"
    ;;
*)
    echo "unknown stage $stage: bench, grid or paper" >&2; exit 2 ;;
esac
