#!/usr/bin/env bash
# Issue 11's deployment targets on a finished study:  bash benchmarks/deploy_check.sh RUNS_DIR
# RUNS_DIR must hold the study's runs with their checkpoints. On a device machine (bare at each call, no
# network) that means the same call as the study, e.g. `bash benchmarks/gpu_check.sh grid; bash
# benchmarks/deploy_check.sh /tmp/kdlab-runs` (gpu_check's RUNS), and the deploy extra carried as wheels
# (37 MB for CPython 3.12; check the device's Python first). Prepare here, in the repository root:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl onnx==1.23.2 \
#         onnxscript==0.7.2 onnx-ir==1.1.0 onnxruntime==1.32.0 torch-pruning==1.6.1 ml_dtypes==0.6.0 \
#         protobuf==7.36.2 flatbuffers==25.12.19
# and carry [".data", ".whl"] (18 + 37 MB, under the 64 MiB limit): this script installs them from .whl when
# onnxruntime is missing.
# For resnet18_half <- resnet18 and one other family (seed 0, kd): prune + KD recovery + int8, then targets
# 1-3 (accuracy, one-thread batch-1 latency against PyTorch eager, size), the CPU named, JSON in $OUT.
# Settings (environment):
#   EPOCHS=3      recovery (and, if int8 loses > 1 point, QAT) epochs: passes over the training set on the GPU,
#                 compile off, a few seconds each for these students. The rest is CPU work: ONNX exports, test-set
#                 accuracy in ONNX Runtime, quantization, latency (one second per setting). Estimated 1-1.5 min
#                 per family on a 16-core GPU machine (not yet run there; 57-85 s for both on a 2-core CPU with
#                 smoke-size models). More epochs recover more accuracy: EPOCHS=10.
#   PRUNE=0.3     fraction of channels removed per layer: FLOPs fall to 48-49% of the half-width students' (resnet18,
#                 vgg16, densenet121: counted on the architectures), ~(1-PRUNE)^2 in general
#   FAMILIES=resnet18,vgg16   LATENCY_SECONDS=1 (timed seconds per latency setting, at least)   THREADS=$(nproc)
#   OUT=benchmarks/results    DATA_DIR (where the study's data is now, if it moved)
set -euo pipefail
runs=${1:?usage: bash benchmarks/deploy_check.sh RUNS_DIR}
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -c "import onnxruntime, onnxscript, torch_pruning" 2>/dev/null || python3 -m pip install -q --no-index \
    --find-links .whl onnx onnxscript onnx-ir onnxruntime torch-pruning ml_dtypes protobuf flatbuffers
python3 benchmarks/deploy_check.py "$runs" --epochs "${EPOCHS:-3}" --prune "${PRUNE:-0.3}" \
    --families "${FAMILIES:-resnet18,vgg16}" --seconds "${LATENCY_SECONDS:-1}" \
    --threads "${THREADS:-$(nproc)}" --out "$OUT" ${DATA_DIR:+--data-dir "$DATA_DIR"} 2>&1 | tee "$OUT/deploy_check.log"
