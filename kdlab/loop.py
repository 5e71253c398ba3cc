"""The training loop: one loop for every run, from scratch or distilled, on CPU or GPU.

Read it top to bottom: set up (data, model, method, optimiser), resume from the last checkpoint,
then per epoch train, evaluate, checkpoint and record. Methods supply loss terms; the loop never
asks which method it runs. Nothing inside a step waits for the device: losses and accuracies
accumulate on it and are read at the end of the epoch (and every `SYNC_EVERY` steps for the
progress bar).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdlab.config import Config
from kdlab.data import load_dataset
from kdlab.data.datasets import Dataset
from kdlab.data.loader import DeviceLoader, channel_stats
from kdlab.device import device_name, resolve_device, versions
from kdlab.errors import RunBusy
from kdlab.methods import METHODS, Method
from kdlab.models import count_params, create_model, paper_params
from kdlab.progress import Progress
from kdlab.store import Heartbeat, RunRecord, Store, owner_id
from kdlab.teacher import Teacher
from kdlab.timing import SegmentTimer

SYNC_EVERY = 50
CHECKPOINT_FORMAT = "kdlab-checkpoint"


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: the run is stopped and marked failed."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"loss became NaN or infinite at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


@dataclass
class Setup:
    """Everything a run trains with, built once."""

    device: torch.device
    student: nn.Module
    student_fn: nn.Module  # the student as called in the step (compiled or not)
    method: Method
    optimizer: torch.optim.Optimizer
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    autocast: Any


def lr_factor(cfg: Config, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr. cosine and multistep change per epoch, as the paper's PyTorch
    schedulers stepped once an epoch did; onecycle (a linear ramp up then down) changes per step."""
    if cfg.scheduler == "constant":
        return 1.0
    if cfg.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.scheduler == "multistep":
        return cfg.gamma ** sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
    progress = (epoch * steps_per_epoch + step) / max(1, cfg.epochs * steps_per_epoch)
    if cfg.warmup > 0 and progress < cfg.warmup:
        return max(progress / cfg.warmup, 1e-3)
    return max(0.0, (1.0 - progress) / (1.0 - cfg.warmup))


