"""Where a run's images live while it trains: the whole split on the device, or streamed from the
memory-mapped cache. The choice is made here, for the user, and printed once; the loop only asks
for loaders (`make_loaders`).

``data_residency=auto`` (the default) keeps both splits on the device when their uint8 copies fit
in a budget of its memory (`DEVICE_SHARE` of a GPU's memory, leaving the rest to the models; on a
CPU, where the "device" is host memory, `HOST_SHARE` of it), which is the fast path (CIFAR-10 is
180 MB), and streams them otherwise. ``device`` or ``stream`` forces a residency: the batches are
the same either way (same seed, same order, same augmentations), only the speed and memory differ,
so the setting is not part of a run's identity.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from kdlab.data.augment import PAD
from kdlab.data.datasets import Dataset, Split
from kdlab.data.loader import DeviceLoader, SplitLoader
from kdlab.data.stream import StreamLoader

RESIDENCIES = ("auto", "device", "stream")
DEVICE_SHARE = 0.25  # of a GPU's memory, for a dataset kept on it
HOST_SHARE = 1 / 16  # of the host's memory, on a CPU (6% of this machine: CIFAR fits, a 3 GB folder streams)

_announced: set[tuple] = set()


def host_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget(device: torch.device) -> int:
    """Bytes of `device` a dataset may take and still be kept there whole."""
    if device.type == "cuda":
        return int(DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return int(HOST_SHARE * host_memory())


def resident_bytes(split: Split, limit: int, padded: bool) -> int:
    """Bytes a split (its first `limit` images) takes on the device as uint8, padded for pad-crop."""
    n = min(limit, len(split)) if limit else len(split)
    h, w = split.images.shape[1:3]
    pad = 2 * PAD if padded else 0
    return n * 3 * (h + pad) * (w + pad)


def choose(cfg: Any, dataset: Dataset, device: torch.device) -> tuple[str, str]:
    """('device' | 'stream', why) for a config's splits of `dataset` on `device`."""
    padded = cfg.augment and cfg.augmentation == "pad-crop"
    need = resident_bytes(dataset.train, cfg.train_limit, padded) + resident_bytes(dataset.test, cfg.test_limit, False)
    where = f"{device.type} memory" if device.type == "cuda" else "host memory"
    if cfg.data_residency != "auto":
        return cfg.data_residency, f"{need / 1e9:.2f} GB as uint8; data_residency={cfg.data_residency}"
    allowed = budget(device)
    share = DEVICE_SHARE if device.type == "cuda" else HOST_SHARE
    if need <= allowed:
        return "device", f"{need / 1e9:.2f} GB as uint8, within {share:.0%} of the {where}"
    return "stream", f"{need / 1e9:.2f} GB as uint8, more than {share:.0%} of the {where} ({allowed / 1e9:.1f} GB)"


def make_loaders(cfg: Any, dataset: Dataset, device: torch.device,
                 shard: tuple[int, int] = (0, 1)) -> tuple[SplitLoader, SplitLoader]:
    """The training and test loaders a config asks for, in the residency chosen for it (printed
    once per process and dataset)."""
    residency, why = choose(cfg, dataset, device)
    key = (dataset.fingerprint, residency, str(device))
    if key not in _announced:
        _announced.add(key)
        from kdlab.progress import echo

        place = "kept on the device" if residency == "device" else f"streamed from {dataset.cache_path or 'memory'}"
        echo(f"kdlab: data: {len(dataset.train):,} + {len(dataset.test):,} images at "
             f"{dataset.train.images.shape[2]}x{dataset.train.images.shape[1]} {place} ({why}; "
             "--set data_residency=device|stream to choose)")
    cls = DeviceLoader if residency == "device" else StreamLoader
    mean, std = dataset.stats
    common = dict(mean=mean, std=std, channels_last=cfg.channels_last, seed=cfg.seed, shard=shard,
                  augmentation=cfg.augmentation, crop_size=cfg.crop_size)
    train = cls(dataset.train, cfg.batch_size, device, train=True, augment=cfg.augment, limit=cfg.train_limit,
                **common)
    test = cls(dataset.test, cfg.eval_batch_size, device, train=False, limit=cfg.test_limit, **common)
    return train, test


def eval_loader(split: Split, batch_size: int, device: torch.device, *, mean: list[float], std: list[float],
                limit: int = 0, crop_size: int = 0) -> SplitLoader:
    """An evaluation loader outside training (export, int8 calibration): on the device when the
    split fits its budget, else streamed."""
    augmentation = "random-resized-crop" if crop_size else "pad-crop"
    cls = DeviceLoader if resident_bytes(split, limit, False) <= budget(device) else StreamLoader
    return cls(split, batch_size, device, train=False, mean=mean, std=std, limit=limit, augmentation=augmentation,
               crop_size=crop_size)


def input_size(cfg: Any, image_size: Any) -> tuple[int, int]:
    """(height, width) of the images a config's model sees, given the stored `image_size`: the
    crop_size square when set, else the stored size."""
    crop = int(getattr(cfg, "crop_size", 0) or (cfg.get("crop_size", 0) if isinstance(cfg, dict) else 0))
    return (crop, crop) if crop else (int(image_size[0]), int(image_size[1]))
