"""kdlab: knowledge distillation for image classifiers.

The Python API mirrors the CLI: `kdlab.train` and `kdlab.distill` here, the study in
`kdlab.grid` (plan, run_grid) and `kdlab.report` (report, build_report, render).
Names are imported on first use, so `import kdlab.models` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "train": "kdlab.api", "distill": "kdlab.api", "kd_loss": "kdlab.losses", "RunRecord": "kdlab.store",
    "UserError": "kdlab.errors",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'kdlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