def build(cfg: Config, dataset: Dataset, teacher_model: nn.Module | None) -> Setup:
    """Data loaders, student, method and optimiser for a config."""
    device = resolve_device(cfg.device)
    if cfg.threads and device.type == "cpu":
        # Tiny convolutions gain nothing from intra-op threads, and lose badly when a core is busy.
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    student = create_model(cfg.model, cfg.width, dataset.num_classes).to(device, memory_format=memory_format)
    method = METHODS[cfg.method](cfg, student, teacher_model).to(device, memory_format=memory_format)
    params = [p for p in (*student.parameters(), *method.parameters()) if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                                weight_decay=cfg.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    mean, std = channel_stats(dataset.train.images)
    common = dict(mean=mean, std=std, channels_last=cfg.channels_last, seed=cfg.seed)
    train_loader = DeviceLoader(dataset.train, cfg.batch_size, device, train=True, augment=cfg.augment,
                                limit=cfg.train_limit, **common)
    test_loader = DeviceLoader(dataset.test, cfg.eval_batch_size, device, train=False, limit=cfg.test_limit, **common)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.precision == "bf16" else nullcontext
    return Setup(device, student, compile_module(student, cfg.compile), method, optimizer, train_loader,
                 test_loader, autocast)


def compile_module(module: nn.Module, mode: str) -> nn.Module:
    """torch.compile with the configured mode ('none' leaves the module as it is)."""
    if mode == "none":
        return module
    return torch.compile(module, mode=None if mode == "default" else mode)


def run(cfg: Config, store: Store, *, teacher: Teacher | None = None, teacher_model: nn.Module | None = None,
        dataset: Dataset | None = None, quiet: bool = False, silent: bool = False,
        label: str | None = None, on_claim: Callable[[], None] | None = None) -> RunRecord:
    """Train (or resume, or just return) the run `cfg` describes, recording it in `store`."""
    run_id = cfg.run_hash()
    store.ensure(run_id, cfg.to_dict(), label)
    existing = store.get(run_id)
    if existing is not None and existing.status == "done":
        return existing
    owner = owner_id()
    state = store.claim(run_id, owner)
    if state == "done":
        return store.get(run_id)
    if state == "busy":
        raise RunBusy(f"run {run_id} is being trained by another live process: wait for it, or stop that process")
    if on_claim is not None:
        on_claim()
    try:
        with Heartbeat(store, run_id, owner):
            dataset = dataset or load_dataset(cfg.dataset, cfg.data_dir)
            _train(cfg, store, run_id, dataset, teacher, teacher_model, quiet, silent)
    except NonFiniteLoss as e:
        store.fail(run_id, str(e))
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            store.release(run_id, owner)
        else:
            store.fail(run_id, f"{type(e).__name__}: {e}")
        raise
    return store.get(run_id)


def _train(cfg: Config, store: Store, run_id: str, dataset: Dataset, teacher: Teacher | None,
           teacher_model: nn.Module | None, quiet: bool, silent: bool) -> None:
    s = build(cfg, dataset, teacher_model if teacher is None else teacher.model)
    timer = SegmentTimer(s.device)
    if teacher is not None:
        teacher._timer = timer
    store.set_info(run_id, device=device_name(s.device), versions_json=versions(), params=count_params(s.student),
                   paper_params=paper_params(s.student))
    start_epoch, history, elapsed = _resume(store, run_id, s, timer)
    progress = Progress(cfg.epochs, len(s.train_loader), s.train_loader.batch_size, quiet=quiet,
                        silent=silent, label=f"{cfg.model}@{cfg.width:g}/{cfg.method} {run_id[:8]}")
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_metrics = _train_epoch(cfg, s, teacher, timer, epoch, progress)
        with timer("eval"):
            test_loss, test_acc = evaluate(s.student_fn, s.test_loader, s.autocast)
        elapsed += time.perf_counter() - t0
        metrics = {**train_metrics, "test_loss": test_loss, "test_acc": test_acc,
                   "time_s": time.perf_counter() - t0}
        history.append(metrics)
        _checkpoint(store, run_id, cfg, s, epoch + 1, history, elapsed, timer.collect())
        if epoch + 1 in cfg.snapshots:
            store.save_snapshot(run_id, epoch + 1)
        store.record_epoch(run_id, epoch + 1, metrics)
        progress.epoch_done(epoch + 1, metrics)
    best = max(range(len(history)), key=lambda i: history[i]["test_acc"])
    timing = _timing_summary(timer.collect(), elapsed)
    peak = torch.cuda.max_memory_allocated(s.device) if s.device.type == "cuda" else None
    store.finish(run_id, {"final_acc": history[-1]["test_acc"], "best_acc": history[best]["test_acc"],
                          "best_epoch": best + 1, "wall_s": elapsed, "timing": timing, "peak_mem_bytes": peak})


def _train_epoch(cfg: Config, s: Setup, teacher: Teacher | None, timer: SegmentTimer, epoch: int,
                 progress: Progress) -> dict[str, Any]:
    s.student.train()
    s.method.train()
    s.method.start_epoch(epoch)
    device = s.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    terms_sum: dict[str, Tensor] = {}
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    steps, seen = len(s.train_loader), 0
    batches = s.train_loader.epoch(epoch)
    for step in range(steps):
        with timer("data"):
            batch = next(batches)
        lr = cfg.lr * lr_factor(cfg, epoch, step, steps)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        with timer("step"):
            with s.autocast():
                logits, terms = s.method(s.student_fn, batch, teacher)
            loss = sum(terms.values())
            s.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            s.optimizer.step()
        loss = loss.detach()
        loss_sum += loss
        correct += (logits.detach().argmax(1) == batch.y).sum()
        for name, value in terms.items():
            terms_sum[name] = terms_sum.get(name, 0) + value.detach().float()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        seen += len(batch.y)
        if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
            bad = int(first_bad)  # the one wait for the device, every SYNC_EVERY steps
            if bad >= 0:
                raise NonFiniteLoss(epoch + 1, bad + 1)
            progress.step(epoch + 1, step + 1, float(loss_sum) / (step + 1), float(correct) / seen * 100)
    return {"train_loss": float(loss_sum) / steps, "train_acc": float(correct) / seen * 100, "lr": lr,
            "terms": {k: float(v) / steps for k, v in terms_sum.items()}}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, autocast: Any = nullcontext) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) over a split, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    for batch in loader.epoch(0):
        with autocast():
            logits = model(batch.x)
        loss_sum += nn.functional.cross_entropy(logits.float(), batch.y, reduction="sum")
        correct += (logits.argmax(1) == batch.y).sum()
    model.train(was_training)
    return float(loss_sum) / loader.n, float(correct) / loader.n * 100


def _resume(store: Store, run_id: str, s: Setup, timer: SegmentTimer) -> tuple[int, list[dict[str, Any]], float]:
    """Continue from the last whole checkpoint: weights, optimiser, history and time so far."""
    ckpt = store.load_checkpoint(run_id)
    if ckpt is None:
        store.truncate_epochs(run_id, 0)
        return 0, [], 0.0
    s.student.load_state_dict(ckpt["student"])
    s.method.load_state_dict(ckpt["method"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    history = list(ckpt["history"])
    # The database may lag the checkpoint by the epoch whose row was not yet written: replay it.
    store.truncate_epochs(run_id, 0)
    for i, metrics in enumerate(history):
        store.record_epoch(run_id, i + 1, metrics)
    timer.totals.update(ckpt["timing"])
    return ckpt["epoch"], history, ckpt["elapsed_s"]


def _checkpoint(store: Store, run_id: str, cfg: Config, s: Setup, epoch: int, history: list[dict[str, Any]],
                elapsed: float, timing: dict[str, float]) -> None:
    store.save_checkpoint(run_id, {
        "format": CHECKPOINT_FORMAT, "version": 1, "run_id": run_id, "config": cfg.to_dict(), "epoch": epoch,
        "model": {"name": cfg.model, "width": cfg.width, "num_classes": s.student.num_classes},
        "student": s.student.state_dict(), "method": s.method.state_dict(), "optimizer": s.optimizer.state_dict(),
        "history": history, "elapsed_s": elapsed, "timing": timing,
    })


def _timing_summary(totals: dict[str, float], wall: float) -> dict[str, float]:
    """Split the wall time: data, teacher forward, student step (without the teacher), evaluation."""
    teacher = totals.get("teacher", 0.0)
    parts = {"data_s": totals.get("data", 0.0), "teacher_s": teacher,
             "student_s": max(0.0, totals.get("step", 0.0) - teacher), "eval_s": totals.get("eval", 0.0)}
    parts["other_s"] = max(0.0, wall - sum(parts.values()))
    parts["wall_s"] = wall
    return parts
