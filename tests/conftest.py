"""Shared fixtures: a small synthetic dataset in the official CIFAR-10 layout, tiny configs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="session")
def study(tmp_path_factory, synthetic_dir):
    """A tiny teacher, its KD student, and the student compressed: pruned 0.5 + KD recovery, int8 (shared by
    the deploy tests; a test that changes the runs dir works on a copy)."""
    import kdlab
    from kdlab.cli import main
    from kdlab.deploy import latency
    from kdlab.store import Store

    runs = tmp_path_factory.mktemp("runs")
    common = {**TINY, "data_dir": str(synthetic_dir), "epochs": 2, "runs_dir": runs}
    teacher = kdlab.train("resnet18", preset="smoke", **{**common, "width": 0.125})
    student = kdlab.distill(teacher.run_id, "resnet18", preset="smoke", **common)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency, "ON_CREATION_SECONDS", 0.0)
        mp.setattr(latency, "WARMUP", 1)
        code = main(["compress", student.run_id[:8], "--prune", "0.5", "--quantize", "int8", "--epochs", "1",
                     "--calibration", "64", "--qat", "never", "--runs-dir", str(runs), "--quiet"])
    store = Store(runs, create=False)
    made = {r.run_id: r for r in store.runs()}
    store.close()
    return SimpleNamespace(runs=runs, teacher=teacher, student=student, code=code, made=made)


@pytest.fixture(autouse=True)
def _fresh_once_per_process_messages():
    """kdlab says some things once per process (the data's residency, the precision chosen): forgotten
    before each test, so what a test sees does not depend on which tests ran before it in its process
    (the suite runs in several processes, in an order that varies)."""
    from kdlab import device
    from kdlab.data import residency

    residency._announced.clear()
    device._ANNOUNCED.clear()
