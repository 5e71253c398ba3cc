"""Datasets by name: where a name's files are, the decoded cache's `Source` for them, and the entry
points that load a dataset (`load_dataset`) or identify it by content without loading it
(`identify_dataset`). Above the sources (CIFAR, folders, Hugging Face, synthetic) and the cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdlab.data import cache, cifar, folder, hf, synthetic
from kdlab.data.datasets import (
    DataIdentity,
    DataMissing,
    Dataset,
    content_facts,
    default_data_dir,
)
from kdlab.errors import UserError

BUILTIN_NAMES = ("cifar10", "cifar100", "synthetic")
HF_PREFIX = "hf:"  # --dataset hf:PATH_OR_NAME: a Hugging Face dataset (kdlab.data.hf)


def _locate(name: str, data_dir: Path | str | None) -> tuple[str, Path | str]:
    """('cifar10' | 'cifar100' | 'synthetic' | 'folder' | 'hf', where its files are) for a dataset name."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key = name.strip().lower()
    if key in ("cifar10", "cifar100"):
        return key, root
    if key == "synthetic":
        return key, root / "synthetic"
    if name.startswith(HF_PREFIX):
        return "hf", name[len(HF_PREFIX):]
    path = Path(name).expanduser()
    if path.is_dir():
        return "folder", path
    if os.sep in name or "/" in name or name.startswith((".", "~")):
        raise DataMissing(f"dataset folder {path} does not exist")
    raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(BUILTIN_NAMES)}, give the path to a "
                    "folder with train/<class>/ and test/<class>/ (or val/<class>/) images, or hf:PATH_OR_NAME "
                    "for a Hugging Face dataset")


def data_source(name: str, data_dir: Path | str | None = None, *, image_size: int = 0, download: bool = True,
                fetch: bool = True) -> Any:
    """The `kdlab.data.cache.Source` of a dataset name: what its files are now and how to decode them.
    With `fetch` false nothing is downloaded or generated: missing files raise `DataMissing`."""
    if image_size < 0:
        raise UserError(f"image_size must be >= 0 (0: the images' own size), got {image_size}")
    kind, where = _locate(name, data_dir)
    if kind == "synthetic":
        return synthetic.source(Path(where), image_size, generate=fetch)
    if kind == "folder":
        return folder.source(Path(where), image_size)
    if kind == "hf":
        return hf.source(str(where), image_size)
    return cifar.source(kind, Path(where), image_size, download=download and fetch, fetch=fetch)


def load_dataset(name: str, data_dir: Path | str | None = None, download: bool = True, *, image_size: int = 0,
                 cache_dir: Path | str | None = None) -> Dataset:
    """Load ``cifar10``, ``cifar100``, ``synthetic``, a folder of images by path, or ``hf:PATH_OR_NAME``.

    ``data_dir`` defaults to :func:`default_data_dir`. CIFAR archives are downloaded into it when
    missing and ``download`` is true; ``synthetic`` is generated into ``data_dir/synthetic``.
    A folder must hold ``train/<class>/*`` and ``test/<class>/*`` (or ``val/<class>/*``), PNG or
    JPEG. ``image_size`` S > 0 stores every image at S x S (shorter side to S, centre crop), which
    images of different sizes need. The images are decoded once into ``cache_dir`` (default
    :func:`default_cache_dir`) and memory-mapped from there. Problems with the user's files raise
    :class:`~kdlab.errors.UserError`.
    """
    return cache.load(data_source(name, data_dir, image_size=image_size, download=download), cache_dir)


def identify_dataset(name: str, data_dir: Path | str | None = None, *, image_size: int = 0,
                     cache_dir: Path | str | None = None, decode: bool = True) -> DataIdentity | None:
    """The dataset's identity: read from its decoded cache when its files are unchanged (no decoding),
    otherwise by loading it once, which decodes (or downloads) it into that cache. With `decode`
    false, None instead of decoding, downloading or generating anything (a dry run's plan)."""
    try:
        source = data_source(name, data_dir, image_size=image_size, fetch=decode)
    except DataMissing:
        if decode:
            raise
        return None
    found = cache.identity(source, cache_dir)
    if found is None:
        if not decode:
            return None
        dataset = cache.load(source, cache_dir)
        found = dataset.fingerprint, content_facts(dataset.train, dataset.test, dataset.classes)
    fingerprint, facts = found
    return DataIdentity(source.location, fingerprint, {"name": source.name, **facts})
