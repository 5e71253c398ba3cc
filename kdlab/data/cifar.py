"""CIFAR-10 and CIFAR-100 in their official python layouts: download, verify, extract, read (into the decoded cache).

The batch files are pickles, so they are read with an unpickler that only accepts the few numpy
objects those files contain: a damaged or hostile file then fails with a clear error instead of
running code.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np

from kdlab.data.cache import Plan
from kdlab.data.cache import Source as CacheSource
from kdlab.data.datasets import DataMissing, Signature, Split, atomic_write, ensure_dir
from kdlab.data.decode import resize_arrays
from kdlab.errors import UserError

DOWNLOAD_TIMEOUT = 60.0  # seconds without data before giving up; applies per read, not to the whole file
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Layout:
    """Where the files of one CIFAR variant live and which keys hold labels and class names."""

    title: str
    folder: str
    archive: str
    meta_file: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    names_key: str

    def file_names(self) -> list[str]:
        """All files the loader needs, meta first."""
        return [self.meta_file, *self.train_files, self.test_file]


@dataclass(frozen=True)
class Source:
    """Where to download an archive from and its MD5; tests swap in a local URL and their own MD5."""

    url: str
    md5: str


LAYOUTS: dict[str, Layout] = {
    "cifar10": Layout("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "batches.meta",
                      tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels", "label_names"),
    "cifar100": Layout("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz", "meta",
                       ("train",), "test", "fine_labels", "fine_label_names"),
}

SOURCES: dict[str, Source] = {
    "cifar10": Source("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a"),
    "cifar100": Source("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                       "eb9058c3a382ffc7106e4002c42a8d85"),
}


def source(key: str, data_dir: Path, image_size: int = 0, *, download: bool = True, fetch: bool = True,
           name: str | None = None, remedy: str | None = None) -> CacheSource:
    """``cifar10`` or ``cifar100`` in ``data_dir/<official folder>`` as a cache source, downloaded
    first if missing and allowed. Without `fetch`, missing files raise DataMissing instead.

    ``name`` overrides the dataset's name (the synthetic set reuses the CIFAR-10 layout), and
    ``remedy`` overrides the advice given when a file is damaged.
    """
    layout = LAYOUTS[key]
    root = data_dir / layout.folder
    if not root.is_dir():
        if not fetch:
            raise DataMissing(f"{layout.title} is not in {data_dir} yet")
        _fetch(key, data_dir, download)
    if remedy is None:
        remedy = (f"delete {root} and run again to download it afresh" if download else
                  f"replace it from the official {layout.archive}, or delete {root} and allow downloading")
    paths = _existing_files(layout, root, remedy)
    signature = Signature("cifar", layout.folder).add_files(paths, root).hexdigest()

    def prepare() -> Plan:
        train, test, classes = _read_layout(layout, root, remedy)
        splits = {"train": train, "test": test}
        shape = (image_size, image_size) if image_size else train.images.shape[1:3]

        def task(split: str, start: int, stop: int) -> tuple:
            return resize_arrays, (splits[split].images[start:stop], image_size)

        return Plan(classes, {k: v.labels for k, v in splits.items()}, shape, task, parallel=bool(image_size))

    name = name or key
    return CacheSource(key, str(root.resolve()), name, name, image_size, signature, prepare)


def _existing_files(layout: Layout, root: Path, remedy: str) -> list[Path]:
    """Paths of all files of the layout, or a UserError naming those that are missing."""
    paths = [root / f for f in layout.file_names()]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{layout.title} folder {root} is incomplete: missing {', '.join(missing)}; {remedy}")
    return paths


# ---------------------------------------------------------------------------------------- reading


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals numpy arrays need (CIFAR pickles hold nothing else)."""

    _ALLOWED = {("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy.core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> object:
        canonical = module.replace("numpy._core", "numpy.core")
        if (canonical, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if canonical.startswith("numpy.core"):
            # numpy 2 moved numpy.core to numpy._core and warns on the old name; old pickles use it.
            try:
                return super().find_class(canonical.replace("numpy.core", "numpy._core"), name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def safe_load_pickle(path: Path) -> object:
    """Unpickle ``path`` allowing only numpy arrays and plain containers; errors propagate as raised."""
    with open(path, "rb") as f:
        # latin1 is how python 3 reads the python 2 pickles of the official archive.
        return _SafeUnpickler(f, encoding="latin1").load()


def _load_pickle(path: Path, remedy: str) -> dict[str, object]:
    """Read one pickled dict; keys come back as str whether the file has str or bytes keys."""
    try:
        obj = safe_load_pickle(path)
    except Exception as exc:
        # A damaged pickle can fail in many ways (EOFError, UnpicklingError, ValueError from numpy,...):
        # all of them mean the same thing to the user.
        why = f"{type(exc).__name__}: {exc}"
        raise UserError(f"{path} is damaged or not a CIFAR file ({why}); {remedy}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR file (holds a {type(obj).__name__}, not a dict); {remedy}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_classes(layout: Layout, root: Path, remedy: str) -> list[str]:
    path = root / layout.meta_file
    names = _load_pickle(path, remedy).get(layout.names_key)
    valid = isinstance(names, (list, tuple)) and names and all(isinstance(n, (str, bytes)) for n in names)
    if not valid:
        raise UserError(f"{path} has no valid '{layout.names_key}' list of class names; {remedy}")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _read_batch(path: Path, layout: Layout, num_classes: int, remedy: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows (N, 3*S*S) and labels of one batch file, with every check a damaged file could fail."""
    entry = _load_pickle(path, remedy)
    data, labels = entry.get("data"), entry.get(layout.label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise UserError(f"{path} lacks the 'data' array or the '{layout.label_key}' list; {remedy}")
    side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
    if data.dtype != np.uint8 or side == 0 or 3 * side * side != data.shape[1] or data.shape[0] == 0:
        raise UserError(f"{path}: 'data' must be a non-empty uint8 array of shape (N, 3*S*S), "
                        f"got {data.dtype} {data.shape}; {remedy}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: '{layout.label_key}' must be {data.shape[0]} integers, "
                        f"got {labels.dtype} {labels.shape}; {remedy}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{path}: labels must lie in 0..{num_classes - 1}, found "
                        f"{labels.min()}..{labels.max()}; {remedy}")
    return data, labels.astype(np.int64)


def _read_split(paths: list[Path], layout: Layout, num_classes: int, remedy: str) -> Split:
    parts = [_read_batch(p, layout, num_classes, remedy) for p in paths]
    widths = {rows.shape[1] for rows, _ in parts}
    if len(widths) > 1:
        raise UserError(f"the batch files in {paths[0].parent} hold images of different sizes; {remedy}")
    rows = np.concatenate([rows for rows, _ in parts])
    side = math.isqrt(rows.shape[1] // 3)
    # Each row is the R, G and B planes one after the other: (N, 3, S, S) -> contiguous (N, S, S, 3).
    images = np.ascontiguousarray(rows.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))
    return Split(images, np.concatenate([labels for _, labels in parts]))


def _read_layout(layout: Layout, root: Path, remedy: str) -> tuple[Split, Split, list[str]]:
    classes = _read_classes(layout, root, remedy)
    train = _read_split([root / f for f in layout.train_files], layout, len(classes), remedy)
    test = _read_split([root / layout.test_file], layout, len(classes), remedy)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(f"train and test images in {root} differ in size; {remedy}")
    return train, test, classes


# ------------------------------------------------------------------------------ download and extract


def _fetch(key: str, data_dir: Path, download: bool) -> None:
    """Make ``data_dir/<folder>`` exist: from an archive already in data_dir, or downloaded."""
    layout, origin = LAYOUTS[key], SOURCES[key]
    archive = data_dir / layout.archive
    if not archive.is_file():
        if not download:
            raise UserError(f"{layout.title} not found: expected the official {layout.folder} folder at "
                            f"{data_dir / layout.folder} (or {layout.archive} in {data_dir}); put it there, "
                            "allow downloading, or pass --data-dir")
        ensure_dir(data_dir)
        download_file(origin.url, archive, origin.md5, layout, data_dir)
    else:
        got = _file_md5(archive)
        if got != origin.md5:
            raise UserError(f"checksum mismatch for {archive}: expected MD5 {origin.md5}, got {got}; "
                            "delete it and run again to download it afresh")
    extract_archive(archive, data_dir, layout.folder)


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str, layout: Layout, data_dir: Path) -> None:
    """Stream ``url`` into a temp file beside ``dest``, check its MD5, then rename it into place.

    Nothing is left behind on failure, so an interrupted or corrupted download never looks complete.
    """
    print(f"kdlab: downloading {layout.title} from {url} to {dest}", file=sys.stderr, flush=True)
    try:
        with atomic_write(dest) as out:
            got = _stream(url, out, layout, data_dir)
            if got != md5:
                raise UserError(f"checksum mismatch for {dest.name} downloaded from {url}: expected MD5 "
                                f"{md5}, got {got}; the download was deleted, run again to retry")
    except OSError as exc:
        # Creating or renaming the temp file failed: the data folder is not writable.
        raise _unwritable(data_dir, exc) from None


def _stream(url: str, out: BinaryIO, layout: Layout, data_dir: Path) -> str:
    """Copy ``url`` into ``out`` and return the MD5 of what was read."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise UserError(f"could not download {layout.title} from {url} ({reason or type(exc).__name__}); "
                        f"put the official {layout.folder} folder under {data_dir} (so that "
                        f"{data_dir / layout.folder / layout.file_names()[0]} exists) or pass --data-dir"
                        ) from None
    return digest.hexdigest()


def extract_archive(archive: Path, data_dir: Path, folder: str) -> None:
    """Extract ``folder/`` from the tar archive into ``data_dir``, all at once or not at all.

    Members with absolute paths, ``..`` or anything but plain files and folders are refused, and
    the files go to a temp folder that is renamed into place only when complete.
    """
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".kdlab-extract-", dir=data_dir))
    except OSError as exc:
        raise _unwritable(data_dir, exc) from None
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    _extract_member(tar, member, tmp, folder, archive)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise UserError(f"{archive} is damaged ({exc}); delete it and run again") from None
        except OSError as exc:
            raise UserError(f"cannot extract {archive} into {data_dir} ({exc})") from None
        if not (tmp / folder).is_dir():
            raise UserError(f"{archive} has no {folder}/ folder, so it is not the official archive; "
                            "delete it")
        try:
            os.rename(tmp / folder, data_dir / folder)
        except OSError as exc:
            # Another process may have finished the same extraction first; that is fine.
            if not (data_dir / folder).is_dir():
                raise UserError(f"cannot create {data_dir / folder} ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unwritable(where: Path, exc: OSError) -> UserError:
    return UserError(f"cannot write into the data folder {where} ({exc.strerror or exc}); "
                     "pass another --data-dir")


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, folder: str,
                    archive: Path) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise UserError(f"{archive} contains the unsafe path {member.name!r}; refusing to extract it")
    if not path.parts or path.parts[0] != folder:
        return  # not part of the dataset
    if not (member.isfile() or member.isdir()):
        raise UserError(f"{archive} contains {member.name!r}, which is not a plain file; "
                        "refusing to extract it")
    target = dest.joinpath(*path.parts)
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    src = tar.extractfile(member)
    assert src is not None  # always a stream for regular files
    with src, open(target, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)
