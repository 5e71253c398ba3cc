"""BatchNorm statistics for evaluation: kept from training, or re-estimated on the training set.

In training mode BatchNorm normalises with each batch's statistics and keeps running estimates for
evaluation, updated at every step as ``running = (1 - m) * running + m * batch``. After S steps the
initial statistics (mean 0, variance 1) still weigh ``(1 - m)^S`` in them. PyTorch's default
momentum m = 0.1 leaves under 1% after 44 steps; torchvision's MobileNetV3 and EfficientNet use
0.01 (their ImageNet recipes run for a hundred thousand steps), which leaves 74% after 30 steps and
still 1% after 459. A short run of such a model evaluates with statistics that are mostly the
initial ones, and in eval mode it predicts one class: test accuracy at chance while the training
accuracy climbs (`kdlab.health` says so).

The `bn_stats` setting:

- ``running``: evaluate with the running statistics, as PyTorch does.
- ``train``: before every evaluation, re-estimate them over the training set: one pass of the
  epoch's training batches (at most `MAX_BATCHES`) without gradients, BatchNorm layers in training
  mode and everything else (dropout) in eval mode, each BatchNorm averaging the batches' statistics
  equally (momentum None) instead of a moving average. Weights are untouched, no random number is
  drawn (training goes on exactly as it would), and the statistics are written in place, so an
  evaluation replayed as a CUDA graph reads the new values. The checkpoint, and what is exported
  from it, holds them.
- ``auto`` (the default): ``train`` for a model from another library or a module (``timm:``,
  ``torchvision:``, ``module:``) with a BatchNorm momentum below PyTorch's 0.1 whose initial
  statistics would still weigh more than `UNSETTLED` after the run's training steps; ``running``
  otherwise. kdlab's own models use 0.1 and always keep ``running``, so their runs keep their ids
  and results. `resolve` settles ``auto`` when the config's data is bound (the step count needs
  the data's size), so the run's id says what it computes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from kdlab.config import Config
    from kdlab.data.loader import Batch

UNSETTLED = 0.01  # the initial statistics' weight in the running ones above which they have not settled
DEFAULT_MOMENTUM = 0.1  # PyTorch's; kdlab's own models use it
MAX_BATCHES = 200  # training batches a re-estimation reads at most (as fvcore's PreciseBN)
_FOREIGN = ("timm:", "torchvision:", "module:")


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `model` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def initial_weight(momenta: Sequence[float | None], steps: int) -> float:
    """How much the initial statistics still weigh in the running ones after `steps` training steps,
    for the layer that forgets them slowest (0: none left, or no BatchNorm). Momentum None is a
    cumulative average: nothing of the initial statistics is left after the first step."""
    weights = [(1.0 - m) ** steps for m in momenta if m is not None]
    return max(weights, default=0.0) if steps > 0 else (1.0 if momenta else 0.0)


def training_steps(cfg: Config) -> int | None:
    """Optimiser steps of the run (the loader drops the last partial batch), from its bound data's
    size; None before the data is bound."""
    count = (cfg.data_info or {}).get("train")
    if not count:
        return None
    if cfg.train_limit:
        count = min(count, cfg.train_limit)
    return cfg.epochs * max(1, count // min(cfg.batch_size, count))


def resolve(cfg: Config) -> str:
    """The `bn_stats` the run uses: ``auto`` settled to ``train`` or ``running`` (see the module's
    docstring); other values as they are. Unbound data: ``auto`` stays (and evaluates as ``running``)."""
    if cfg.bn_stats != "auto":
        return cfg.bn_stats
    if not cfg.model.startswith(_FOREIGN):
        return "running"  # kdlab's own models (momentum 0.1), and pruned ones from them
    steps = training_steps(cfg)
    if steps is None:
        return "auto"
    momenta = [m for m in _momenta(cfg.model, cfg.width, json.dumps(cfg.model_args, sort_keys=True),
                                   int(cfg.data_info.get("classes") or 10)) if m is None or m < DEFAULT_MOMENTUM]
    return "train" if initial_weight(momenta, steps) > UNSETTLED else "running"


@lru_cache(maxsize=64)
def _momenta(model: str, width: float, model_args: str, num_classes: int) -> tuple[float | None, ...]:
    """The BatchNorm momenta of a model, from a copy built on the CPU (the RNG untouched; published
    weights are not fetched: the momentum is the architecture's)."""
    from kdlab.models import create_model

    args = {k: v for k, v in json.loads(model_args).items() if k not in ("pretrained", "weights")}
    with torch.random.fork_rng(devices=[]):
        built = create_model(model, width, num_classes, **args)
    return tuple(m.momentum for m in batchnorms(built))


def describe(model: nn.Module, cfg: Config, steps: int) -> str:
    """The likely cause of a test accuracy at chance after training far above it, from what kdlab knows
    of the model's evaluation statistics (for the health check's message)."""
    elsewhere = ("so look elsewhere: test images unlike the training images (another source, size or "
                 "labelling), or a layer that behaves differently in eval mode")
    layers = batchnorms(model)
    if not layers:
        return f"it has no BatchNorm statistics to blame, {elsewhere}"
    if resolve(cfg) == "train":
        return f"its BatchNorm statistics were re-estimated on the training set before each evaluation, {elsewhere}"
    momenta = [m.momentum for m in layers]
    left = initial_weight(momenta, steps)
    lowest = min((m for m in momenta if m is not None), default=None)
    if lowest is None or left <= UNSETTLED:
        return f"its BatchNorm running statistics should have settled ({steps} training steps), {elsewhere}"
    return (f"its BatchNorm running statistics never settled: momentum {lowest:g} over {steps} training steps "
            f"leaves {100 * left:.0f}% of the initial statistics in them; re-estimate them on the training set "
            "with --set bn_stats=train")


@torch.no_grad()
def reestimate(models: Sequence[nn.Module], batches: Iterable[Batch], autocast: Any = None,
               max_batches: int = MAX_BATCHES) -> None:
    """Re-estimate the BatchNorm statistics of `models` over `batches` (the same batches for all),
    in place: each layer's running mean and variance become the plain average of the batches'
    statistics. Weights, modes and momenta are as they were afterwards."""
    layers = [batchnorms(m) for m in models]
    saved = [[(bn.momentum, bn.training) for bn in group] for group in layers]
    modes = [m.training for m in models]
    try:
        for model, group in zip(models, layers, strict=True):
            # Only BatchNorm in training mode: dropout and drop-path stay off, so no random number is
            # drawn (training goes on exactly as without this pass) and the statistics are those of the
            # activations evaluation sees.
            model.eval()
            for bn in group:
                bn.train()
                bn.reset_running_stats()  # zero_() and fill_(): the same tensors, in place
                bn.momentum = None  # cumulative average: every batch counts the same
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            for model in models:
                with autocast() if autocast is not None else nullcontext():
                    model(batch.x)
    finally:
        for model, group, state, mode in zip(models, layers, saved, modes, strict=True):
            model.train(mode)
            for bn, (momentum, training) in zip(group, state, strict=True):
                bn.momentum = momentum
                bn.train(training)  # a layer kept frozen in eval mode stays so
