"""The user's own images: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``, PNG or JPEG.

Images keep their native size (all must share one) and are converted to RGB. They are decoded
once and cached in ``ROOT/.kdlab-cache.npz``, which is rebuilt when the file list or any file's
size or modification time changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kdlab.data.datasets import (
    Dataset,
    Split,
    decoded,
    file_signature,
    read_cache,
    read_cached_identity,
    write_cache,
)
from kdlab.errors import UserError

CACHE_NAME = ".kdlab-cache.npz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_LAYOUT_HINT = "a dataset folder needs train/<class>/ and test/<class>/ subfolders holding PNG or JPEG images"


def load_folder(root: Path) -> Dataset:
    """Load the image folder ``root`` as a dataset named after the folder; classes are the sorted
    names of the subfolders of ``train/``, and ``test/`` must have the same ones."""
    root = Path(root).expanduser()
    classes, (train_files, train_labels), (test_files, test_labels) = _listing(root)
    signature = file_signature(train_files + test_files, root)
    cached = read_cache(root / CACHE_NAME, signature)
    if cached is None or cached.classes != classes:
        images = _decode(train_files + test_files)
        n = len(train_files)
        cached = decoded(Split(images[:n], train_labels), Split(images[n:], test_labels), classes)
        write_cache(root / CACHE_NAME, cached, signature)
    return Dataset(root.resolve().name, cached.train, cached.test, classes, cached.fingerprint)


def cached_identity(root: Path) -> tuple[str, dict] | None:
    """The folder's fingerprint and facts from its cache when no file changed (nothing decoded)."""
    _, (train_files, _), (test_files, _) = _listing(root)
    return read_cached_identity(root / CACHE_NAME, file_signature(train_files + test_files, root))


def _listing(root: Path) -> tuple[list[str], tuple[list[Path], np.ndarray], tuple[list[Path], np.ndarray]]:
    """Class names and each split's image files and labels, in a fixed order; layout problems are errors."""
    train_dir, test_dir = root / "train", root / "test"
    for split_dir in (train_dir, test_dir):
        if not split_dir.is_dir():
            raise UserError(f"{root} has no {split_dir.name}/ folder; {_LAYOUT_HINT}")
    classes = _class_names(train_dir, test_dir)
    return (classes, _image_files(train_dir, classes, every_class=True),
            _image_files(test_dir, classes, every_class=False))


def _subfolders(path: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .git...) are tool droppings, not classes.
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_names(train_dir: Path, test_dir: Path) -> list[str]:
    classes = _subfolders(train_dir)
    if not classes:
        raise UserError(f"{train_dir} has no class subfolders; {_LAYOUT_HINT}")
    test_classes = _subfolders(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes)) or ["-"]
        only_test = sorted(set(test_classes) - set(classes)) or ["-"]
        raise UserError(f"train/ and test/ in {train_dir.parent} must have the same class folders; only in "
                        f"train/: {', '.join(only_train)}; only in test/: {', '.join(only_test)}")
    return classes


def _image_files(split_dir: Path, classes: list[str], every_class: bool) -> tuple[list[Path], np.ndarray]:
    """The split's image paths in a fixed order and their labels; empty classes or splits are errors."""
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if every_class and not found:
            raise UserError(f"{split_dir / name} holds no PNG or JPEG images; every class needs training "
                            "images")
        files += found
        labels += [label] * len(found)
    if not files:
        raise UserError(f"{split_dir} holds no PNG or JPEG images; {_LAYOUT_HINT}")
    return files, np.array(labels, dtype=np.int64)


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow reports unreadable, truncated and unsupported files through these.
        raise UserError(f"cannot read the image {path} ({exc}); fix or remove it") from None


def _decode(files: list[Path]) -> np.ndarray:
    """All images as one uint8 (N, H, W, 3) array; they must share the first image's size."""
    first = _read_image(files[0])
    images = np.empty((len(files), *first.shape), dtype=np.uint8)
    images[0] = first
    for i, path in enumerate(files[1:], start=1):
        image = _read_image(path)
        if image.shape != first.shape:
            raise UserError(f"all images must share one size: {path} is {image.shape[1]}x{image.shape[0]} "
                            f"but {files[0]} is {first.shape[1]}x{first.shape[0]}; resize them first")
        images[i] = image
    return images
