"""Names in the report: models by width, methods with their hyperparameters, recipes, and what each run is.

Display names are relative to the study's teacher width W, the width of the runs the study
distils from: `resnet18` at W, `resnet18_half` at W/2, `resnet18@0.25` otherwise (and always
`model@width` in a study without teachers). A method's label carries the hyperparameters that differ from its
preset (`kd(T=4, alpha=0.5)`), and a run's *recipe* is every other setting that differs from the
preset (`epochs=5`): runs of different recipes never share a study.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from kdlab import paper
from kdlab.config import LATER_FIELDS
from kdlab.errors import UserError
from kdlab.models.registry import display_name

if TYPE_CHECKING:
    from kdlab.store import RunRecord

# Config fields that name a run (or say where it ran) rather than how it was trained.
IDENTITY_FIELDS = frozenset({"preset", "model", "width", "dataset", "data_dir", "data_fingerprint", "data_info",
                             "method", "teacher", "teacher_path", "device", "seed", "eval_batch_size",
                             "weights", "tensorboard", "mlflow"})
METHOD_FIELDS = ("temperature", "alpha", "method_args")  # only distillation runs use these
_SHORT = {"temperature": "T"}


def is_deployment_run(config: dict[str, Any]) -> bool:
    """A run made by the deploy layer (export, int8, pruned recovery, QAT): not a study run, but a row of
    the deployment table (kdlab.deploy.table)."""
    return ("deploy" in config or str(config.get("model", "")).startswith("pruned:")
            or config.get("method") == "qat")


def family_rank(model: str) -> tuple[int, str]:
    """The paper's order (vgg16, resnet18, densenet121), then the other models by name."""
    return (paper.FAMILIES.index(model) if model in paper.FAMILIES else len(paper.FAMILIES), model)


def study_teacher_width(runs: Iterable[RunRecord], by_id: dict[str, RunRecord]) -> float | None:
    """W, from the runs themselves: the width of the study's teachers (runs some run distils from,
    or a grid planned as teachers; the widest if several). None when no run is a teacher."""
    widths = [r.config["width"] for r in runs if r.role == "teacher"]
    for r in runs:
        teacher = by_id.get(str(r.config.get("teacher") or "").partition("@")[0])
        if teacher is not None and teacher.config.get("method") == "ce":
            widths.append(teacher.config["width"])
    return max(widths, default=None)


@cache
def preset_config(preset: str, model: str) -> dict[str, Any]:
    from kdlab.configure import build_config

    try:
        return build_config(preset, model).to_dict()
    except UserError:  # a preset or model this kdlab does not know: compare with nothing
        return {}


def differences(cfg: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """'key=value' for each of `keys` where the run differs from its preset's value."""
    base = preset_config(str(cfg.get("preset")), str(cfg.get("model")))
    out = []
    for key in keys:
        value = cfg.get(key, LATER_FIELDS.get(key))  # a run stored before a field existed had its default
        if key == "method_args":
            out += [f"{k}={plain(v)}" for k, v in sorted((value or {}).items())]
        elif key not in base or base[key] != value:
            out.append(f"{_SHORT.get(key, key)}={plain(value)}")
    return out


def plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, list) else str(value)


def recipe(cfg: dict[str, Any]) -> str:
    keys = sorted(k for k in cfg if k not in IDENTITY_FIELDS and k not in METHOD_FIELDS)
    return ", ".join(differences(cfg, keys))


def method_label(cfg: dict[str, Any]) -> str:
    """The method's name, with its hyperparameters where they differ from the preset: `kd(T=4)`."""
    method = str(cfg.get("method"))
    if method == "ce":
        return method
    diffs = differences(cfg, METHOD_FIELDS)
    return f"{method}({', '.join(diffs)})" if diffs else method


@dataclass
class RunInfo:
    """What a run is within its study: its names, method label and teacher."""

    record: RunRecord
    name: str
    model: str
    width: float
    method: str
    seed: int
    teacher: str | None = None
    teacher_model: str | None = None
    teacher_width: float | None = None
    teacher_run: RunRecord | None = None

    @property
    def is_ce(self) -> bool:
        return self.method == "ce"

    @property
    def slot(self) -> tuple[str, str | None, str, int]:
        return (self.name, self.teacher, self.method, self.seed)

    @property
    def what(self) -> str:
        return slot_text(self.name, self.teacher, self.method)


def slot_text(name: str, teacher: str | None, method: str) -> str:
    """How a slot is named in the missing list: `resnet18_half <- vgg16 (kd)`."""
    if method == "ce":
        return f"{name} (ce, no KD)"
    return f"{name} <- {teacher} ({method})" if teacher else f"{name} ({method}, no teacher)"


def describe(r: RunRecord, tw: float | None, by_id: dict[str, RunRecord]) -> RunInfo:
    """A run's names and teacher within its study (`tw`: the study's teacher width, if it has one)."""
    cfg = r.config
    info = RunInfo(r, display_name(cfg["model"], cfg["width"], tw), cfg["model"], cfg["width"],
                 method_label(cfg), int(cfg["seed"]))
    ident = cfg.get("teacher")
    if info.is_ce or not ident:
        return info
    if ident.startswith("file:"):
        info.teacher = ident[:13]  # "file:" and 8 hex digits of the checkpoint's hash
        return info
    run_id, _, epoch = ident.partition("@")  # RUN@EPOCH: an early-stopped snapshot of that run (ESKD)
    t = by_id.get(run_id)
    if t is None:
        info.teacher = f"run:{ident[:8]}"
        return info
    name = display_name(t.config["model"], t.config["width"], tw) + (f"@ep{epoch}" if epoch else "")
    # A distilled teacher (a teacher assistant) is named with its method, so it never looks like a ce model.
    info.teacher = name if t.config["method"] == "ce" else f"{name}[{method_label(t.config)}]"
    info.teacher_model, info.teacher_width, info.teacher_run = t.config["model"], t.config["width"], t
    return info
