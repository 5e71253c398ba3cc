"""Hugging Face datasets (hf:PATH_OR_NAME), offline, on datasets the tests build with the library itself."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdlab.data import identify_dataset, load_dataset
from kdlab.errors import UserError

datasets = pytest.importorskip("datasets")

CLASSES = ["cat", "dog", "emu"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No network, and the library's own cache in the test's folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _images(seed: int, n: int, size: tuple[int, int] = (10, 8)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _dataset_dict(test_name: str = "test", labels: dict[str, list[int]] | None = None) -> tuple:
    labels = labels or {"train": [0, 1, 2, 1, 0, 2, 2, 1, 0], test_name: [2, 0, 1]}
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    splits, pixels = {}, {}
    for i, (name, y) in enumerate(labels.items()):
        images = _images(i, len(y))
        splits[name] = datasets.Dataset.from_dict({"img": images, "label": y}, features=features)
        pixels[name] = np.stack([np.asarray(im) for im in images])
    return datasets.DatasetDict(splits), pixels, labels


def test_a_saved_dataset_dict(tmp_path):
    dd, pixels, labels = _dataset_dict()
    dd.save_to_disk(str(tmp_path / "saved"))
    ds = load_dataset(f"hf:{tmp_path / 'saved'}")
    assert ds.classes == CLASSES and ds.name == "saved"
    assert np.array_equal(ds.train.images, pixels["train"]) and ds.train.labels.tolist() == labels["train"]
    assert np.array_equal(ds.test.images, pixels["test"]) and ds.test.labels.tolist() == labels["test"]
    identity = identify_dataset(f"hf:{tmp_path / 'saved'}")
    assert identity.location == f"hf:{(tmp_path / 'saved').resolve()}" and identity.fingerprint == ds.fingerprint


def test_same_images_as_a_folder_are_the_same_data(tmp_path):
    """An HF dataset and a folder of the same images, classes and order have one fingerprint."""
    dd, pixels, labels = _dataset_dict()
    dd.save_to_disk(str(tmp_path / "saved"))
    for split in ("train", "test"):
        order = np.argsort(labels[split], kind="stable")  # a folder lists its images class by class
        for rank, i in enumerate(order):
            folder = tmp_path / "folder" / split / CLASSES[labels[split][i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[split][i]).save(folder / f"{rank:03d}.png")
    for split in ("train", "test"):
        order = np.argsort(labels[split], kind="stable")
        dd[split] = dd[split].select(order)
    dd.save_to_disk(str(tmp_path / "sorted"))
    assert load_dataset(f"hf:{tmp_path / 'sorted'}").fingerprint == load_dataset(str(tmp_path / "folder")).fingerprint


def test_parquet_files_and_a_validation_split(tmp_path):
    dd, pixels, _ = _dataset_dict(test_name="validation")
    (tmp_path / "pq" / "data").mkdir(parents=True)
    for name, split in dd.items():
        split.to_parquet(str(tmp_path / "pq" / "data" / f"{name}-00000-of-00001.parquet"))
    ds = load_dataset(f"hf:{tmp_path / 'pq'}", image_size=6)
    assert ds.classes == CLASSES and ds.train.images.shape == (9, 6, 6, 3) and len(ds.test) == 3


def test_an_imagefolder(tmp_path):
    for split, count in (("train", 4), ("test", 2)):
        for c in CLASSES[:2]:
            (tmp_path / "imf" / split / c).mkdir(parents=True)
            for i, image in enumerate(_images(len(split) + CLASSES.index(c), count)):
                image.save(tmp_path / "imf" / split / c / f"{i}.png")
    ds = load_dataset(f"hf:{tmp_path / 'imf'}")
    assert ds.classes == CLASSES[:2] and len(ds.train) == 8 and len(ds.test) == 4
    assert np.bincount(ds.train.labels).tolist() == [4, 4]


@pytest.mark.parametrize("problem, message", [
    ("unlabelled", r"labels outside 0\.\.2 .* an unlabelled split"),
    ("no-test", r"has the splits train; kdlab needs train and test \(or validation\)"),
    ("missing", r"Hugging Face dataset folder .*nowhere does not exist"),
])
def test_problems_are_one_line(tmp_path, problem, message):
    if problem == "unlabelled":
        dd, _, _ = _dataset_dict(labels={"train": [0, 1, 2], "test": [-1, -1]})
    else:
        dd, _, _ = _dataset_dict(labels={"train": [0, 1, 2]})
    dd.save_to_disk(str(tmp_path / "saved"))
    where = tmp_path / ("nowhere" if problem == "missing" else "saved")
    with pytest.raises(UserError, match=message) as err:
        load_dataset(f"hf:{where}")
    assert "\n" not in str(err.value)


def test_without_the_library_says_which_extra(tmp_path, monkeypatch):
    dd, _, _ = _dataset_dict()
    dd.save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"pip install 'kdlab\[hf\]'"):
        load_dataset(f"hf:{Path(tmp_path / 'saved')}")
