"""The user's own images: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (or ``ROOT/val/<class>/*``,
ImageNet's layout), PNG or JPEG.

Images keep their native size (all must share one) unless ``image_size`` sets the size policy
(`kdlab.data.decode`), and are converted to RGB. They are decoded once, on every core, into the
decoded cache (`kdlab.data.cache`), never into the folder itself, which may be read-only; the cache
is decoded again when the file list or any file's size or modification time changes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kdlab.data.cache import Plan, Source
from kdlab.data.datasets import Signature
from kdlab.data.decode import decode_images, image_size_of
from kdlab.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_NAMES = ("test", "val")  # the test split's folder: test/, else val/ (ImageNet's layout)
_LAYOUT_HINT = ("a dataset folder needs train/<class>/ and test/<class>/ (or val/<class>/) subfolders holding PNG "
                "or JPEG images")


def source(root: Path, image_size: int = 0) -> Source:
    """The folder `root` as a cache source named after the folder: classes are the sorted names of
    the subfolders of ``train/``, and the test split must have the same ones, each with images."""
    root = Path(root).expanduser().resolve()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(f"{root} has no train/ folder; {_LAYOUT_HINT}")
    test_dir = next((root / n for n in TEST_NAMES if (root / n).is_dir()), None)
    if test_dir is None:
        raise UserError(f"{root} has no test/ (or val/) folder; {_LAYOUT_HINT}")
    classes = _class_names(train_dir, test_dir)
    signature = Signature("folder", classes)
    splits = {"train": _image_files(train_dir, classes, signature), "test": _image_files(test_dir, classes, signature)}

    def prepare() -> Plan:
        files = {split: [root / name for name in names] for split, (names, _) in splits.items()}
        reference = files["train"][0]
        shape = (image_size, image_size) if image_size else image_size_of(reference, str(reference))

        def task(split: str, start: int, stop: int) -> tuple:
            paths = files[split][start:stop]
            return decode_images, (paths, [str(p) for p in paths], image_size, shape, str(reference))

        return Plan(classes, {split: labels for split, (_, labels) in splits.items()}, shape, task, parallel=True)

    return Source("folder", str(root), str(root), root.name, image_size, signature.hexdigest(), prepare)


def _subfolders(path: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .git...) are tool droppings, not classes.
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _class_names(train_dir: Path, test_dir: Path) -> list[str]:
    classes = _subfolders(train_dir)
    if not classes:
        raise UserError(f"{train_dir} has no class subfolders; {_LAYOUT_HINT}")
    test_classes = _subfolders(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes)) or ["-"]
        only_test = sorted(set(test_classes) - set(classes)) or ["-"]
        raise UserError(f"train/ and {test_dir.name}/ in {train_dir.parent} must have the same class folders; only "
                        f"in train/: {', '.join(only_train)}; only in {test_dir.name}/: {', '.join(only_test)}")
    return classes


def _image_files(split_dir: Path, classes: list[str], signature: Signature) -> tuple[list[str], np.ndarray]:
    """The split's image paths (relative to the dataset's root) in a fixed order, and their labels; a
    class without images is an error in either split. Each file's size and time go into `signature`."""
    names: list[str] = []
    counts: list[int] = []
    for name in classes:
        folder = split_dir / name
        found = sorted((e.name, e) for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_SUFFIXES)
                       and not e.name.startswith(".") and e.is_file())
        if not found:
            raise UserError(f"{folder} holds no PNG or JPEG images; every class needs images in both splits")
        prefix = f"{split_dir.name}/{name}/"
        for file_name, entry in found:
            signature.add(prefix + file_name, entry.stat())
            names.append(prefix + file_name)
        counts.append(len(found))
    return names, np.repeat(np.arange(len(classes), dtype=np.int64), counts)
