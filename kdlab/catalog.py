"""What kdlab can train and measure, as data: the model zoo (`kdlab models`), the methods
(`kdlab methods`) and the engine's benchmark (`kdlab bench`). The commands print what these return.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdlab.errors import UserError


def list_models(names: Sequence[str] = (), widths: Sequence[float] = (1.0, 0.5), num_classes: int = 10,
                image_size: int = 32) -> list[dict[str, Any]]:
    """One row per model and width: name, width, params, paper_params, flops, image_size, note.
    `names` default to kdlab's own models; models of other libraries (timm:, torchvision:) are listed
    at width 1, built as named."""
    from kdlab.models.listing import describe

    if image_size < 1 or num_classes < 1:
        raise UserError("--image-size and --num-classes must be >= 1")
    return describe(list(names), list(widths), num_classes, image_size)


def list_methods() -> list[dict[str, Any]]:
    """The registered methods: name, whether they need a teacher or features, their arguments with
    defaults, paper, the setting the defaults come from, notes and version."""
    from kdlab.methods import METHODS

    return [{"name": name, "teacher": cls.needs_teacher, "features": cls.uses_features, "args": cls.defaults,
             "paper": cls.paper, "setting": cls.setting, "notes": cls.notes, "version": cls.version}
            for name, cls in sorted(METHODS.items())]


def benchmark(models: Sequence[str], *, preset: str = "fast", what: Sequence[str] = ("throughput", "kd"),
              warmup: int = 20, steps: int = 50, settings: dict[str, Any] | None = None,
              out: str | Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """The engine's speed against a plain eager loop (`throughput`) and KD's cost against the student
    alone (`kd`), on this machine; with `out`, the results also go to a JSON file there, whose path is
    returned beside them (see kdlab.bench)."""
    from kdlab import bench as engine_bench
    from kdlab.outputs import writable_dir

    folder = writable_dir(out, "--out") if out is not None else None
    if warmup < 0 or steps < 1:
        raise UserError("--warmup must be >= 0 and --steps >= 1")
    if not set(what) <= {"throughput", "kd"}:
        raise UserError(f"--what takes throughput and/or kd, got {','.join(what)!r}")
    settings = settings or {}
    results: dict[str, Any] = {"environment": engine_bench.environment(), "preset": preset,
                               "overrides": settings, "warmup": warmup, "steps": steps}
    if "throughput" in what:
        results["throughput"] = engine_bench.throughput(list(models), preset, warmup, steps, settings)
    if "kd" in what:
        results["kd_overhead"] = engine_bench.kd_overhead(list(models), list(models), preset, warmup, steps, settings)
    return results, engine_bench.write_results(results, folder) if folder is not None else None
