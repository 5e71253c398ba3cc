"""The Python API: everything the CLI does, callable from a notebook.

    import kdlab
    teacher = kdlab.train("resnet18", preset="smoke", dataset="synthetic")
    student = kdlab.distill(teacher.run_id, "resnet18", preset="smoke", dataset="synthetic")
    print(student.final_acc)
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from kdlab.checkpoints import CHECKPOINT_FORMAT
from kdlab.config import PRESET_WIDTHS, Config, load_yaml
from kdlab.configure import bind_dataset, build_config
from kdlab.data import DataIdentity, Dataset, dataset_for
from kdlab.data.arrays import array_identity, as_dataset
from kdlab.data.checks import check_teacher_data, check_unchanged
from kdlab.data.residency import input_size
from kdlab.errors import UserError, warn
from kdlab.loggers.base import log_finished
from kdlab.loop import prepare_teacher
from kdlab.loop import run as run_training
from kdlab.models import create_model, input_size_note
from kdlab.models.module_source import as_model, module_name, register_module
from kdlab.models.weights import file_identity, load_state, plain_state, read_checkpoint
from kdlab.preflight import preflight
from kdlab.progress import live_session
from kdlab.store import DB_NAME, RunRecord, Store, check_checkpoint


def default_runs_dir() -> Path:
    """$KDLAB_RUNS_DIR if set, else ./runs."""
    return Path(os.environ.get("KDLAB_RUNS_DIR", "runs"))


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
    runs = Path(runs_dir) if runs_dir else default_runs_dir()
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


def resolve_config(preset: str, model: str, config: str | Path | None, overrides: dict[str, Any],
                   identity: DataIdentity | None = None) -> Config:
    """Preset, then the YAML file, then explicit overrides (None values mean 'not given'); then the
    dataset is identified by its content (`bind_dataset`; `identity` when already known), which the
    run's id covers."""
    file_values = load_yaml(config) if config else {}
    cfg = build_config(preset, model, file_values, {k: v for k, v in overrides.items() if v is not None})
    return bind_dataset(cfg, identity)


def execute(cfg: Config, runs_dir: str | Path | None, *, teacher_model: nn.Module | None = None,
            dataset: Dataset | None = None, quiet: bool = True, silent: bool = False,
            label: str | None = None) -> RunRecord:
    """Run a resolved config against a runs directory; a finished run returns at once."""
    runs = Path(runs_dir) if runs_dir else default_runs_dir()
    if (runs / DB_NAME).exists():
        existing = Store(runs, readonly=True)
        done = existing.get(cfg.run_hash())
        existing.close()
        if done is not None and done.status == "done":
            log_finished(cfg, done, label, runs)  # e.g. --mlflow on a run finished before: its stored record
            return done
    # Load the data and check the models before touching the database: a bad data dir, a teacher for
    # other classes or a model without the features its method needs must leave it unchanged.
    if dataset is None:
        dataset = dataset_for(cfg)
    check_unchanged(dataset, cfg)
    note = input_size_note(cfg.model, input_size(cfg, dataset.train.images.shape[1:3]))
    if note:
        warn(note)
    preflight(cfg, dataset, teacher_model)
    store = Store(runs)
    teacher = prepare_teacher(teacher_model, cfg, cfg.teacher) if teacher_model is not None else None
    try:
        with live_session():
            record = run_training(cfg, store, teacher=teacher, dataset=dataset, quiet=quiet, silent=silent,
                                  label=label)
    finally:
        store.close()
    return record


class FoundTeacher(NamedTuple):
    """A teacher as found by `load_teacher`."""

    model: nn.Module  # weights loaded, on the CPU
    identity: str  # what the student's config names it by: a run id, RUN@EPOCH, 'file:<sha256 prefix>' or a module's
    path: Path | None  # where its weights are (None for a module)
    config: dict[str, Any] | None  # the config it was trained with (None for a state dict or a module)


