"""Model registry: name -> constructor ``fn(width, num_classes) -> StagedModel``.

Each model file registers its constructors with ``@register_model("name")``; the family
("vgg", "resnet", "densenet") is the name of the file that defines the constructor.

Models from elsewhere come through *sources*: a name ``PREFIX:REST`` (``timm:resnet50``) is built by
the source registered under ``PREFIX`` with ``@register_source``, one file per source. Extra
constructor arguments (a config's ``model_args``) pass through ``create_model`` to the constructor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any

from torch import nn

from kdlab.errors import UserError
from kdlab.models.base import StagedModel

ModelFn = Callable[..., StagedModel]

_MODELS: dict[str, ModelFn] = {}
_FAMILIES: dict[str, str] = {}
_INPUT_SIZES: dict[str, int] = {}  # the image side each registered model was designed for


class ModelSource:
    """Builds models named ``PREFIX:REST`` from another library or a file. Subclasses set ``prefix``
    and implement ``create`` (and ``names`` to be listed by ``kdlab models --all``)."""

    prefix: str = ""
    # For a source whose names are not typed by a user (made by kdlab itself): what its names are, for
    # `kdlab models --all`, which lists the names of the other sources.
    about: str = ""

    def create(self, name: str, width: float, num_classes: int, **model_args: Any) -> nn.Module:
        """Build model ``name`` (the part after ``PREFIX:``); raise UserError for what cannot be built."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """Names this source can build (without the prefix); may be empty when unknown or unavailable."""
        return []

    def check(self, name: str) -> None:
        """Raise UserError when ``name`` can certainly not be built (called when a config is validated)."""


_SOURCES: dict[str, ModelSource] = {}


def register_source(cls: type[ModelSource]) -> type[ModelSource]:
    """Class decorator: make a model source available under its ``prefix``."""
    if not cls.prefix or cls.prefix in _SOURCES:
        raise ValueError(f"model source prefix {cls.prefix!r} is empty or registered twice")
    _SOURCES[cls.prefix] = cls()
    return cls


def _source(name: str) -> tuple[ModelSource, str] | None:
    prefix, sep, rest = name.partition(":")
    if not sep:
        return None
    if prefix not in _SOURCES:
        raise UserError(f"unknown model source {prefix!r} in {name!r}: known sources are "
                        f"{', '.join(sorted(_SOURCES)) or 'none'}")
    return _SOURCES[prefix], rest


def register_model(name: str, family: str | None = None, input_size: int = 32) -> Callable[[ModelFn], ModelFn]:
    """Register a constructor ``fn(width: float = 1.0, num_classes: int = 10) -> StagedModel``.

    ``family`` defaults to the defining module's last name component (``kdlab.models.vgg`` -> "vgg").
    ``input_size`` is the image side the architecture was designed for (CIFAR's 32 for the zoo);
    smaller images still run, with a warning. The returned constructor sets ``model.name``, so
    direct calls give named models too.
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
        _INPUT_SIZES[name] = input_size
        return build

    return decorate


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(list_models())}")


def check_model_name(name: str) -> None:
    """Raise UserError unless ``name`` is a registered model or ``PREFIX:REST`` of a known source."""
    found = _source(name)
    if found is None:
        _check_name(name)
    else:
        source, rest = found
        source.check(rest)


def create_model(name: str, width: float = 1.0, num_classes: int = 10, **model_args: Any) -> nn.Module:
    """Build the model ``name`` at ``width`` with ``num_classes`` outputs (``model_args`` go to its
    constructor; the built-in models take none)."""
    found = _source(name)
    # bool is an int subclass; True as a width or class count is surely a mistake.
    if isinstance(width, bool) or not isinstance(width, Real) or not math.isfinite(width) or width <= 0:
        raise UserError(f"model width must be a finite number > 0, got {width!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
        raise UserError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if found is not None:
        source, rest = found
        return source.create(rest, float(width), int(num_classes), **model_args)
    _check_name(name)
    if model_args:
        raise UserError(f"model {name!r} takes no model_args, got {', '.join(sorted(model_args))}")
    return _MODELS[name](width=float(width), num_classes=int(num_classes))


def list_models() -> list[str]:
    """Names of all registered models, sorted (models of sources are not listed: see ``list_sources``)."""
    return sorted(_MODELS)


def list_sources() -> dict[str, ModelSource]:
    """The registered model sources by prefix."""
    return dict(_SOURCES)


def model_family(name: str) -> str:
    """Family of the registered model ``name``: "vgg", "resnet" or "densenet" (a source's prefix for
    ``PREFIX:REST`` names)."""
    found = _source(name)
    if found is not None:
        return found[0].prefix
    _check_name(name)
    return _FAMILIES[name]


def display_name(model: str, width: float, reference_width: float | None) -> str:
    """The paper's names: `model` at the reference (teacher) width, `model_half` at half of it, else
    (or without a reference) `model@width`."""
    if reference_width is None:
        return f"{model}@{width:g}"
    if math.isclose(width, reference_width):
        return model
    if math.isclose(width, reference_width / 2):
        return f"{model}_half"
    return f"{model}@{width:g}"


def input_size_note(name: str, image_size: Sequence[int]) -> str | None:
    """One line to say when images are smaller than the model was designed for, else None.

    Every zoo model runs on images from 8x8 up (pooling that would go below 1x1 stays at 1x1), but
    on small images its later stages see 1x1 maps, so it is not the network it is at its design size.
    """
    designed = _INPUT_SIZES.get(name)
    height, width = image_size
    if designed is None or min(height, width) >= designed:
        return None
    return (f"{name} was designed for {designed}x{designed} images and these are {height}x{width}: it trains, "
            f"but its later stages see 1x1 maps, so it is not the model it is at {designed}x{designed} "
            f"(upscale the images to {designed}x{designed} to compare with it there)")


def count_params(model: nn.Module) -> int:
    """Total number of trainable parameters (weights, biases, BatchNorm affine terms)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def paper_params(model: nn.Module) -> int:
    """The paper's Params column: weights of every Conv2d and Linear only (no biases, no BatchNorm)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
