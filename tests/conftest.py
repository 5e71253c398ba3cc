"""Shared fixtures: a small synthetic dataset in the official CIFAR-10 layout, tiny configs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Tests are small: more threads than cores only adds contention on the 2-core CI machine.
torch.set_num_threads(2)

# Decoded datasets go to a cache of the session's own (subprocesses inherit it), never the user's.
_CACHE = tempfile.mkdtemp(prefix="kdlab-test-cache-")
os.environ["KDLAB_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

TINY = {"width": 0.0625, "train_limit": 256, "test_limit": 128, "batch_size": 64, "eval_batch_size": 128,
        "dataset": "synthetic"}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the synthetic dataset (written once per test session)."""
    from kdlab.data import load_dataset

    root = tmp_path_factory.mktemp("data")
    load_dataset("synthetic", root)
    return root


@pytest.fixture
def tiny(synthetic_dir: Path) -> dict:
    """Overrides for a run that trains in about a second on a CPU."""
    return {**TINY, "data_dir": str(synthetic_dir)}


@pytest.fixture
def image_folder(tmp_path: Path):
    """A factory of small image-folder datasets: make(name, classes=2, per_class=12, size=8, seed=0).

    Each class is a brightness band with noise, so a tiny model learns it in an epoch or two."""
    import numpy as np
    from PIL import Image

    def make(name: str = "digits", classes: int = 2, per_class: int = 12, size: int = 8, seed: int = 0,
             where: Path | None = None) -> Path:
        root = (where or tmp_path) / name
        rng = np.random.default_rng(seed)
        for split, count in (("train", per_class), ("test", max(2, per_class // 3))):
            for label in range(classes):
                folder = root / split / f"class{label}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    base = int(255 * label / max(1, classes - 1))
                    pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.png")
        return root

    return make