def load_teacher(spec: str | Path | nn.Module, runs_dir: Path, model_name: str | None = None,
                 width: float | None = None, model_args: dict[str, Any] | None = None,
                 trust: bool = False) -> FoundTeacher:
    """Find a teacher: a finished run's id (or id prefix), RUN@EPOCH (a snapshot), a checkpoint file,
    or a module (identified as 'module:<name>.<digest>' of its structure and weights)."""
    if isinstance(spec, nn.Module):  # a copy: the run freezes and moves its teacher, not the caller's module
        name = module_name(spec)
        return FoundTeacher(as_model(copy.deepcopy(spec), name, getattr(spec, "num_classes", None)), name, None, None)
    path = Path(spec)
    if path.is_file():
        return _teacher_from_file(path, model_name, width, model_args, trust)
    run_part, _, epoch_part = str(spec).partition("@")
    if epoch_part and not epoch_part.isdigit():
        raise UserError(f"teacher {spec!r}: after '@' comes an epoch number (RUN@EPOCH, an early-stopped teacher)")
    if not (runs_dir / DB_NAME).exists():
        raise UserError(f"teacher {spec!r} is neither a checkpoint file nor a run (no runs database in {runs_dir})")
    store = Store(runs_dir, readonly=True)
    record = store.find(run_part)
    store.close()
    if record is None:
        raise UserError(f"teacher {spec!r} is neither a checkpoint file nor a run in {runs_dir}")
    if epoch_part:
        # ESKD: a snapshot taken before the teacher finished (kept with --set snapshots=[E]).
        snapshot = store.checkpoint_path(record.run_id, int(epoch_part))
        if not snapshot.exists():
            raise UserError(f"run {record.run_id} kept no snapshot after epoch {epoch_part}: train the teacher "
                            f"with --set snapshots=[{epoch_part}]")
        found = _teacher_from_file(snapshot, model_name, width)
        return found._replace(identity=f"{record.run_id}@{epoch_part}", config=record.config)
    if record.status != "done" or record.checkpoint is None:
        raise UserError(f"teacher run {record.run_id} is not finished (status {record.status}): train it first")
    return _teacher_from_file(Path(record.checkpoint), model_name, width)._replace(identity=record.run_id,
                                                                                  config=record.config)


def _teacher_from_file(path: Path, model_name: str | None, width: float | None,
                       model_args: dict[str, Any] | None = None, trust: bool = False) -> FoundTeacher:
    ckpt = read_checkpoint(path, trust)
    identity = file_identity(path)
    if isinstance(ckpt, nn.Module):  # a whole pickled model (only read with trust)
        name = model_name or type(ckpt).__name__
        return FoundTeacher(as_model(ckpt, name, getattr(ckpt, "num_classes", None)), identity, path, None)
    state, config = plain_state(ckpt), None
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        check_checkpoint(ckpt, path)
        info, state, config = ckpt["model"], ckpt["student"], ckpt.get("config")
        if model_name and model_name != info["name"]:
            raise UserError(f"checkpoint {path} holds a {info['name']}, not a {model_name}")
        if width is not None and width != info["width"]:
            raise UserError(f"checkpoint {path} holds width {info['width']:g}, not {width:g}")
        model_name, width, num_classes = info["name"], info["width"], info["num_classes"]
        model_args = (config or {}).get("model_args") or {}
    elif state is not None:
        if not model_name:
            raise UserError(f"{path} is a bare state dict: name its architecture with --teacher-model")
        width, num_classes = width or 1.0, _linear_out(state)
    else:
        raise UserError(f"{path} is not a kdlab checkpoint or a model state dict")
    model = create_model(model_name, width, num_classes, **(model_args or {}))
    load_state(model, state, f"checkpoint {path}")
    return FoundTeacher(model, identity, path, config)


def _linear_out(state: dict[str, torch.Tensor]) -> int:
    """Number of classes of a bare state dict: the rows of its last 2-D weight."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(weights[-1].shape[0]) if weights else 10
