"""Building a run's config: a preset's recipe, then a settings file, then overrides (`build_config`),
checked against what is registered, the models, methods, augmentations and residencies (`validate`),
and its dataset identified by content (`bind_dataset`).

`kdlab.config` says what a run is and reaches no higher; this module sits above the registries it
checks against, so that no layer below has to import one above it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kdlab import bnstats, distributed
from kdlab.config import (
    BN_STATS,
    COMPILE_MODES,
    IMAGENET_LR_PER_256,
    OWN_GRAPHS,
    PRECISIONS,
    PRESETS,
    SCHEDULERS,
    Config,
    coerce,
    recipe,
)
from kdlab.data import identify_dataset
from kdlab.data.augment import AUGMENTATIONS
from kdlab.data.residency import RESIDENCIES
from kdlab.device import auto_precision, resolve_device
from kdlab.errors import UserError
from kdlab.loggers import check_available
from kdlab.methods import METHODS
from kdlab.models import check_model_name, model_family
from kdlab.models.weights import file_identity


def build_config(preset: str = "paper", model: str = "resnet18", file_values: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None) -> Config:
    """Resolve a Config: defaults, then the preset, then a config file, then explicit overrides."""
    file_values, overrides = file_values or {}, overrides or {}
    # The paper recipe depends on the model family, so settle the model before the preset.
    model = overrides.get("model") or file_values.get("model") or model
    preset = overrides.get("preset") or file_values.get("preset") or preset
    values: dict[str, Any] = {"model": model, "preset": preset, **preset_values(preset, model)}
    for source, extra in (("config file", file_values), ("override", overrides)):
        for key, value in extra.items():
            values[key] = coerce(key, value, source)
    if preset == "imagenet" and "lr" not in file_values and "lr" not in overrides:
        values["lr"] = IMAGENET_LR_PER_256 * values["batch_size"] / 256  # the linear scaling rule (Goyal et al.)
    cfg = Config(**values)
    # Under torchrun the run trains on every process of the world: another run than the one-process run.
    world = distributed.current()
    cfg.processes = world.size if world is not None else 1
    if cfg.precision == "auto":
        # Settled here, so the run's identity holds the precision it really trains in (bf16 and fp16
        # runs differ), and a config built on one machine means the same on another.
        cfg.precision = auto_precision(resolve_device(cfg.device))
    if cfg.weights:  # the file's content, not its path, is what the run starts from
        cfg.weights_id = file_identity(cfg.weights)
    validate(cfg)
    cfg.method_args = METHODS[cfg.method].typed_args(cfg.method_args)
    return cfg


def preset_values(preset: str, model: str) -> dict[str, Any]:
    """The values a preset sets for a given model (the paper's recipe depends on the family)."""
    return recipe(preset, _family(model) if preset in PRESETS else "")


def _family(model: str) -> str:
    try:
        return model_family(model)
    except UserError:
        return "other"


def bind_dataset(cfg: Config, identity: Any = None) -> Config:
    """The config with its dataset identified: the content's fingerprint and description set, and
    `dataset` made a location (a folder's absolute path). `identity` (a `kdlab.data.DataIdentity`)
    is looked up when not given; the grid passes the one it looked up for all its runs."""
    if identity is None:
        identity = identify_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, cache_dir=cfg.cache_dir)
    bound = dataclasses.replace(cfg, dataset=identity.location, data_fingerprint=identity.fingerprint,
                                data_info=dict(identity.info))
    # Whether BatchNorm statistics are re-estimated depends on the run's step count, known from here on.
    return dataclasses.replace(bound, bn_stats=bnstats.resolve(bound))


def validate(cfg: Config) -> None:
    """Reject values no run can use, with one line that names the setting."""
    check_model_name(cfg.model)
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}: choose one of {', '.join(sorted(METHODS))}")
    checks = [
        (cfg.width > 0, f"width must be > 0, got {cfg.width}"),
        (cfg.temperature > 0, f"temperature must be > 0, got {cfg.temperature}"),
        (0.0 <= cfg.alpha <= 1.0, f"alpha must be in [0, 1], got {cfg.alpha}"),
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.momentum >= 0, f"momentum must be >= 0, got {cfg.momentum}"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (0 <= cfg.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}"),
        (0 <= cfg.warmup < 1, f"warmup must be in [0, 1), got {cfg.warmup}"),
        (cfg.train_limit >= 0 and cfg.test_limit >= 0, "train_limit and test_limit must be >= 0"),
        (cfg.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}, got {cfg.scheduler!r}"),
        (cfg.precision in PRECISIONS,
         f"precision must be one of {', '.join(PRECISIONS)} or auto, got {cfg.precision!r}"),
        (cfg.bn_stats in BN_STATS, f"bn_stats must be one of {', '.join(BN_STATS)}, got {cfg.bn_stats!r}"),
        (cfg.compile in COMPILE_MODES, f"compile must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile!r}"),
        (all(0 < m < 1 for m in cfg.milestones), "milestones are fractions of the epochs, each in (0, 1)"),
        (cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}"),
        (cfg.threads >= 0, f"threads must be >= 0, got {cfg.threads}"),
        (cfg.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {cfg.checkpoint_every}"),
        (not (cfg.graphs and cfg.compile in OWN_GRAPHS),
         f"compile={cfg.compile} captures CUDA graphs itself: set graphs=false with it, or use compile=default "
         "or max-autotune-no-cudagraphs (kdlab then captures the graphs)"),
        (all(1 <= e <= cfg.epochs for e in cfg.snapshots), f"snapshots are epochs in 1..{cfg.epochs}"),
        ("num_classes" not in cfg.model_args, "model_args num_classes: the number of classes comes from the data"),
        (cfg.image_size >= 0, f"image_size must be >= 0 (0: the images' own size), got {cfg.image_size}"),
        (cfg.crop_size >= 0, f"crop_size must be >= 0 (0: the stored size), got {cfg.crop_size}"),
        (cfg.augmentation in AUGMENTATIONS,
         f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {cfg.augmentation!r}"),
        (not cfg.crop_size or cfg.augmentation != "pad-crop",
         "crop_size needs augmentation=random-resized-crop (pad-crop trains at the stored size)"),
        (not (cfg.crop_size and cfg.image_size) or cfg.crop_size <= cfg.image_size,
         f"crop_size ({cfg.crop_size}) must be at most image_size ({cfg.image_size})"),
        (cfg.data_residency in RESIDENCIES,
         f"data_residency must be one of {', '.join(RESIDENCIES)}, got {cfg.data_residency!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    METHODS[cfg.method].check_config(cfg)
    if cfg.mlflow:
        check_available("mlflow")
