"""Shared fixtures: a small synthetic dataset in the official CIFAR-10 layout, tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tests are small: more threads than cores only adds contention on the 2-core CI machine.
torch.set_num_threads(2)

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
