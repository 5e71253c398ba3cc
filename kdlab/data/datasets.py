"""Dataset containers, the data directory and the one entry point that loads a dataset by name.

Every dataset is held as uint8 HWC images and int64 labels in numpy arrays; turning them into
tensors (and moving them to the GPU) is the loader's job, not this layer's. A dataset's
*fingerprint* is a hash of that content (`fingerprint_arrays`): what a run was trained on, whatever
the folder is called or where it lies. It is computed once, when the files are decoded, and kept
in the dataset's cache beside the arrays.
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

from kdlab.errors import UserError

BUILTIN_NAMES = ("cifar10", "cifar100", "synthetic")

# Bumped whenever the cache layout changes, so that old caches are rebuilt instead of misread.
# 2: the content's fingerprint and facts (image size, counts) are kept beside the arrays.
CACHE_VERSION = 2


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

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the images, labels and class names of both splits (see `fingerprint_arrays`)."""
        return self.known_fingerprint or fingerprint_arrays(self.train, self.test, self.classes)

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


def _locate(name: str, data_dir: Path | str | None) -> tuple[str, Path]:
    """('cifar10' | 'cifar100' | 'synthetic' | 'folder', where its files are) for a dataset name."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key = name.strip().lower()
    if key in ("cifar10", "cifar100"):
        return key, root
    if key == "synthetic":
        return key, root / "synthetic"
    path = Path(name).expanduser()
    if path.is_dir():
        return "folder", path
    if os.sep in name or "/" in name or name.startswith((".", "~")):
        raise UserError(f"dataset folder {path} does not exist")
    raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(BUILTIN_NAMES)}, "
                    "or give the path to a folder with train/<class>/ and test/<class>/ images")


def load_dataset(name: str, data_dir: Path | str | None = None, download: bool = True) -> Dataset:
    """Load ``cifar10``, ``cifar100``, ``synthetic`` or a folder of images by path.

    ``data_dir`` defaults to :func:`default_data_dir`. CIFAR archives are downloaded into it when
    missing and ``download`` is true; ``synthetic`` is generated into ``data_dir/synthetic``.
    A folder must hold ``train/<class>/*`` and ``test/<class>/*`` (PNG or JPEG). Problems with the
    user's files raise :class:`~kdlab.errors.UserError`.
    """
    # Imported here because these modules import Split and Dataset from this one.
    from kdlab.data import cifar, folder, synthetic

    kind, where = _locate(name, data_dir)
    if kind == "synthetic":
        return synthetic.load_synthetic(where)
    if kind == "folder":
        return folder.load_folder(where)
    return cifar.load_cifar(kind, where, download=download)


@dataclass(frozen=True)
class DataIdentity:
    """What a run is trained on: where (`location`), what (`fingerprint`), and a description (`info`)."""

    location: str  # a built-in dataset's name, or a folder's absolute path: where, not what
    fingerprint: str  # `fingerprint_arrays` of the content: what the run's identity covers
    info: dict[str, Any]  # name (for people), image_size [h, w], classes, train and test image counts


def identify_dataset(name: str, data_dir: Path | str | None = None) -> DataIdentity:
    """The dataset's identity: read from its cache when its files are unchanged (no decoding),
    otherwise by loading it once, which decodes (or downloads) it and writes that cache."""
    from kdlab.data import cifar, folder, synthetic

    kind, where = _locate(name, data_dir)
    if kind == "folder":
        where = where.resolve()
        location, display, found = str(where), where.name, folder.cached_identity(where)
    elif kind == "synthetic":
        location, display, found = kind, kind, synthetic.cached_identity(where)
    else:
        location, display, found = kind, kind, cifar.cached_identity(kind, where)
    if found is None:
        dataset = load_dataset(name, data_dir)
        found = dataset.fingerprint, content_facts(dataset.train, dataset.test, dataset.classes)
    fingerprint, facts = found
    return DataIdentity(location, fingerprint, {"name": display, **facts})


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


def fingerprint_arrays(train: Split, test: Split, classes: list[str]) -> str:
    """A 16-hex-digit SHA-256 of the content: both splits' images and labels (with their shapes)
    and the class names. Equal for the same images anywhere; different if one pixel or label differs."""
    digest = hashlib.sha256()
    for array in (train.images, train.labels, test.images, test.labels):
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).data)
    digest.update(json.dumps(list(classes)).encode())
    return digest.hexdigest()[:16]


def content_facts(train: Split, test: Split, classes: list[str]) -> dict[str, Any]:
    """What a report says about the data: image size (height, width), class count, split sizes."""
    return {"image_size": list(train.images.shape[1:3]), "classes": len(classes), "train": len(train),
            "test": len(test)}


@dataclass(frozen=True)
class Cached:
    """What a dataset's cache holds: the splits, class names, fingerprint and facts of its files."""

    train: Split
    test: Split
    classes: list[str]
    fingerprint: str


@contextmanager
def _current_cache(path: Path, signature: tuple[np.ndarray, np.ndarray]) -> Iterator[Any]:
    """The cache's npz while it is current for these files (else None); members load only when read."""
    # Open the file ourselves: np.load leaks its handle when the zip is damaged.
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
        names, stats = signature
        current = (int(npz["version"]) == CACHE_VERSION and np.array_equal(npz["sig_names"], names)
                   and np.array_equal(npz["sig_stats"], stats))
        yield npz if current else None


def read_cache(path: Path, signature: tuple[np.ndarray, np.ndarray]) -> Cached | None:
    """Return the cached content, or None if the cache is missing, stale or unreadable."""
    try:
        with _current_cache(path, signature) as npz:
            if npz is None:
                return None
            train = Split(npz["train_images"], npz["train_labels"])
            test = Split(npz["test_images"], npz["test_labels"])
            return Cached(train, test, [str(c) for c in npz["classes"]], str(npz["fingerprint"]))
    except Exception:
        # Any failure (truncated zip, missing key, wrong dtype...) just means: rebuild from the source.
        return None


def read_cached_identity(path: Path, signature: tuple[np.ndarray, np.ndarray]) -> tuple[str, dict[str, Any]] | None:
    """The fingerprint and facts of a current cache, without reading its arrays; None if there is none."""
    try:
        with _current_cache(path, signature) as npz:
            return None if npz is None else (str(npz["fingerprint"]), json.loads(str(npz["facts"])))
    except Exception:
        return None


def write_cache(path: Path, content: Cached, signature: tuple[np.ndarray, np.ndarray]) -> None:
    """Write the cache atomically; a read-only folder or a full disk just means no cache."""
    names, stats = signature
    train, test = content.train, content.test
    facts = content_facts(train, test, content.classes)
    try:
        with atomic_write(path) as f:
            # Uncompressed on purpose: loading 180 MB of raw uint8 is faster than inflating it.
            np.savez(f, version=np.int64(CACHE_VERSION), sig_names=names, sig_stats=stats,
                     train_images=train.images, train_labels=train.labels,
                     test_images=test.images, test_labels=test.labels,
                     classes=np.array(content.classes, dtype=str), fingerprint=np.array(content.fingerprint),
                     facts=np.array(json.dumps(facts)))
    except OSError:
        pass  # the cache only saves time


def decoded(train: Split, test: Split, classes: list[str]) -> Cached:
    """Freshly decoded content, fingerprinted (the one time its bytes are hashed)."""
    return Cached(train, test, classes, fingerprint_arrays(train, test, classes))


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
