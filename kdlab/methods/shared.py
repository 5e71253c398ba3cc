"""What the distillation methods share: argument checks, stage choice, and per-batch output caches.

The caches (`SharedStudent`, `SharedTeacher`) are how `combo` runs the student and the teacher
once per batch whatever its parts ask for: each part receives the proxies in place of the real
student and teacher, and the first request computes what every part needs.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import UserError

if TYPE_CHECKING:
    from kdlab.config import Config
    from kdlab.data.loader import Batch
    from kdlab.teacher import Teacher


# --- argument checks -----------------------------------------------------------------------------


def method_args(cls: Any, cfg: Config) -> dict[str, Any]:
    """The method's arguments: its defaults overridden by `cfg.method_args` (as `Method` reads them)."""
    return {**cls.defaults, **cfg.method_args}


def check_weights(method: str, args: dict[str, Any], names: tuple[str, ...]) -> None:
    """Each named argument must be a finite number >= 0 (a loss weight, a temperature...)."""
    for name in names:
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise UserError(f"method {method!r}: {name} must be a number, got {value!r}")
        if value < 0:
            raise UserError(f"method {method!r}: {name} must be >= 0, got {value!r}")


def check_positive(method: str, args: dict[str, Any], names: tuple[str, ...]) -> None:
    """Each named argument must be a finite number > 0 (a temperature, an exponent)."""
    check_weights(method, args, names)
    for name in names:
        if args[name] <= 0:
            raise UserError(f"method {method!r}: {name} must be > 0, got {args[name]!r}")


def check_int(method: str, args: dict[str, Any], name: str, *, minimum: int | None = None,
              optional: bool = False) -> None:
    """The argument must be an integer (or null when `optional`), at least `minimum` if given."""
    value = args[name]
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an integer or null" if optional else "an integer"
        raise UserError(f"method {method!r}: {name} must be {kind}, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"method {method!r}: {name} must be >= {minimum}, got {value!r}")


def check_stage_list(method: str, args: dict[str, Any], name: str) -> None:
    """The argument must be a non-empty list of integer stage indices (negative counts from the end)."""
    value = args[name]
    if (not isinstance(value, (list, tuple)) or not value
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise UserError(f"method {method!r}: {name} must be a non-empty list of stage indices, got {value!r}")


# --- stages ----------------------------------------------------------------------------------------


def resolve_stage(method: str, index: int | None, model: nn.Module, role: str) -> int:
    """A stage index of `model` (None: its middle stage, rounded toward the input), range-checked.

    Negative indices count from the last stage, as in Python.
    """
    n = len(model.stage_channels())
    if index is None:
        return (n - 1) // 2
    if not -n <= index < n:
        raise UserError(f"method {method!r}: the {role} ({model_name(model)}) has {n} stages "
                        f"(0..{n - 1}), so stage {index} does not exist")
    return index % n


def relative_depth(index: int, n_from: int, n_to: int) -> int:
    """The stage of an `n_to`-stage model at the same relative depth as stage `index` of an
    `n_from`-stage model (first maps to first, last to last)."""
    if n_from == 1:
        return n_to - 1
    return round(index * (n_to - 1) / (n_from - 1))


def stage_pairs(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """min(n_s, n_t) (student stage, teacher stage) pairs matched by relative depth: every stage of
    the shallower model, each with the deeper model's stage at the same relative depth."""
    if n_student <= n_teacher:
        return [(i, relative_depth(i, n_student, n_teacher)) for i in range(n_student)]
    return [(relative_depth(j, n_teacher, n_student), j) for j in range(n_teacher)]


def model_name(model: nn.Module) -> str:
    return getattr(model, "name", "") or type(model).__name__


def hard_ce(logits: Tensor, cfg: Config, targets: Tensor) -> Tensor:
    """Cross-entropy with the run's label smoothing, in float32: every method's hard-label term."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)


# --- per-batch caches ------------------------------------------------------------------------------


class SharedStudent:
    """Stands in for the student during one batch: the first call runs it, later calls on the same
    input reuse the outputs (and their autograd graph).

    With `features` it runs `forward_with_features` on the first call even if only logits were
    asked for, so a later feature request costs nothing; without, it calls the (possibly compiled)
    module itself. Any other attribute is the student's.
    """

    def __init__(self, student: nn.Module, features: bool):
        self._student = student
        self._features = features
        self._x: Tensor | None = None
        self._feats: list[Tensor] | None = None
        self._logits: Tensor | None = None

    def _run(self, x: Tensor, want_features: bool) -> None:
        if self._x is x and (self._feats is not None or not want_features):
            return
        if want_features or self._features:
            self._feats, self._logits = self._student.forward_with_features(x)
        else:
            self._feats, self._logits = None, self._student(x)
        self._x = x

    def __call__(self, x: Tensor) -> Tensor:
        self._run(x, want_features=False)
        return self._logits

    def forward_with_features(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        self._run(x, want_features=True)
        return self._feats, self._logits

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not set yet (copy, pickle): never recurse into the wrapped object
            raise AttributeError(name)
        return getattr(self._student, name)


class SharedTeacher:
    """Stands in for the `Teacher` during one batch, computing its logits (or features and logits)
    once. With `features` a logits request runs the feature pass, which gives the logits too."""

    def __init__(self, teacher: Teacher, features: bool):
        self._teacher = teacher
        self._features = features
        self._batch: Batch | None = None
        self._feats: list[Tensor] | None = None
        self._logits: Tensor | None = None

    def _run(self, batch: Batch, want_features: bool) -> None:
        if self._batch is batch and (self._feats is not None or not want_features):
            return
        if want_features or self._features:
            self._feats, self._logits = self._teacher.features(batch)
        else:
            self._feats, self._logits = None, self._teacher.logits(batch)
        self._batch = batch

    def logits(self, batch: Batch) -> Tensor:
        self._run(batch, want_features=False)
        return self._logits

    def features(self, batch: Batch) -> tuple[list[Tensor], Tensor]:
        self._run(batch, want_features=True)
        return self._feats, self._logits

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._teacher, name)
