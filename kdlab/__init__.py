"""kdlab: knowledge distillation for image classifiers.

The Python API mirrors the CLI (kdlab.api): `kdlab.train` and `kdlab.distill` (one run),
`kdlab.grid` (the study), `kdlab.report` (its tables), and `kdlab.export`,
`kdlab.compress`, `kdlab.latency` (deployment), `kdlab.list_models`, `kdlab.list_methods`
and `kdlab.benchmark` (what `kdlab models`, `methods` and `bench` print). Names are imported on
first use, so `import kdlab.models` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    **{name: "kdlab.api" for name in ("train", "distill", "grid", "report", "export", "compress",
                                      "latency", "list_models", "list_methods", "benchmark")},
    "kd_loss": "kdlab.losses", "RunRecord": "kdlab.store", "UserError": "kdlab.errors",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'kdlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
