"""Deployment: from a distilled student to a model that is served, a layer above the store.

    runs.py      which runs deployment reads and makes: finding them, loading their models, recording
    export.py    a run's model to ONNX, checked with onnx.checker and against PyTorch
    runtime.py   ONNX Runtime sessions, test-set accuracy and calibration batches
    prune.py     structured pruning with torch-pruning, recovered by KD as a `pruned:` run
    quantize.py  int8 static QDQ quantization with ONNX Runtime
    latency.py   median and p90 latency and throughput, ONNX Runtime and PyTorch
    compress.py  `kdlab compress` and `kdlab grid --compress`: the steps in order
    table.py     the report's deployment table and accuracy-vs-latency plot

Every model made here is a run in the store (an ONNX export or an int8 model is a run whose
accuracy is measured in ONNX Runtime; a pruned or quantization-aware model is trained by the one
training loop), so grid, report and resume apply to them as to any run. The libraries are the
`kdlab[deploy]` extra; without it these commands say in one line what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kdlab.errors import UserError

INSTALL = 'pip install "kdlab[deploy]"'


def require(module: str) -> ModuleType:
    """Import an optional dependency of the deploy layer, or say in one line how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this needs the {module} package: {INSTALL} (onnx, onnxruntime, onnxscript, "
                        "torch-pruning)") from None
