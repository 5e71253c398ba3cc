"""Finding a teacher: a finished run's id (or id prefix), RUN@EPOCH (a snapshot), a checkpoint file or a
module, loaded with its weights on the CPU. Used by `kdlab distill`, the grid and the deploy layer."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from kdlab.checkpoints import CHECKPOINT_FORMAT
from kdlab.errors import UserError
from kdlab.models import create_model
from kdlab.models.module_source import as_model, module_name
from kdlab.models.weights import file_identity, load_state, plain_state, read_checkpoint
from kdlab.store import Store, check_checkpoint, has_store


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
    if not has_store(runs_dir):
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
