"""A run as the engine trains it, whole when it is made (`make_job`): its config and identity, what it
trains with (`Setup`: student, method, optimiser, precision), its clock, its progress line and
loggers, and where it stands (the epoch it starts from, its history and time so far, restored from a
checkpoint when it resumes). The loop and the benchmarks make jobs the same way; the engine keeps
its own per-run device state (`kdlab.engine`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdlab.checkpoints import restore
from kdlab.config import Config
from kdlab.data.datasets import Dataset
from kdlab.device import resolve_device
from kdlab.loggers import RunLoggers
from kdlab.methods import METHODS, Method
from kdlab.models import create_model
from kdlab.models.weights import load_initial_weights
from kdlab.progress import Progress
from kdlab.teacher import Teacher
from kdlab.timing import SegmentTimer


@dataclass
class Setup:
    """Everything a run trains with, built once."""

    device: torch.device
    student: nn.Module
    student_fn: nn.Module  # the student as called in the step (compiled or not)
    method: Method
    optimizer: torch.optim.Optimizer
    lr: Tensor  # the optimiser's learning rate, a device tensor set before every step
    autocast: Callable[[], AbstractContextManager]
    scaler: torch.amp.GradScaler | None = None  # fp16: the loss scale, kept and updated on the device


@dataclass
class Job:
    """One run of a group that trains side by side (`make_job` builds one)."""

    cfg: Config
    run_id: str
    label: str
    teacher: Teacher | None
    s: Setup
    timer: SegmentTimer  # its own device time: step, eval, data and teacher shares (kdlab.accounting)
    progress: Progress
    log: RunLoggers  # TensorBoard, MLflow (kdlab.loggers)
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0  # wall seconds charged to the run so far
    alive: bool = True  # False once its loss went non-finite

    def active(self, epoch: int) -> bool:
        return self.alive and self.start_epoch <= epoch < self.cfg.epochs

    def release(self) -> None:
        """Drop the models and the optimiser once the group is over (the next group's memory); the
        record (history, times) stays."""
        self.s = None  # type: ignore[assignment]

    @property
    def name(self) -> str:
        """How the run is named in messages: model, width, method and the start of its id."""
        return f"{self.cfg.model}@{self.cfg.width:g}/{self.cfg.method} {self.run_id[:8]}"


def make_job(cfg: Config, dataset: Dataset, *, teacher: Teacher | None = None, run_id: str | None = None,
             label: str | None = None, sync_bn: bool = False, device: torch.device | None = None,
             checkpoint: dict[str, Any] | None = None, progress: Progress | None = None,
             log: RunLoggers | None = None) -> Job:
    """A job for `cfg`: its setup built (`build`), and, given the run's last `checkpoint`, its weights,
    optimiser, history and time restored from it. `device` is where its time is measured (the
    setup's device by default); without `progress` or `log` it shows no progress line and logs nowhere."""
    s = build(cfg, dataset, teacher.model if teacher is not None else None, sync_bn)
    run_id = run_id or cfg.run_hash()
    timer = SegmentTimer(device or s.device)
    start, history, elapsed = 0, [], 0.0
    if checkpoint is not None:
        restore(s, checkpoint)
        timer.totals.update(checkpoint["timing"])
        start, history, elapsed = checkpoint["epoch"], list(checkpoint["history"]), checkpoint["elapsed_s"]
    progress = progress or Progress(cfg.epochs, 1, cfg.batch_size, silent=True)
    return Job(cfg, run_id, label or run_id, teacher, s, timer, progress, log or RunLoggers(), start, history,
               elapsed)


def engine_device(cfg: Config) -> tuple[torch.device, torch.memory_format]:
    """The run's device (with its CPU thread count applied) and the memory format of its tensors."""
    device = resolve_device(cfg.device)
    if cfg.threads and device.type == "cpu":
        # Tiny convolutions gain nothing from intra-op threads, and lose badly when a core is busy.
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda" and not torch.backends.cudnn.deterministic:
        # Shapes are fixed: pick each convolution's fastest kernel once. Not where the caller asked for
        # deterministic kernels (an equality check): benchmarking may pick different ones run to run.
        torch.backends.cudnn.benchmark = True
    return device, torch.channels_last if cfg.channels_last else torch.contiguous_format


def build(cfg: Config, dataset: Dataset, teacher_model: nn.Module | None, sync_bn: bool = False) -> Setup:
    """Student, method and optimiser for a config (`sync_bn`: BatchNorm statistics over all the
    processes of a run on several GPUs)."""
    device, memory_format = engine_device(cfg)
    torch.manual_seed(cfg.seed)
    student = create_model(cfg.model, cfg.width, dataset.num_classes, **cfg.model_args)
    if cfg.weights:  # --set weights=PATH (kdlab.models.weights)
        load_initial_weights(student, cfg.weights)
    student = student.to(device, memory_format=memory_format)
    method = METHODS[cfg.method](cfg, student, teacher_model).to(device, memory_format=memory_format)
    if sync_bn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    params = [p for p in (*student.parameters(), *method.parameters()) if p.requires_grad]
    # Fused SGD with the learning rate as a device tensor: one kernel for the whole update, and no
    # host value baked into a captured step.
    lr = torch.tensor(cfg.lr, device=device)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                                weight_decay=cfg.weight_decay, fused=True)
    return Setup(device, student, compile_module(student, cfg.compile), method, optimizer, lr,
                 autocast_for(device, cfg.precision), loss_scaler(device, cfg.precision))


def compile_module(module: nn.Module, mode: str) -> nn.Module:
    """torch.compile with the configured mode ('none' leaves the module as it is)."""
    if mode == "none":
        return module
    return torch.compile(module, mode=None if mode == "default" else mode)


def prepare_teacher(model: nn.Module, cfg: Config, run_id: str | None = None) -> Teacher:
    """A frozen teacher on the run's device, in its memory format, compiled as the run is."""
    device, memory_format = engine_device(cfg)
    model = model.to(device, memory_format=memory_format).eval()
    return Teacher(model, run_id=run_id, forward=compile_module(model, cfg.compile),
                   copy_outputs=cfg.compile == "reduce-overhead")


def autocast_for(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """bf16 or fp16 autocast without its weight cache (a cached cast would be replayed stale from a graph)."""
    if precision not in ("bf16", "fp16"):
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def loss_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (None for other precisions). With fused SGD its whole update stays on the
    device (the optimiser skips a step whose gradients overflowed; the scale is halved or grown in
    place), so a step that uses it can still be captured as a CUDA graph."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
