"""Structured pruning with torch-pruning, then recovery by KD as an ordinary run of the loop.

torch-pruning (Fang et al. 2023, DepGraph) traces which channels depend on each other, so that
removing an output channel of a conv also removes it from the BatchNorm after it, from every
layer that reads it, from the other branch of a residual addition and from the right slice of a
DenseNet concatenation. `ratio` is the fraction of channels removed from every prunable layer
(the classifier's outputs are kept); FLOPs fall to roughly (1 - ratio)^2 of the model's, since a
conv's cost scales with both its input and its output channels. Channels are ranked by the L1 or
L2 norm of their filters (Li et al. 2017) or by their BatchNorm scale (Liu et al. 2017).

The pruned model is saved once (`kdlab.models.pruned`) and trained by the loop as model
`pruned:BASE`, distilled from a teacher: by default the run's own teacher, else the unpruned model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdlab.config import Config
from kdlab.deploy import require
from kdlab.deploy.runs import PRUNED_DIR, derived_config, finished_run, load_run_model
from kdlab.deploy.runtime import dataset_of, evaluation_loader, first_batch
from kdlab.errors import UserError
from kdlab.models import model_family
from kdlab.models.pruned import save_pruned
from kdlab.store import RunRecord, Store

CRITERIA = ("l1", "l2", "bn")
PRUNABLE = ("vgg", "resnet", "densenet", "pruned")  # families whose pruned models are tested


def check_ratio(ratio: float) -> None:
    if not 0 < ratio < 1:
        raise UserError(f"pruning ratio must be in (0, 1): the fraction of channels removed, got {ratio:g}")


def check_trained(record: RunRecord) -> None:
    """Deployment fine-tunes trained float models: not an ONNX model, not one that is QAT already."""
    cfg = record.config
    if "deploy" in cfg:
        raise UserError(f"run {record.run_id} is an ONNX model: give the trained run it came from, "
                        f"{cfg['deploy']['source']}")
    if cfg.get("method") == "qat":
        raise UserError(f"run {record.run_id} is quantization-aware already: prune or quantize the run it came "
                        f"from, {cfg.get('teacher')}")


def check_prunable(record: RunRecord) -> None:
    """Refuse, before any work, what the pruner cannot take."""
    check_trained(record)
    family = model_family(record.config["model"])
    if family not in PRUNABLE:
        raise UserError(f"model {record.config['model']} (family {family!r}) cannot be pruned: kdlab prunes the "
                        f"families {', '.join(PRUNABLE[:-1])} (their channel dependencies are tested)")


def prune_model(model: nn.Module, example: torch.Tensor, ratio: float, criterion: str) -> None:
    """Remove `ratio` of the channels of every prunable layer of `model` (in place, eval mode)."""
    tp = require("torch_pruning")
    if criterion not in CRITERIA:
        raise UserError(f"unknown pruning criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    importance = {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
                  "l2": lambda: tp.importance.MagnitudeImportance(p=2),
                  "bn": tp.importance.BNScaleImportance}[criterion]()
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]  # its outputs are the classes
    model.eval()
    with torch.no_grad():
        before = model(example).shape
    try:
        pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio,
                                      ignored_layers=classifier)
        pruner.step()
        with torch.no_grad():
            after = model(example).shape
    except Exception as e:  # noqa: BLE001 (a graph the pruner cannot follow fails in many ways)
        raise UserError(f"torch-pruning cannot prune this model: {type(e).__name__}: {e}") from None
    if after != before:
        raise UserError(f"pruning changed the model's output shape {tuple(before)} -> {tuple(after)}")


def resolve_teacher(store: Store, parent: RunRecord, spec: str | None) -> tuple[nn.Module, str, str]:
    """The recovery's teacher: `spec` (a run, RUN@EPOCH or a checkpoint file), else the parent's own
    teacher, else the unpruned parent itself. Returns (model, identity, path of its weights)."""
    from kdlab.teacher_lookup import load_teacher

    cfg = parent.config
    if spec is None and cfg.get("teacher"):
        ident = str(cfg["teacher"])
        spec = cfg.get("teacher_path") if ident.startswith("file:") else ident
    if spec is None:
        return load_run_model(parent, store.root), parent.run_id, str(parent.checkpoint)
    if "@" not in spec and store.find(spec) is not None:
        teacher = finished_run(store, spec)
        return load_run_model(teacher, store.root), teacher.run_id, str(teacher.checkpoint)
    model, ident, path = load_teacher(spec, store.root)
    return model, ident, str(path)


def recovery_config(parent: RunRecord, base: str, args: dict[str, Any], teacher: tuple[str, str], epochs: int,
                    lr: float, overrides: dict[str, Any], data_dir: str | None) -> Config:
    """The recovery run: the parent's recipe, fine-tuned with KD at a tenth of the lr, cosine schedule."""
    changes = {"model": f"pruned:{base}", "model_args": args, "method": "kd", "method_args": {},
               "teacher": teacher[0], "teacher_path": teacher[1], "epochs": epochs, "lr": lr,
               "scheduler": "cosine", "warmup": 0.0, "snapshots": []}
    return derived_config(parent, changes, overrides, data_dir)


def prune_run(store: Store, parent: RunRecord, ratio: float, criterion: str = "l1", *, epochs: int,
              lr: float, teacher: str | None = None, overrides: dict[str, Any] | None = None,
              data_dir: str | None = None, quiet: bool = True, silent: bool = False) -> RunRecord:
    """Prune a finished run's model and recover it with KD: the recovery run (trained, resumed or
    returned as it is, like any run)."""
    from kdlab.training import execute

    check_ratio(ratio)
    check_prunable(parent)
    teacher_model, ident, path = resolve_teacher(store, parent, teacher)
    model = load_run_model(parent, store.root)
    if teacher_model.num_classes != model.num_classes:
        raise UserError(f"teacher {ident} has {teacher_model.num_classes} classes, the pruned model "
                        f"{model.num_classes}")
    base = parent.config["model"].removeprefix("pruned:")
    trial = {"parent": parent.run_id, "ratio": ratio, "criterion": criterion, "sha256": "", "path": ""}
    recovery_config(parent, base, trial, (ident, path), epochs, lr, overrides or {}, data_dir)  # fail before work
    dataset = dataset_of(parent.config, data_dir)
    prune_model(model, first_batch(evaluation_loader(parent.config, dataset), 2), ratio, criterion)
    digest, file = save_pruned(model, {"model": base, "width": float(parent.config["width"]),
                                       "num_classes": int(model.num_classes)}, store.root / PRUNED_DIR)
    args = {"parent": parent.run_id, "ratio": ratio, "criterion": criterion, "sha256": digest, "path": str(file)}
    cfg = recovery_config(parent, base, args, (ident, path), epochs, lr, overrides or {}, data_dir)
    label = f"{parent.label or parent.run_id} | pruned {ratio:g} {criterion}, kd {epochs} ep"
    return execute(cfg, store.root, teacher_model=teacher_model, quiet=quiet, silent=silent, label=label)
