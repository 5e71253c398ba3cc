"""Dataset containers, the data and cache directories, and the fingerprints of content.
(The entry points that load or identify a dataset by name are `kdlab.data.sources`.)

Every dataset is held as uint8 HWC images and int64 labels in numpy arrays; for datasets kdlab
reads from files (CIFAR, folders, Hugging Face datasets) the images are memory-mapped from the
decoded cache (`kdlab.data.cache`), so a dataset of any size costs no memory until its pixels are
read. Turning them into tensors (and moving them to the device) is the loader's job. A dataset's
*fingerprint* is a hash of that content (`fingerprint_arrays`): what a run was trained on, whatever
the folder is called or where it lies. It is computed once, while the files are decoded, and kept in
the cache beside the pixels.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from kdlab.data.pixels import channel_stats
from kdlab.errors import UserError


class DataMissing(UserError):
    """The dataset's files are not there (yet): a dry run plans without them, anything else stops."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset: ``images`` uint8 (N, H, W, 3) and ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        # Catch programming mistakes early: everything downstream relies on this exact layout.
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} "
                             f"{self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} "
                             f"{self.labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A named dataset with a train and a test split and its class names (index = label)."""

    name: str
    train: Split
    test: Split
    classes: list[str]
    known_fingerprint: str = field(default="", repr=False)  # from the cache, when the loader had it
    known_stats: tuple[list[float], list[float]] | None = field(default=None, repr=False)  # likewise
    cache_path: str = field(default="", repr=False)  # the decoded cache's folder ('' for arrays in memory)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the images, labels and class names of both splits (see `fingerprint_arrays`)."""
        return self.known_fingerprint or fingerprint_arrays(self.train, self.test, self.classes)

    @functools.cached_property
    def stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation (0-1 scale) of the training images: what every
        split is normalised with. Kept in the cache; computed in bounded chunks otherwise."""
        return self.known_stats or channel_stats(self.train.images)

    def __post_init__(self) -> None:
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise ValueError(f"train and test image shapes differ: {self.train.images.shape[1:]} vs "
                             f"{self.test.images.shape[1:]}")
        for split in (self.train, self.test):
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(self.classes)):
                raise ValueError(f"labels must lie in [0, {len(self.classes)})")

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)


def default_data_dir() -> Path:
    """Where datasets live by default: ``$KDLAB_DATA_DIR``, else ``$XDG_CACHE_HOME/kdlab/data``,
    else ``~/.cache/kdlab/data``."""
    return _cache_home("KDLAB_DATA_DIR", "data")


def default_cache_dir() -> Path:
    """Where decoded datasets are cached by default: ``$KDLAB_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/kdlab/decoded``, else ``~/.cache/kdlab/decoded`` (beside the data dir's
    default, and never inside a dataset's own folder, which may be read-only or shared)."""
    return _cache_home("KDLAB_CACHE_DIR", "decoded")


def _cache_home(variable: str, leaf: str) -> Path:
    explicit = os.environ.get(variable)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "kdlab" / leaf
    return Path.home() / ".cache" / "kdlab" / leaf


@dataclass(frozen=True)
class DataIdentity:
    """What a run is trained on: where (`location`), what (`fingerprint`), and a description (`info`)."""

    location: str  # a built-in dataset's name, a folder's absolute path, hf:...: where, not what
    fingerprint: str  # `fingerprint_arrays` of the content: what the run's identity covers
    info: dict[str, Any]  # name (for people), image_size [h, w], classes, train and test image counts


def ensure_dir(path: Path, what: str = "the data folder", remedy: str = "pass another --data-dir") -> None:
    """Create ``path`` (and parents), turning permission and similar problems into a UserError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {what} {path} ({exc.strerror or exc}); {remedy}") from None


class Signature:
    """A digest of what a dataset's files are now (names, sizes, modification times), built one
    file at a time: its decoded cache is current while the digest is the same."""

    def __init__(self, *parts: Any):
        self._hash = hashlib.sha256(json.dumps(parts).encode())

    def add(self, name: str, stat: os.stat_result) -> None:
        self._hash.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())

    def add_files(self, paths: list[Path], base: Path) -> Signature:
        for path in paths:
            self.add(path.relative_to(base).as_posix(), path.stat())
        return self

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class Fingerprint:
    """`fingerprint_arrays`, fed piece by piece in the same order (arrays' headers, their bytes, the
    class names), so that a dataset decoded chunk by chunk gets the fingerprint its whole arrays would."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def header(self, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self._hash.update(f"{np.dtype(dtype).str}{tuple(shape)};".encode())

    def update(self, data: Any) -> None:
        self._hash.update(data)

    def array(self, array: np.ndarray) -> None:
        self.header(array.dtype, array.shape)
        self.update(np.ascontiguousarray(array).data)

    def classes(self, classes: list[str]) -> str:
        """Add the class names (last) and return the 16-hex-digit fingerprint."""
        self._hash.update(json.dumps(list(classes)).encode())
        return self._hash.hexdigest()[:16]


def fingerprint_arrays(train: Split, test: Split, classes: list[str]) -> str:
    """A 16-hex-digit SHA-256 of the content: both splits' images and labels (with their shapes)
    and the class names. Equal for the same images anywhere; different if one pixel or label differs."""
    fingerprint = Fingerprint()
    for array in (train.images, train.labels, test.images, test.labels):
        fingerprint.array(array)
    return fingerprint.classes(classes)


def content_facts(train: Split, test: Split, classes: list[str]) -> dict[str, Any]:
    """What a report says about the data: image size (height, width), class count, split sizes."""
    return facts(train.images.shape[1:3], len(classes), len(train), len(test))


def facts(image_size: Any, classes: int, train: int, test: int) -> dict[str, Any]:
    """`content_facts` from the numbers themselves (the cache knows them without the arrays)."""
    return {"image_size": [int(v) for v in image_size], "classes": classes, "train": train, "test": test}


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Write to a hidden temp file beside ``path`` and rename it onto ``path`` only if the block
    succeeds, so that readers never see a half-written file; on any error the temp file is removed."""
    # Not tempfile.mkstemp: its files are private (0600), and data folders may be shared.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful rename
