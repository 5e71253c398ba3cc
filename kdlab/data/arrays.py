"""Datasets given as arrays (the Python API's ``data=``), named by a digest of their content.

``as_dataset`` takes a `Dataset`, a tuple ``(x_train, y_train, x_test, y_test)`` or a dict with
``train`` and ``test`` pairs (and optionally ``classes``). Images are numpy arrays or tensors,
``(N, H, W, C)`` or ``(N, C, H, W)`` with 1 or 3 channels, uint8 or floats in [0, 1]; labels are
integers. Like every dataset, arrays are identified by their content's fingerprint
(`fingerprint_arrays`), which a run's identity covers: the same arrays are the same run, other
arrays another. Their name (and the run's ``dataset`` setting) is ``arrays:<fingerprint>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdlab.data.datasets import DataIdentity, Dataset, Split, content_facts, fingerprint_arrays
from kdlab.errors import UserError


def array_identity(dataset: Dataset) -> DataIdentity:
    """The identity of a dataset given in memory: its fingerprint, and ``arrays:<fingerprint>`` as its place."""
    return DataIdentity(dataset.name, dataset.fingerprint,
                        {"name": "arrays", **content_facts(dataset.train, dataset.test, dataset.classes)})


def as_dataset(data: Any) -> Dataset:
    """A `Dataset` named ``arrays:<digest>`` from a Dataset, a 4-tuple or a dict of arrays."""
    classes = None
    if isinstance(data, Dataset):
        train, test, classes = data.train, data.test, data.classes
    elif isinstance(data, dict) and "train" in data and "test" in data:
        train, test, classes = _split(*data["train"], "train"), _split(*data["test"], "test"), data.get("classes")
    elif isinstance(data, (tuple, list)) and len(data) == 4:
        train, test = _split(data[0], data[1], "train"), _split(data[2], data[3], "test")
    else:
        raise UserError("data must be a dataset name or folder, a kdlab Dataset, (x_train, y_train, x_test, y_test) "
                        "or {'train': (x, y), 'test': (x, y)}")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(f"train and test images differ in size: {train.images.shape[1:3]} vs {test.images.shape[1:3]}")
    n = int(max(train.labels.max(initial=0), test.labels.max(initial=0))) + 1
    classes = [str(c) for c in (classes if classes is not None else range(n))]
    if len(classes) < n or min(train.labels.min(initial=0), test.labels.min(initial=0)) < 0:
        raise UserError(f"labels must lie in 0..{len(classes) - 1} (one per class name)")
    fingerprint = fingerprint_arrays(train, test, classes)
    return Dataset(f"arrays:{fingerprint}", train, test, classes, known_fingerprint=fingerprint)


def _split(images: Any, labels: Any, which: str) -> Split:
    x = _numpy(images)
    y = _numpy(labels)
    if x.ndim == 3:  # (N, H, W) grey
        x = x[..., None]
    if x.ndim != 4:
        raise UserError(f"{which} images must be (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise UserError(f"{which} images need 1 or 3 channels, got shape {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating) or x.size and (x.min() < 0 or x.max() > 1):
            raise UserError(f"{which} images must be uint8, or floats in [0, 1]; got {x.dtype}")
        x = np.round(x * 255).astype(np.uint8)
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{which} labels must be {len(x)} integers, got {y.dtype} {y.shape}")
    return Split(np.ascontiguousarray(x), y.astype(np.int64))


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)
