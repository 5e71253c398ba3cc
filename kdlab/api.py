"""The Python API: everything the CLI does, callable from a notebook.

    import kdlab
    teacher = kdlab.train("resnet18", preset="smoke", dataset="synthetic")
    student = kdlab.distill(teacher.run_id, "resnet18", preset="smoke", dataset="synthetic")
    print(student.final_acc)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kdlab.config import PRESET_WIDTHS, Config, bind_dataset, build_config, load_yaml
from kdlab.data import load_dataset
from kdlab.data.checks import check_teacher_data, check_unchanged
from kdlab.errors import UserError, warn
from kdlab.loop import CHECKPOINT_FORMAT, prepare_teacher
from kdlab.loop import run as run_training
from kdlab.models import StagedModel, create_model, input_size_note
from kdlab.progress import live_session
from kdlab.store import DB_NAME, RunRecord, Store


def default_runs_dir() -> Path:
    """$KDLAB_RUNS_DIR if set, else ./runs."""
    return Path(os.environ.get("KDLAB_RUNS_DIR", "runs"))


def train(model: str = "resnet18", *, preset: str = "paper", config: str | Path | None = None,
          runs_dir: str | Path | None = None, quiet: bool = True, verbose: bool = False,
          **overrides: Any) -> RunRecord:
    """Train `model` from scratch with cross-entropy; returns the stored run (resumed or reused if known).

    `overrides` are Config fields (width, dataset, data_dir, epochs, seed, lr, ...). With
    verbose=False nothing is printed.
    """
    if overrides.get("width") is None:
        overrides["width"] = PRESET_WIDTHS[_preset(preset)][0]
    cfg = resolve_config(preset, model, config, overrides)
    return execute(cfg, runs_dir, quiet=quiet, silent=not verbose)


def distill(teacher: str | Path | None, student: str = "resnet18", *, teacher_model: str | None = None,
            teacher_width: float | None = None, method: str = "kd", preset: str = "paper",
            config: str | Path | None = None, runs_dir: str | Path | None = None, quiet: bool = True,
            verbose: bool = False, allow_other_data: bool = False, **overrides: Any) -> RunRecord:
    """Train `student` distilled from `teacher` (a run id or a checkpoint file); returns the stored run.

    The default method is the paper's equation (2) (`kd`); `temperature` and `alpha` are overrides.
    A raw state-dict checkpoint needs `teacher_model` (and `teacher_width`) to know its architecture.
    Online and self distillation (`dml`, `byot`) take no teacher: pass None. A teacher trained on
    other data (another fingerprint, or images of another size) is refused unless `allow_other_data`.
    """
    if overrides.get("width") is None:
        overrides["width"] = PRESET_WIDTHS[_preset(preset)][1]
    runs = Path(runs_dir) if runs_dir else default_runs_dir()
    if teacher is None:
        # check_config says so in one line if this method needs a teacher after all.
        cfg = resolve_config(preset, student, config, {**overrides, "method": method})
        return execute(cfg, runs, quiet=quiet, silent=not verbose)
    found = load_teacher(teacher, runs, teacher_model, teacher_width)
    overrides.update(method=method, teacher=found.identity, teacher_path=str(found.path))
    cfg = resolve_config(preset, student, config, overrides)
    classes = cfg.data_info["classes"]
    if found.model.num_classes != classes:
        raise UserError(f"teacher has {found.model.num_classes} classes but dataset {cfg.dataset!r} has "
                        f"{classes}: distill on the data the teacher was trained on")
    check_teacher_data(found.config, cfg, allow_other_data)
    return execute(cfg, runs, teacher_model=found.model, quiet=quiet, silent=not verbose)


def _preset(preset: str) -> str:
    if preset not in PRESET_WIDTHS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESET_WIDTHS)}")
    return preset


def resolve_config(preset: str, model: str, config: str | Path | None, overrides: dict[str, Any]) -> Config:
    """Preset, then the YAML file, then explicit overrides (None values mean 'not given'); then the
    dataset is identified by its content (`bind_dataset`), which the run's id covers."""
    file_values = load_yaml(config) if config else {}
    return bind_dataset(build_config(preset, model, file_values, {k: v for k, v in overrides.items() if v is not None}))


def execute(cfg: Config, runs_dir: str | Path | None, *, teacher_model: StagedModel | None = None,
            quiet: bool = True, silent: bool = False, label: str | None = None) -> RunRecord:
    """Run a resolved config against a runs directory; a finished run returns at once."""
    runs = Path(runs_dir) if runs_dir else default_runs_dir()
    if (runs / DB_NAME).exists():
        existing = Store(runs, readonly=True)
        done = existing.get(cfg.run_hash())
        existing.close()
        if done is not None and done.status == "done":
            return done
    # Load the data before touching the database: a bad data dir must leave it unchanged.
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    check_unchanged(dataset, cfg)
    note = input_size_note(cfg.model, dataset.train.images.shape[1:3])
    if note:
        warn(note)
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

    model: StagedModel  # weights loaded, on the CPU
    identity: str  # what the student's config names it by: a run id, RUN@EPOCH, or 'file:<sha256 prefix>'
    path: Path  # where its weights are
    config: dict[str, Any] | None  # the config it was trained with (None for a bare state dict)


def load_teacher(spec: str | Path, runs_dir: Path, model_name: str | None = None,
                 width: float | None = None) -> FoundTeacher:
    """Find a teacher: a finished run's id (or id prefix), RUN@EPOCH (a snapshot), or a checkpoint file."""
    path = Path(spec)
    if path.is_file():
        return _teacher_from_file(path, model_name, width)
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


def _teacher_from_file(path: Path, model_name: str | None, width: float | None) -> FoundTeacher:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unpickling failure means "not a checkpoint")
        raise UserError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}): give a kdlab checkpoint "
                        "or a state dict saved with torch.save") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        info, state = ckpt["model"], ckpt["student"]
        if model_name and model_name != info["name"]:
            raise UserError(f"checkpoint {path} holds a {info['name']}, not a {model_name}")
        if width is not None and width != info["width"]:
            raise UserError(f"checkpoint {path} holds width {info['width']:g}, not {width:g}")
        model_name, width, num_classes = info["name"], info["width"], info["num_classes"]
        config = ckpt.get("config")
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if not model_name:
            raise UserError(f"{path} is a bare state dict: name its architecture with --teacher-model")
        state, width, config = ckpt, width or 1.0, None
        num_classes = _linear_out(state)
    else:
        raise UserError(f"{path} is not a kdlab checkpoint or a model state dict")
    model = create_model(model_name, width, num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {path} does not fit {model_name} at width {width:g}: {first}") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return FoundTeacher(model, f"file:{digest}", path, config)


def _linear_out(state: dict[str, torch.Tensor]) -> int:
    """Number of classes of a bare state dict: the rows of its last 2-D weight."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(weights[-1].shape[0]) if weights else 10
