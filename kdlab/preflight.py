"""Checks that a run can start, made before anything is written (no database row, no file).

A teacher for other classes, a model that does not run on the data's images or returns the wrong
number of logits, bad constructor arguments, weights that do not fit, or a model without the stage
features its method reads: each is one line, and the runs database stays as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.config import Config
from kdlab.data.datasets import Dataset
from kdlab.errors import UserError
from kdlab.methods import METHODS
from kdlab.models import create_model
from kdlab.models.foreign import dry_run
from kdlab.models.weights import load_initial_weights


def preflight(cfg: Config, dataset: Dataset, teacher: nn.Module | None) -> None:
    """Build what the run will build (on the CPU, RNG untouched) and check that it fits together."""
    image_hw = tuple(dataset.train.images.shape[1:3])
    n = dataset.num_classes
    if teacher is not None:
        name = getattr(teacher, "name", "") or cfg.teacher
        if getattr(teacher, "num_classes", None) is None:
            teacher.num_classes = count_logits(teacher, image_hw, f"teacher {name}")
        if teacher.num_classes != n:
            raise UserError(f"teacher {name} has {teacher.num_classes} classes but the data ({cfg.dataset}) has {n}: "
                            f"{other_classes_way_out(teacher, cfg)}")
    with torch.random.fork_rng(devices=[]):
        student = create_model(cfg.model, cfg.width, n, **cfg.model_args)
        if cfg.weights:
            load_initial_weights(student, cfg.weights)
        logits = count_logits(student, image_hw, f"student {cfg.model}")
        if logits != n:
            raise UserError(f"student {cfg.model} returns {logits} logits but the data ({cfg.dataset}) has {n} classes")
        METHODS[cfg.method](cfg, student, teacher)  # a method reading stage features says so if there are none


def other_classes_way_out(teacher: nn.Module, cfg: Config) -> str:
    """What to do with a teacher for other classes (an ImageNet model, say): fine-tune it on this data
    first, re-headed for its classes, and distil from that run; or distil on the teacher's own data."""
    name = getattr(teacher, "name", "") or ""
    if not cfg.teacher_path or not name or name.startswith("module:") or cfg.dataset.startswith("arrays:"):
        return ("fine-tune it on this data first (a new classifier for these classes) and distil from that run, "
                "or distill on the data the teacher was trained on")
    width = getattr(teacher, "width", 1.0)
    return (f"fine-tune it on this data first, `kdlab train {name}{'' if width == 1.0 else f' --width {width:g}'} "
            f"--dataset {cfg.dataset} --set weights={cfg.teacher_path}` (its classifier starts afresh for these "
            "classes), then distil with --teacher RUN, that run's id; or distill on the data the teacher was "
            "trained on")


def count_logits(model: nn.Module, image_hw: tuple[int, int], what: str) -> int:
    """How many logits ``model`` returns for an image of the data's size (eval mode, no gradients)."""
    try:
        with dry_run(model, image_hw, batch=2) as x:
            out = model(x)
    except Exception as e:  # noqa: BLE001 (whatever the model raises on this input)
        raise UserError(f"{what} cannot run on {image_hw[0]}x{image_hw[1]} images: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise UserError(f"{what} must return logits (batch, classes), got "
                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return int(out.shape[1])
