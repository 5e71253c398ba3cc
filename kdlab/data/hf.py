"""Hugging Face datasets: ``--dataset hf:PATH_OR_NAME`` (the ``kdlab[hf]`` extra), decoded into the
same cache as folders, with the same size policy, on every core.

PATH_OR_NAME is one of:

* a folder written by the ``datasets`` library's ``save_to_disk`` (a DatasetDict): ``load_from_disk``;
* any other local folder: ``load_dataset(PATH)``, which reads an ``imagefolder`` (class subfolders,
  or images with a metadata file) and folders of parquet or arrow files;
* a name on the Hugging Face hub (``user/dataset``): ``load_dataset(NAME)``, which downloads it
  once into the library's own cache, where the network allows.

The splits are ``train`` and ``test`` (else ``validation``, ``val`` or ``valid``). The images are the
first column of the ``Image`` feature, read as their encoded bytes here and decoded by the cache's
threads as files are; the labels are the first ``ClassLabel`` column (its names are the classes),
else an integer or string column named ``label`` or ``labels``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.data.cache import Plan, Source
from kdlab.data.datasets import DataMissing, Signature
from kdlab.data.decode import decode_images, image_size_of
from kdlab.errors import UserError

TEST_SPLITS = ("test", "validation", "val", "valid")
LABEL_NAMES = ("label", "labels")


def source(spec: str, image_size: int = 0) -> Source:
    """The Hugging Face dataset `spec` (a local folder or a hub name) as a cache source."""
    path = Path(spec).expanduser()
    opened: list[Any] = []
    root: Path | None = None
    if path.exists() or spec.startswith(("/", ".", "~")):
        if not path.exists():
            raise DataMissing(f"Hugging Face dataset folder {path} does not exist")
        if not path.is_dir():
            raise UserError(f"{path} is not a folder: hf:PATH takes a dataset's folder, or a name on the hub")
        root = path.resolve()
        location, name, signature = f"hf:{root}", root.name, _folder_signature(root)
    else:  # a hub name: its files are what the library downloaded
        opened.append(_open(_require(), spec, None))
        location, name = f"hf:{spec}", spec.replace("/", "_")
        signature = Signature("hf", spec)
        for split in opened[0].values():
            signature.add_files([Path(f["filename"]) for f in split.cache_files], Path("/"))

    def prepare() -> Plan:
        datasets = _require()
        dd = opened[0] if opened else _open(datasets, spec, root)
        splits = {"train": _split(dd, ("train",), spec), "test": _split(dd, TEST_SPLITS, spec)}
        image_col = _image_column(datasets, splits["train"], spec)
        classes, labels = _labels(datasets, splits, spec)
        encoded = {k: v.cast_column(image_col, datasets.Image(decode=False)) for k, v in splits.items()}
        first, first_name = _row(encoded["train"], image_col, 0, location, "train")
        shape = (image_size, image_size) if image_size else image_size_of(first, first_name)

        def task(split: str, start: int, stop: int) -> tuple:
            rows = encoded[split][start:stop][image_col]
            sources = [r["bytes"] if r.get("bytes") is not None else r["path"] for r in rows]
            names = [r.get("path") or f"{location} {split} row {start + i}" for i, r in enumerate(rows)]
            return decode_images, (sources, names, image_size, shape, first_name)

        return Plan(classes, labels, shape, task, parallel=True)

    return Source("hf", location, location, name, image_size, signature.hexdigest(), prepare)


def _require() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError("hf: datasets are read with the Hugging Face datasets library: pip install 'kdlab[hf]'"
                        ) from None
    return datasets


def _folder_signature(root: Path) -> Signature:
    signature = Signature("hf-folder")
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for file_name in sorted(files):
            path = Path(folder) / file_name
            signature.add(path.relative_to(root).as_posix(), path.stat())
    return signature


def _open(datasets: Any, spec: str, root: Path | None) -> Any:
    """The dataset's splits (a DatasetDict); the library's errors become one line."""
    try:
        if root is not None and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()):
            dd = datasets.load_from_disk(str(root))
        else:
            dd = datasets.load_dataset(str(root) if root is not None else spec)
    except Exception as exc:  # noqa: BLE001 (the library raises many kinds: missing, offline, malformed)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"the datasets library cannot read {spec} ({type(exc).__name__}: {first})") from None
    if not isinstance(dd, datasets.DatasetDict):
        raise UserError(f"{spec} is a single split: kdlab needs a dataset with train and test splits")
    return dd


def _split(dd: Any, names: tuple[str, ...], spec: str) -> Any:
    for name in names:
        if name in dd:
            return dd[name]
    raise UserError(f"{spec} has the splits {', '.join(dd)}; kdlab needs train and {' (or '.join(names[:2])})")


def _image_column(datasets: Any, split: Any, spec: str) -> str:
    for column, feature in split.features.items():
        if isinstance(feature, datasets.Image):
            return column
    raise UserError(f"{spec} has no image column (columns: {', '.join(split.features)})")


def _labels(datasets: Any, splits: dict[str, Any], spec: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """The class names and each split's labels as int64, checked to name a class each."""
    features = splits["train"].features
    column = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    column = column or next((c for c in LABEL_NAMES if c in features), None)
    if column is None:
        raise UserError(f"{spec} has no label column: a ClassLabel, or one named label (columns: "
                        f"{', '.join(features)})")
    values = {k: np.asarray(v.with_format("numpy")[column]) for k, v in splits.items()}
    if isinstance(features[column], datasets.ClassLabel):
        classes = [str(n) for n in features[column].names]
    elif all(v.dtype.kind in "iu" for v in values.values()):
        classes = [str(i) for i in range(int(max(v.max(initial=0) for v in values.values())) + 1)]
    else:
        classes = sorted({str(x) for v in values.values() for x in v})
        values = {k: np.searchsorted(classes, v.astype(str)) for k, v in values.items()}
    labels = {k: v.astype(np.int64) for k, v in values.items()}
    for split, y in labels.items():
        if len(y) == 0:
            raise UserError(f"the {split} split of {spec} is empty")
        if y.min() < 0 or y.max() >= len(classes):
            raise UserError(f"the {split} split of {spec} has labels outside 0..{len(classes) - 1} (e.g. "
                            f"{int(y[(y < 0) | (y >= len(classes))][0])}: an unlabelled split?)")
    return classes, labels


def _row(split: Any, column: str, i: int, location: str, name: str) -> tuple[str | bytes, str]:
    row = split[i][column]
    if row.get("bytes") is not None:
        return row["bytes"], row.get("path") or f"{location} {name} row {i}"
    return row["path"], row["path"]
