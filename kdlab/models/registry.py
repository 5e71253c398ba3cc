"""Model registry: name -> constructor ``fn(width, num_classes) -> StagedModel``.

Each model file registers its constructors with ``@register_model("name")``; the family
("vgg", "resnet", "densenet") is the name of the file that defines the constructor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from numbers import Integral, Real

from torch import nn

from kdlab.errors import UserError
from kdlab.models.base import StagedModel

ModelFn = Callable[..., StagedModel]

_MODELS: dict[str, ModelFn] = {}
_FAMILIES: dict[str, str] = {}


def register_model(name: str, family: str | None = None) -> Callable[[ModelFn], ModelFn]:
    """Register a constructor ``fn(width: float = 1.0, num_classes: int = 10) -> StagedModel``.

    ``family`` defaults to the defining module's last name component (``kdlab.models.vgg`` -> "vgg").
    The returned constructor sets ``model.name``, so direct calls give named models too.
    """

    def decorate(fn: ModelFn) -> ModelFn:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")

        @functools.wraps(fn)
        def build(width: float = 1.0, num_classes: int = 10) -> StagedModel:
            model = fn(width=width, num_classes=num_classes)
            model.name = name
            return model

        _MODELS[name] = build
        _FAMILIES[name] = family or fn.__module__.rsplit(".", 1)[-1]
        return build

    return decorate


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(list_models())}")


def create_model(name: str, width: float = 1.0, num_classes: int = 10) -> StagedModel:
    """Build the registered model ``name`` at ``width`` with ``num_classes`` outputs."""
    _check_name(name)
    # bool is an int subclass; True as a width or class count is surely a mistake.
    if isinstance(width, bool) or not isinstance(width, Real) or not math.isfinite(width) or width <= 0:
        raise UserError(f"model width must be a finite number > 0, got {width!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
        raise UserError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return _MODELS[name](width=float(width), num_classes=int(num_classes))


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def model_family(name: str) -> str:
    """Family of the registered model ``name``: "vgg", "resnet" or "densenet"."""
    _check_name(name)
    return _FAMILIES[name]


def count_params(model: nn.Module) -> int:
    """Total number of trainable parameters (weights, biases, BatchNorm affine terms)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def paper_params(model: nn.Module) -> int:
    """The paper's Params column: weights of every Conv2d and Linear only (no biases, no BatchNorm)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
