"""The Python API: everything the CLI does, callable from a notebook; the CLI is a thin layer over it.

    import kdlab
    teacher = kdlab.train("resnet18", preset="smoke", dataset="synthetic")
    student = kdlab.distill(teacher.run_id, "resnet18", preset="smoke", dataset="synthetic")
    study = kdlab.grid(["resnet18"], ["vgg16"], preset="smoke", dataset="synthetic")
    print(kdlab.report().text())

`train` and `distill` run one run, `grid` a study, `report` reads runs dirs into the paper's tables,
`merge` combines runs dirs, and `export`, `compress`, `latency` (kdlab.deploy.api) deploy a run.
Nothing inside kdlab imports this module: it sits on top of the layers it calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kdlab.catalog import benchmark, list_methods, list_models
from kdlab.config import PRESET_WIDTHS
from kdlab.data import DataIdentity, Dataset
from kdlab.data.arrays import array_identity, as_dataset
from kdlab.data.checks import check_teacher_data
from kdlab.deploy.api import compress, export, latency
from kdlab.errors import UserError
from kdlab.models.module_source import register_module
from kdlab.store import RunRecord, default_runs_dir, runs_dir_or_default
from kdlab.study import GridResult, StudyReport, demo, grid, merge, report
from kdlab.teacher_lookup import FoundTeacher, load_teacher
from kdlab.training import execute, resolve_config

__all__ = [
    "FoundTeacher", "GridResult", "StudyReport", "as_model_name", "benchmark", "compress", "default_runs_dir",
    "default_width", "demo", "distill", "execute", "export", "grid", "latency", "list_methods", "list_models",
    "load_teacher", "merge", "report", "resolve_config", "train",
]


def train(model: str | nn.Module = "resnet18", *, data: Any = None, preset: str = "paper",
          config: str | Path | None = None, runs_dir: str | Path | None = None, quiet: bool = True,
          verbose: bool = False, **overrides: Any) -> RunRecord:
    """Train `model` from scratch with cross-entropy; returns the stored run (resumed or reused if known).

    `model` is a registered name (``resnet18``, ``timm:resnet50``, ``torchvision:mobilenet_v3_small``)
    or any ``nn.Module`` returning logits. `data` is a dataset name or folder (as `dataset=`), a
    `kdlab.data.Dataset`, or arrays (see `kdlab.data.arrays.as_dataset`). `overrides` are Config
    fields (width, dataset, data_dir, epochs, seed, lr, ...). With verbose=False nothing is printed.
    """
    model = as_model_name(model)
    dataset, identity = _use_data(data, overrides)
    if overrides.get("width") is None:
        overrides["width"] = default_width(model, _preset(preset), teacher=True)
    cfg = resolve_config(preset, model, config, overrides, identity)
    return execute(cfg, runs_dir, dataset=dataset, quiet=quiet, silent=not verbose)


def distill(teacher: str | Path | nn.Module | None, student: str | nn.Module = "resnet18", *, data: Any = None,
            teacher_model: str | None = None, teacher_width: float | None = None,
            teacher_model_args: dict[str, Any] | None = None, trust_checkpoint: bool = False, method: str = "kd",
            preset: str = "paper", config: str | Path | None = None, runs_dir: str | Path | None = None,
            quiet: bool = True, verbose: bool = False, allow_other_data: bool = False,
            **overrides: Any) -> RunRecord:
    """Train `student` distilled from `teacher`; returns the stored run.

    `teacher` is a run id, a checkpoint file or an ``nn.Module`` (its current weights; part of the
    run's identity); `student` a model name or an ``nn.Module`` (its initial weights); `data` as for
    `train`. The default method is the paper's equation (2) (`kd`); `temperature` and `alpha` are
    overrides. A plain state-dict checkpoint needs `teacher_model` (and `teacher_width`,
    `teacher_model_args`) to know its architecture; a whole pickled model is loaded only with
    `trust_checkpoint` (unpickling runs code from the file). Online and self distillation (`dml`,
    `byot`) take no teacher: pass None. A teacher trained on other data (another fingerprint, or
    images of another size) is refused unless `allow_other_data`.
    """
    student = as_model_name(student)
    dataset, identity = _use_data(data, overrides)
    if overrides.get("width") is None:
        overrides["width"] = default_width(student, _preset(preset), teacher=False)
    runs = runs_dir_or_default(runs_dir)
    if teacher is None:
        # check_config says so in one line if this method needs a teacher after all.
        cfg = resolve_config(preset, student, config, {**overrides, "method": method}, identity)
        return execute(cfg, runs, dataset=dataset, quiet=quiet, silent=not verbose)
    found = load_teacher(teacher, runs, teacher_model, teacher_width, teacher_model_args, trust_checkpoint)
    overrides.update(method=method, teacher=found.identity, teacher_path=str(found.path) if found.path else None)
    cfg = resolve_config(preset, student, config, overrides, identity)
    check_teacher_data(found.config, cfg, allow_other_data)
    # The teacher's classes against the data's: checked with the models, before anything is written.
    return execute(cfg, runs, teacher_model=found.model, dataset=dataset, quiet=quiet, silent=not verbose)


def as_model_name(model: str | nn.Module) -> str:
    """A model's registered name; an ``nn.Module`` is registered as ``module:ClassName.digest``."""
    if isinstance(model, nn.Module):
        return register_module(model)
    if not isinstance(model, str):
        raise UserError(f"a model is a name or an nn.Module, not a {type(model).__name__}")
    return model


def default_width(model: str, preset: str, teacher: bool) -> float:
    """The preset's teacher or student width for kdlab's own models; models from elsewhere are built
    as named (width 1)."""
    if ":" in model:
        return 1.0
    return PRESET_WIDTHS[preset][0 if teacher else 1]


def _use_data(data: Any, overrides: dict[str, Any]) -> tuple[Dataset | None, DataIdentity | None]:
    """`data=`: a name or folder becomes the `dataset` setting; arrays and Dataset objects are used
    as they are, identified by their content's fingerprint like any dataset."""
    if data is None:
        return None, None
    if isinstance(data, (str, Path)):
        overrides["dataset"] = str(data)
        return None, None
    dataset = as_dataset(data)
    identity = array_identity(dataset)
    overrides["dataset"] = identity.location
    return dataset, identity


def _preset(preset: str) -> str:
    if preset not in PRESET_WIDTHS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESET_WIDTHS)}")
    return preset
