"""Dataset containers, the data directory and the one entry point that loads a dataset by name.

Every dataset is held as uint8 HWC images and int64 labels in numpy arrays; turning them into
tensors (and moving them to the GPU) is the loader's job, not this layer's.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from kdlab.errors import UserError

BUILTIN_NAMES = ("cifar10", "cifar100", "synthetic")

# Bumped whenever the cache layout changes, so that old caches are rebuilt instead of misread.
CACHE_VERSION = 1


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
    explicit = os.environ.get("KDLAB_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "kdlab" / "data"
    return Path.home() / ".cache" / "kdlab" / "data"


def load_dataset(name: str, data_dir: Path | str | None = None, download: bool = True) -> Dataset:
    """Load ``cifar10``, ``cifar100``, ``synthetic`` or a folder of images by path.

    ``data_dir`` defaults to :func:`default_data_dir`. CIFAR archives are downloaded into it when
    missing and ``download`` is true; ``synthetic`` is generated into ``data_dir/synthetic``.
    A folder must hold ``train/<class>/*`` and ``test/<class>/*`` (PNG or JPEG). Problems with the
    user's files raise :class:`~kdlab.errors.UserError`.
    """
    # Imported here because these modules import Split and Dataset from this one.
    from kdlab.data import cifar, folder, synthetic

    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key = name.strip().lower()
    if key in ("cifar10", "cifar100"):
        return cifar.load_cifar(key, root, download=download)
    if key == "synthetic":
        return synthetic.load_synthetic(root / "synthetic")
    path = Path(name).expanduser()
    if path.is_dir():
        return folder.load_folder(path)
    if os.sep in name or "/" in name or name.startswith((".", "~")):
        raise UserError(f"dataset folder {path} does not exist")
    raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(BUILTIN_NAMES)}, "
                    "or give the path to a folder with train/<class>/ and test/<class>/ images")


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents), turning permission and similar problems into a UserError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the data folder {path} ({exc.strerror or exc}); "
                        "pass another --data-dir") from None


def file_signature(paths: list[Path], base: Path) -> tuple[np.ndarray, np.ndarray]:
    """Names relative to ``base`` and (size, mtime_ns) of each file: a cache is valid while these match."""
    names = np.array([p.relative_to(base).as_posix() for p in paths], dtype=str)
    stats = np.zeros((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        st = path.stat()
        stats[i] = (st.st_size, st.st_mtime_ns)
    return names, stats


def read_cache(path: Path, signature: tuple[np.ndarray, np.ndarray]) -> tuple[Split, Split, list[str]] | None:
    """Return the cached splits and classes, or None if the cache is missing, stale or unreadable."""
    try:
        # Open the file ourselves: np.load leaks its handle when the zip is damaged.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            if int(npz["version"]) != CACHE_VERSION:
                return None
            names, stats = signature
            if not (np.array_equal(npz["sig_names"], names) and np.array_equal(npz["sig_stats"], stats)):
                return None
            train = Split(npz["train_images"], npz["train_labels"])
            test = Split(npz["test_images"], npz["test_labels"])
            classes = [str(c) for c in npz["classes"]]
    except Exception:
        # Any failure (truncated zip, missing key, wrong dtype...) just means: rebuild from the source.
        return None
    return train, test, classes


def write_cache(path: Path, train: Split, test: Split, classes: list[str],
                signature: tuple[np.ndarray, np.ndarray]) -> None:
    """Write the cache atomically; a read-only folder or a full disk just means no cache."""
    names, stats = signature
    try:
        with atomic_write(path) as f:
            # Uncompressed on purpose: loading 180 MB of raw uint8 is faster than inflating it.
            np.savez(f, version=np.int64(CACHE_VERSION), sig_names=names, sig_stats=stats,
                     train_images=train.images, train_labels=train.labels,
                     test_images=test.images, test_labels=test.labels,
                     classes=np.array(classes, dtype=str))
    except OSError:
        pass  # the cache only saves time


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
