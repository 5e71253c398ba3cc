#!/usr/bin/env bash
# The prepared device checks for a session lent a GPU (15 minutes of device time in all, machine start
# included; at most 8 files come back from $OUT). Prepare here first (data travels as the 18 MB JPEG copy
# and is decoded on the device):
#     mkdir -p .data && cp -r ../shared/datasets/cifar10-jpeg .data/ && echo /.data/ >> .git/info/exclude
# Then device calls with carry [".data"], one or more stages each, e.g. `bash benchmarks/gpu_check.sh check grid`
# (the first call of a session: about 10 minutes; then `bench` if 4 minutes are left):
#     check   tests/test_graphs_cuda.py: every method captured and free of host syncs, a graphed group on
#             streams = eager runs alone (losses, evaluation, weights, momenta), a shared teacher
#             whose students change, memory flat per epoch and back after a group, and the
#             9-student + 3-teacher fast group's peak memory and steps/s with graphs on and off
#             (check-figures.json)                                                          <=2 min
#     bench   `kdlab bench` throughput (3 models x 2 widths, compile time beside speed) and KD cost
#             (per pair, and each teacher's 3 students side by side vs alone)                  ~4 min
#     grid    the 15-run study, fast preset, one seed: JPEG archive -> decoded data -> grid -> report,
#             timed end to end (target: 8 minutes), summary JSON for benchmarks/results/     <=9 min
# Each stage is time-boxed and ends with a summary; everything lands in $OUT: commit the JSON under
# benchmarks/results/ (grid: <device>-grid-<date>.json) and the figures in benchmarks/README.md.
set -uo pipefail
stages=${*:-check}
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/local}
RUNS=${RUNS:-/tmp/kdlab-runs}
PRESET=${PRESET:-fast}  # a CPU try: PRESET=smoke (EXTRA: more options, e.g. "--set threads=1")
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
t_start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  git log -1 --format='kdlab %h %s' 2>/dev/null; nproc; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

decode() {  # the JPEG copy in the official layout, decoded on every core (counted in the grid's time)
    [ -d .data/cifar-10-batches-py ] || timeout 120 python3 benchmarks/prepare_cifar10_jpeg.py .data/cifar10-jpeg .data
}

for stage in $stages; do
echo "=== stage $stage"
case "$stage" in
check)
    KDLAB_CHECK_OUT="$OUT" timeout ${CHECK_S:-120} python3 -m pytest -o addopts="" -q -p no:cacheprovider -rA --durations=0 \
        tests/test_graphs_cuda.py 2>&1 | tee "$OUT/check.log"
    echo "graphs test exit: ${PIPESTATUS[0]}" | tee -a "$OUT/check.log"
    ;;
bench)
    timeout 200 python3 -m kdlab.cli bench --preset $PRESET $EXTRA --what throughput --warmup 10 --steps 60 --out "$OUT" \
        2>&1 | tee "$OUT/bench-throughput.log"
    timeout 200 python3 -m kdlab.cli bench --preset $PRESET $EXTRA --what kd --warmup 10 --steps 40 --out "$OUT" \
        2>&1 | tee "$OUT/bench-kd.log"
    ;;
grid)
    t0=$(date +%s); decode; t1=$(date +%s)
    timeout ${GRID_S:-430} python3 -m kdlab.cli grid --preset $PRESET $EXTRA --data-dir .data --runs-dir "$RUNS" --quiet 2>&1 | tee "$OUT/grid.log"
    echo "grid exit: ${PIPESTATUS[0]}" | tee -a "$OUT/grid.log"
    t2=$(date +%s)
    timeout 60 python3 -m kdlab.cli report --runs-dir "$RUNS" --compare-paper > "$OUT/study.md"
    timeout 60 python3 -m kdlab.cli report --runs-dir "$RUNS" --format json > "$OUT/study.json"
    t3=$(date +%s)
    cp "$RUNS/kdlab.db" "$OUT/" 2>/dev/null
    python3 benchmarks/grid_summary.py "$RUNS" "$OUT/grid-summary.json" --wall-s $((t3 - t0)) \
        --stage-s decode=$((t1 - t0)) --stage-s grid=$((t2 - t1)) --stage-s report=$((t3 - t2)) | tee -a "$OUT/grid.log"
    ;;
*)
    echo "unknown stage $stage: check, bench or grid" >&2; exit 2 ;;
esac
echo "stage $stage done at $(( $(date +%s) - t_start ))s"
done
echo "stages $stages done in $(( $(date +%s) - t_start ))s; files in $OUT:"; ls -la "$OUT"
