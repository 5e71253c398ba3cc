"""Datasets as numpy arrays (CIFAR-10/100, a synthetic stand-in, folders of the user's images, Hugging Face
datasets), decoded once into a memory-mapped cache, and the loaders that turn them into batches."""

from typing import Any

from kdlab.data.datasets import (
    DataIdentity,
    DataMissing,
    Dataset,
    Split,
    default_cache_dir,
    default_data_dir,
)
from kdlab.data.sources import identify_dataset, load_dataset
from kdlab.data.synthetic import write_synthetic_cifar

__all__ = ["DataIdentity", "DataMissing", "Dataset", "Split", "dataset_for", "default_cache_dir", "default_data_dir",
           "identify_dataset", "identity_for", "load_dataset", "write_synthetic_cifar"]


def _settings(cfg: Any) -> dict[str, Any]:
    get = cfg.get if isinstance(cfg, dict) else (lambda key, default=None: getattr(cfg, key, default))
    return {"data_dir": get("data_dir"), "image_size": int(get("image_size") or 0), "cache_dir": get("cache_dir")}


def dataset_for(cfg: Any, data_dir: str | None = None) -> Dataset:
    """The dataset a run's config (a `kdlab.config.Config` or its dict) names, with its size policy
    and cache dir; `data_dir` overrides the config's (the data may have moved)."""
    settings = _settings(cfg)
    settings["data_dir"] = data_dir or settings["data_dir"]
    name = cfg["dataset"] if isinstance(cfg, dict) else cfg.dataset
    return load_dataset(name, **settings)


def identity_for(cfg: Any, decode: bool = True) -> DataIdentity | None:
    """`identify_dataset` for a config's dataset settings (None: not decoded yet and `decode` false)."""
    settings = _settings(cfg)
    return identify_dataset(cfg.dataset, settings.pop("data_dir"), decode=decode, **settings)
