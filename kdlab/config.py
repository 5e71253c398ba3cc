"""Run configuration: what a run is (`Config`), the presets' recipes, YAML files and the settings' types.

This module describes runs and imports nothing of kdlab's above it; building a config from a preset,
a file and overrides, binding its dataset and checking it against the registered models, methods
and data settings is `kdlab.configure`'s work, one layer up.

A `Config` describes one run completely. Its hash (over the fields that change results, so not
where the data or the runs live) is the run's identity: the same command twice is the same run,
which is how finished runs are skipped and interrupted ones resumed. The data enters the hash by
its content: `bind_dataset` sets the dataset's fingerprint, and then its name and place do not count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdlab.errors import UserError

PRESETS = ("paper", "fast", "smoke", "imagenet")
SCHEDULERS = ("cosine", "multistep", "onecycle", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")  # and "auto", settled when the config is built (kdlab.device.auto_precision)
BN_STATS = ("auto", "running", "train")  # kdlab.bnstats
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
OWN_GRAPHS = ("reduce-overhead", "max-autotune")  # compile modes that capture CUDA graphs themselves

# Fields that say where things are, how they are shown or how the same arithmetic is scheduled, not
# what is computed: kept out of the hash.
_LOCATION_FIELDS = ("data_dir", "device", "teacher_path", "threads", "snapshots", "graphs", "checkpoint_every",
                    "sync_bn", "data_info", "weights", "tensorboard", "mlflow", "cache_dir", "data_residency")
# Fields added after the first stores were written: hashed only when they differ from their default,
# so the runs of older stores keep their ids.
LATER_FIELDS = {"model_args": {}, "data_fingerprint": None, "weights_id": None, "image_size": 0, "crop_size": 0,
                "augmentation": "pad-crop", "processes": 1}
# Fields kdlab computes (bind_dataset, build_config): a settings file or --set may not give them.
_DERIVED_FIELDS = ("data_fingerprint", "data_info", "weights_id", "processes")
# model_args keys that say where a file is, not what it holds (its digest sits beside it and is hashed).
_LOCATION_MODEL_ARGS = ("path",)


@dataclass
class Config:
    """Everything that defines one training run (from scratch or distilled)."""

    # what is trained, on what
    preset: str = "paper"  # the recipe's name; the values below are what counts
    model: str = "resnet18"
    width: float = 1.0
    model_args: dict[str, Any] = field(default_factory=dict)  # constructor arguments of a source's model
    weights: str | None = None  # start from the weights in this file (not hashed: weights_id is)
    weights_id: str | None = None  # "file:<sha256>" of that file, set when the config is built
    dataset: str = "cifar10"  # a built-in name or a folder; once bound, a location (the fingerprint is the data)
    data_dir: str | None = None
    data_fingerprint: str | None = None  # hash of the dataset's content (bind_dataset); None: not bound
    data_info: dict[str, Any] = field(default_factory=dict)  # its name, image size, classes and counts
    image_size: int = 0  # store images at S x S (shorter side to S, centre crop); 0: as they are (one size)
    cache_dir: str | None = None  # where decoded datasets are cached (default $KDLAB_CACHE_DIR, ~/.cache/kdlab/decoded)
    train_limit: int = 0  # use only the first N training images (0: all); smoke runs
    test_limit: int = 0
    # how it learns: the method and its teacher
    method: str = "ce"
    teacher: str | None = None  # identity of the teacher: a run id, or "file:<sha256>" for a checkpoint
    teacher_path: str | None = None  # where that teacher's weights are (not hashed: the identity is)
    temperature: float = 3.0
    alpha: float = 0.7  # weight of cross-entropy in equation (2); 1 - alpha weighs the KD term
    method_args: dict[str, Any] = field(default_factory=dict)
    # the optimisation recipe
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # multistep: fractions of epochs
    gamma: float = 0.1
    warmup: float = 0.0  # onecycle: fraction of steps spent rising to the peak lr
    label_smoothing: float = 0.0
    augment: bool = True
    augmentation: str = "pad-crop"  # what augment does: pad-crop (CIFAR) or random-resized-crop (ImageNet)
    crop_size: int = 0  # train and evaluate on crops of this side (random-resized-crop); 0: the stored size
    # BatchNorm statistics for evaluation (kdlab.bnstats): auto, running (PyTorch's), or train (re-estimated on
    # the training set before each evaluation). bind_dataset settles auto; auto and running are not hashed.
    bn_stats: str = "auto"
    # the engine
    precision: str = "fp32"  # fp32, bf16, fp16 (with loss scaling), or auto: chosen from the device when built
    channels_last: bool = False
    compile: str = "none"
    graphs: bool = True  # on CUDA, replay each step as a CUDA graph (same kernels, one launch)
    eval_batch_size: int = 1000
    device: str = "auto"
    data_residency: str = "auto"  # the images on the device, or streamed from the cache (same batches either way)
    threads: int = 0  # CPU threads for torch (0: torch's default); tiny models run best on 1
    snapshots: list[int] = field(default_factory=list)  # also keep the weights after these epochs (ESKD teachers)
    checkpoint_every: int = 1  # epochs between checkpoints (and the last epoch); written off the training thread
    sync_bn: bool = True  # one run on several GPUs (torchrun): BatchNorm statistics over the global batch
    # How many processes train the run (torchrun; set when the config is built). Part of the identity when
    # more than one: the result differs from the one-process run's (per-process BatchNorm statistics on CPUs,
    # sums in another order everywhere), so the two are different runs.
    processes: int = 1
    # where the run is also logged (kdlab.loggers); the runs database stays the record
    tensorboard: bool = True  # event files under RUNS_DIR/tb/ when the tensorboard package is installed
    mlflow: str | None = None  # an MLflow tracking URI (a server, or a local folder)
    seed: int = 0

    def run_hash(self) -> str:
        """Stable identity of the run: a hash of every field that changes its result.

        With a fingerprint, the data is identified by its content, so the dataset's name (or path)
        is left out: the same images under another path are the same run, other images another.
        A method whose behaviour changed since the first stores (`Method.version`) adds its version.
        A run on several processes adds their number; a one-process run keeps the id it always had.
        """
        skip = {*_LOCATION_FIELDS, "dataset"} if self.data_fingerprint else set(_LOCATION_FIELDS)
        data = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in skip and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
        if "model_args" in data:
            data["model_args"] = {k: v for k, v in data["model_args"].items() if k not in _LOCATION_MODEL_ARGS}
        if data.get("bn_stats") in ("auto", "running"):
            # What every run computed before the setting existed (auto is settled when the data is bound).
            del data["bn_stats"]
        versions = _method_versions(self)
        if versions:
            data["method_versions"] = versions
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The paper's recipe: 100 epochs, batch 128, lr 0.01, weight decay 5e-4, SGD. VGG: MultiStepLR with
# momentum 0.9; ResNet18 and DenseNet121: CosineAnnealingLR with momentum 0.95. The paper gives no
# MultiStepLR milestones; we use epochs 50 and 75 (fractions 0.5, 0.75) with gamma 0.1.
_PAPER = dict(epochs=100, batch_size=128, lr=0.01, weight_decay=5e-4, temperature=3.0, alpha=0.7,
              precision="fp32", channels_last=False, compile="none")
_PAPER_VGG = dict(scheduler="multistep", momentum=0.9, milestones=[0.5, 0.75], gamma=0.1)
_PAPER_OTHER = dict(scheduler="cosine", momentum=0.95)

# The GPU recipe: large batches, mixed precision (auto: bf16, or fp16 on GPUs without bf16), channels_last,
# one-cycle schedule with Nesterov, steps replayed as CUDA graphs. Not compiled: on the small models
# launches, not kernels, bound the step, and CUDA graphs remove them for a second of capture where
# torch.compile costs half a minute a model.
_FAST = dict(epochs=40, batch_size=512, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
             scheduler="onecycle", warmup=0.15, label_smoothing=0.0, precision="auto", channels_last=True,
             compile="none", graphs=True, temperature=4.0, alpha=0.5)

# Seconds on a CPU: tiny data, two epochs. Widths are set by the caller (train: 1/8 by default).
_SMOKE = dict(epochs=2, batch_size=32, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
              scheduler="onecycle", warmup=0.2, train_limit=2000, test_limit=500, precision="fp32",
              channels_last=False, compile="none", eval_batch_size=500, threads=1)

# The standard ImageNet KD benchmark (ResNet-34 -> ResNet-18), as torchdistill's official config
# (configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/kd-resnet18_from_resnet34.yaml) and
# mdistiller's (configs/imagenet/r34_r18/kd.yaml) run it, after the PyTorch reference recipe: SGD with
# momentum 0.9, lr 0.1 for batch 256 (scaled linearly when the batch size is set: build_config),
# weight decay 1e-4, 100 epochs with the lr divided by 10 at epochs 30, 60 and 90, KD at T = 1 with
# cross-entropy and KD weighted 0.5 each; random-resized-crop 224 and flip for training, images stored
# at 256 (shorter side, centre crop) and their centre 224 evaluated (Resize(256) + CenterCrop(224)).
# Mixed precision (auto) and channels_last are kdlab's GPU engine settings, not the recipe's (torchdistill runs fp32).
_IMAGENET = dict(epochs=100, batch_size=256, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                 scheduler="multistep", milestones=[0.3, 0.6, 0.9], gamma=0.1, label_smoothing=0.0,
                 temperature=1.0, alpha=0.5, augment=True, augmentation="random-resized-crop", image_size=256,
                 crop_size=224, precision="auto", channels_last=True, compile="none", eval_batch_size=500)
IMAGENET_LR_PER_256 = 0.1

# Widths the grid (and `kdlab train` under smoke) uses for teachers and students.
PRESET_WIDTHS = {"paper": (1.0, 0.5), "fast": (1.0, 0.5), "smoke": (0.125, 0.0625), "imagenet": (1.0, 0.5)}


def recipe(preset: str, family: str) -> dict[str, Any]:
    """The values a preset sets for a model of `family` (the paper's recipe depends on it)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if preset == "paper":
        return {**_PAPER, **(_PAPER_VGG if family == "vgg" else _PAPER_OTHER)}
    return dict({"fast": _FAST, "smoke": _SMOKE, "imagenet": _IMAGENET}[preset])


def _method_versions(cfg: Config) -> dict[str, int]:
    # The identity covers the method's code version; the methods registry imports no config at run time,
    # so this reaches down a layer, not up (kdlab.methods.base only names Config in type hints).
    from kdlab.methods.base import METHODS

    cls = METHODS.get(cfg.method)
    return cls.versions(cfg) if cls is not None else {}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file: a mapping of Config fields to values."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise UserError(f"cannot read config file {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of settings, not a {type(data).__name__}")
    return data


_FIELD_TYPES = typing.get_type_hints(Config)


def coerce(key: str, value: Any, source: str) -> Any:
    """Check one value against its field's type, converting where it is lossless (3 -> 3.0)."""
    if key not in _FIELD_TYPES:
        known = ", ".join(f.name for f in dataclasses.fields(Config) if f.name not in _DERIVED_FIELDS)
        raise UserError(f"unknown setting {key!r} in {source}; known settings: {known}")
    if key in _DERIVED_FIELDS:
        source_of = "the processes it runs on" if key == "processes" else "the dataset's (or weights') files"
        raise UserError(f"setting {key!r} in {source} is computed by kdlab from {source_of}; remove it")
    kind = _FIELD_TYPES[key]
    ok, converted = _check_type(kind, value)
    if not ok:
        raise UserError(f"setting {key!r} in {source} must be {_type_name(kind)}, got {value!r}")
    return converted


def _check_type(kind: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            ok, converted = _check_type(option, value)
            if ok:
                return True, converted
        return False, value
    if kind is type(None):
        return value is None, value
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if kind is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (item,) = typing.get_args(kind)
        checked = [_check_type(item, v) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if origin is dict:
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else value
    raise TypeError(f"unhandled config type {kind}")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(k) for k in typing.get_args(kind))
    if kind is type(None):
        return "null"
    return getattr(kind, "__name__", str(kind)).replace("list", "a list")
