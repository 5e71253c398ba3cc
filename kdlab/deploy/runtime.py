"""ONNX Runtime: sessions, the test-set accuracy of a served model, and calibration batches.

Images reach an exported model exactly as they reach the PyTorch model in training: normalised
by the training set's channel statistics, NCHW float32, evaluation's centre view (no crop or flip).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlab.data import Dataset, dataset_for
from kdlab.data.loader import Batch, SplitLoader
from kdlab.data.residency import eval_loader
from kdlab.deploy import require
from kdlab.errors import UserError

CALIBRATION_BATCH = 64
CPU = torch.device("cpu")


def session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads (0: ORT's default, one per physical
    core, for evaluation; latency sets its own) and every graph optimisation."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings are about its own graph rewrites
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 (ORT raises its own exception types for unusable files)
        raise UserError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from None


def run_logits(sess: Any, x: torch.Tensor) -> np.ndarray:
    """Logits of a batch of normalised images, through the session."""
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]


def dataset_of(config: dict[str, Any], data_dir: str | None = None) -> Dataset:
    """The dataset a run was trained on (from `data_dir` when given: the data may have moved)."""
    return dataset_for(config, data_dir)


def normalisation(dataset: Dataset) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0-1 scale) the run's images were normalised with in training."""
    return dataset.stats


def _loader(dataset: Dataset, train_split: bool, batch: int, limit: int, crop_size: int) -> SplitLoader:
    mean, std = normalisation(dataset)
    split = dataset.train if train_split else dataset.test
    return eval_loader(split, batch, CPU, mean=mean, std=std, limit=limit, crop_size=crop_size)


def evaluation_loader(config: dict[str, Any], dataset: Dataset) -> SplitLoader:
    """The run's test set (its test_limit applied), in evaluation batches (centre crops when the run
    trained on crops)."""
    return _loader(dataset, False, int(config.get("eval_batch_size") or 1000),
                   int(config.get("test_limit") or 0), int(config.get("crop_size") or 0))


def train_size(config: dict[str, Any], dataset: Dataset) -> int:
    """How many training images the run used (its train_limit applied)."""
    limit = int(config.get("train_limit") or 0)
    return min(limit, len(dataset.train)) if limit else len(dataset.train)


def calibration_loader(config: dict[str, Any], dataset: Dataset, count: int) -> SplitLoader:
    """The first `count` training images of the run, unaugmented: what int8 ranges are set from."""
    available = train_size(config, dataset)
    if not 1 <= count <= available:
        raise UserError(f"--calibration must be between 1 and the {available} training images of the run, "
                        f"got {count}")
    return _loader(dataset, True, min(CALIBRATION_BATCH, count), count, int(config.get("crop_size") or 0))


def real_rows(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's images and labels without the rows that pad evaluation's last batch to full size."""
    if batch.mask is None:
        return batch.x, batch.y
    return batch.x[batch.mask], batch.y[batch.mask]


def images(loader: SplitLoader) -> list[np.ndarray]:
    """A split's images, batch by batch, as the float32 arrays ONNX Runtime takes."""
    return [real_rows(b)[0].numpy() for b in loader.epoch(0)]


def first_batch(loader: SplitLoader, size: int = 256) -> torch.Tensor:
    """Up to `size` images from the start of a split (the check batch of an export)."""
    return real_rows(next(loader.epoch(0)))[0][:size]


def accuracy(sess: Any, loader: SplitLoader) -> float:
    """Top-1 accuracy (percent) of an ONNX model over a whole split."""
    correct = 0
    for batch in loader.epoch(0):
        x, y = real_rows(batch)
        correct += int((run_logits(sess, x).argmax(1) == y.numpy()).sum())
    return correct / loader.n * 100
