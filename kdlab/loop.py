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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdlab import health
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


def loader_key(cfg: Config) -> tuple:
    """Runs with equal keys see identical batches, so they can train side by side on one loader."""
    return (cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.test_limit, cfg.batch_size, cfg.eval_batch_size,
            cfg.seed, cfg.augment, cfg.channels_last, cfg.precision, cfg.device)


def build_loaders(cfg: Config, dataset: Dataset, device: torch.device) -> tuple[DeviceLoader, DeviceLoader]:
    """The training and test loaders a config asks for (shared by every run with its loader_key)."""
    mean, std = channel_stats(dataset.train.images)
    common = dict(mean=mean, std=std, channels_last=cfg.channels_last, seed=cfg.seed)
    train = DeviceLoader(dataset.train, cfg.batch_size, device, train=True, augment=cfg.augment,
                         limit=cfg.train_limit, **common)
    test = DeviceLoader(dataset.test, cfg.eval_batch_size, device, train=False, limit=cfg.test_limit, **common)
    return train, test


def engine_device(cfg: Config) -> tuple[torch.device, torch.memory_format]:
    """The run's device (with its CPU thread count applied) and the memory format of its tensors."""
    device = resolve_device(cfg.device)
    if cfg.threads and device.type == "cpu":
        # Tiny convolutions gain nothing from intra-op threads, and lose badly when a core is busy.
        torch.set_num_threads(cfg.threads)
    return device, torch.channels_last if cfg.channels_last else torch.contiguous_format


def build(cfg: Config, dataset: Dataset, teacher_model: nn.Module | None,
          loaders: tuple[DeviceLoader, DeviceLoader] | None = None) -> Setup:
    """Student, method, optimiser (and loaders, unless given) for a config."""
    device, memory_format = engine_device(cfg)
    torch.manual_seed(cfg.seed)
    student = create_model(cfg.model, cfg.width, dataset.num_classes, **cfg.model_args)
    student = student.to(device, memory_format=memory_format)
    method = METHODS[cfg.method](cfg, student, teacher_model).to(device, memory_format=memory_format)
    params = [p for p in (*student.parameters(), *method.parameters()) if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                                weight_decay=cfg.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    train_loader, test_loader = loaders or build_loaders(cfg, dataset, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.precision == "bf16" else nullcontext
    return Setup(device, student, compile_module(student, cfg.compile), method, optimizer, train_loader,
                 test_loader, autocast)


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


@dataclass
class Job:
    """One run inside a group that trains side by side: its setup, history and running sums."""

    cfg: Config
    run_id: str
    teacher: Teacher | None
    label: str
    s: Setup | None = None
    timer: SegmentTimer | None = None
    progress: Progress | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    start_epoch: int = 0
    alive: bool = True
    sums: dict[str, Any] = field(default_factory=dict)

    def active(self, epoch: int) -> bool:
        return self.alive and self.start_epoch <= epoch < self.cfg.epochs


def run(cfg: Config, store: Store, *, teacher: Teacher | None = None, teacher_model: nn.Module | None = None,
        dataset: Dataset | None = None, quiet: bool = False, silent: bool = False,
        label: str | None = None, on_claim: Callable[[], None] | None = None) -> RunRecord:
    """Train (or resume, or just return) the run `cfg` describes, recording it in `store`."""
    if teacher is None and teacher_model is not None:
        teacher = prepare_teacher(teacher_model, cfg)
    records = run_group([(cfg, teacher, label)], store, dataset=dataset, quiet=quiet, silent=silent,
                        on_claim=(lambda _id, _label: on_claim()) if on_claim else None)
    record = records[cfg.run_hash()]
    if record is None:
        raise RunBusy(f"run {cfg.run_hash()} is being trained by another live process: wait for it, or stop "
                      "that process")
    return record


def run_group(specs: list[tuple[Config, Teacher | None, str | None]], store: Store, *,
              dataset: Dataset | None = None, quiet: bool = False, silent: bool = False,
              on_claim: Callable[[str, str], None] | None = None) -> dict[str, RunRecord | None]:
    """Train several runs side by side on one loader: each batch is made once, and a teacher
    serving several students runs once per batch for all of them (issue: KD almost free).

    All runs must share `loader_key`. Returns each run's record (None: another process holds it).
    Finished runs are returned as they are; interrupted ones resume from their checkpoints.
    """
    keys = {loader_key(cfg) for cfg, _, _ in specs}
    if len(keys) > 1:
        raise ValueError("runs of one group must share their loader settings (loader_key)")
    out: dict[str, RunRecord | None] = {}
    owner = owner_id()
    jobs = []
    for cfg, teacher, label in specs:
        run_id = cfg.run_hash()
        store.ensure(run_id, cfg.to_dict(), label)
        state = store.claim(run_id, owner)
        if state != "claimed":
            out[run_id] = store.get(run_id) if state == "done" else None
            continue
        if on_claim is not None:
            on_claim(run_id, label or run_id)
        jobs.append(Job(cfg, run_id, teacher, label or run_id))
    if not jobs:
        return out
    try:
        with Heartbeat(store, [j.run_id for j in jobs], owner):
            dataset = dataset or load_dataset(jobs[0].cfg.dataset, jobs[0].cfg.data_dir)
            _train_group(jobs, store, dataset, quiet, silent)
    except BaseException as e:
        for job in jobs:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                store.release(job.run_id, owner)
            elif job.alive:
                store.fail(job.run_id, f"{type(e).__name__}: {e}")
        raise
    for job in jobs:
        out[job.run_id] = store.get(job.run_id)
    return out


def _train_group(jobs: list[Job], store: Store, dataset: Dataset, quiet: bool, silent: bool) -> None:
    device = resolve_device(jobs[0].cfg.device)
    loaders = build_loaders(jobs[0].cfg, dataset, device)
    for job in jobs:
        job.s = build(job.cfg, dataset, job.teacher.model if job.teacher else None, loaders)
        job.timer = SegmentTimer(device)
        store.set_info(job.run_id, device=device_name(device), versions_json=versions(),
                       params=count_params(job.s.student), paper_params=paper_params(job.s.student))
        job.start_epoch, job.history, job.elapsed = _resume(store, job.run_id, job.s, job.timer)
        job.progress = Progress(job.cfg.epochs, len(loaders[0]), loaders[0].batch_size,
                                quiet=quiet, silent=silent,
                                label=f"{job.cfg.model}@{job.cfg.width:g}/{job.cfg.method} {job.run_id[:8]}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    group_timer = SegmentTimer(device)
    first, last = min(j.start_epoch for j in jobs), max(j.cfg.epochs for j in jobs)
    for epoch in range(first, last):
        active = [j for j in jobs if j.active(epoch)]
        if not active:
            continue
        t0 = time.perf_counter()
        before = {j.run_id: _own_time(j.timer.collect()) for j in active}
        data_before = group_timer.collect().get("data", 0.0)
        _train_epoch(active, loaders[0], group_timer, epoch, store)
        for job in active:
            if job.alive:
                with job.timer("eval"):
                    job.sums["test"] = evaluate(job.s.student_fn, loaders[1], job.s.autocast)
        # Charge the epoch's wall time to the runs in proportion to the device time each used.
        wall = time.perf_counter() - t0
        data = group_timer.collect().get("data", 0.0) - data_before
        own = {j.run_id: _own_time(j.timer.collect()) - before[j.run_id] for j in active}
        total = sum(own.values()) or 1.0
        for job in active:
            if not job.alive:
                continue
            job.timer.totals["data"] += data * own[job.run_id] / total
            _end_epoch(job, store, epoch, wall * own[job.run_id] / total)
    for job in jobs:
        if job.alive and job.history:
            _finish(job, store, device, len(jobs))


def _own_time(totals: dict[str, float]) -> float:
    return totals.get("step", 0.0) + totals.get("eval", 0.0)


def new_sums(device: torch.device) -> dict[str, Any]:
    """A run's per-epoch running sums, kept on the device so that no step waits for it."""
    return {"loss": torch.zeros((), device=device), "correct": torch.zeros((), device=device, dtype=torch.long),
            "terms": {}, "bad": torch.full((), -1, device=device, dtype=torch.long), "seen": 0}


def _train_epoch(jobs: list[Job], loader: DeviceLoader, group_timer: SegmentTimer, epoch: int, store: Store) -> None:
    for job in jobs:
        job.s.student.train()
        job.s.method.train()
        job.s.method.start_epoch(epoch)
        job.sums = new_sums(loader.device)
    steps = len(loader)
    batches = loader.epoch(epoch)
    for step in range(steps):
        with group_timer("data"):
            batch = next(batches)
        for job in jobs:
            if job.alive:
                _step(job, batch, epoch, step, steps)
        if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
            for job in jobs:
                if job.alive:
                    _check_finite(job, store, epoch, step)


def _step(job: Job, batch: Any, epoch: int, step: int, steps: int) -> None:
    """One optimisation step of one run. Nothing here waits for the device."""
    s, sums = job.s, job.sums
    lr = job.cfg.lr * lr_factor(job.cfg, epoch, step, steps)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    if job.teacher is not None:
        job.teacher._timer = job.timer
    with job.timer("step"):
        with s.autocast():
            logits, terms = s.method(s.student_fn, batch, job.teacher)
        loss = sum(terms.values())
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
    loss = loss.detach()
    sums["loss"] += loss
    sums["correct"] += (logits.detach().argmax(1) == batch.y).sum()
    for name, value in terms.items():
        sums["terms"][name] = sums["terms"].get(name, 0) + value.detach().float()
    sums["bad"] = torch.where((sums["bad"] < 0) & ~torch.isfinite(loss), step, sums["bad"])
    sums["seen"] += len(batch.y)
    sums["lr"], sums["steps"] = lr, step + 1
    if job.progress is not None:
        job.progress.tick(epoch + 1, step + 1)  # plain integers: the live line's clock, no device sync


def _check_finite(job: Job, store: Store, epoch: int, step: int) -> None:
    """Every SYNC_EVERY steps: the one wait for the device. A non-finite loss fails the run."""
    sums = job.sums
    bad = int(sums["bad"])
    if bad >= 0:
        job.alive = False
        store.fail(job.run_id, f"loss became NaN or infinite at epoch {epoch + 1}, step {bad + 1}")
        return
    acc = float(sums["correct"]) / sums["seen"] * 100
    job.progress.step(epoch + 1, step + 1, float(sums["loss"]) / (step + 1), acc)


def _end_epoch(job: Job, store: Store, epoch: int, wall: float) -> None:
    sums, steps = job.sums, job.sums["steps"]
    test_loss, test_acc = sums["test"]
    t0 = time.perf_counter()
    metrics = {"train_loss": float(sums["loss"]) / steps, "train_acc": float(sums["correct"]) / sums["seen"] * 100,
               "lr": sums["lr"], "terms": {k: float(v) / steps for k, v in sums["terms"].items()},
               "test_loss": test_loss, "test_acc": test_acc}
    job.history.append(metrics)
    _checkpoint(store, job.run_id, job.cfg, job.s, epoch + 1, job.history, job.elapsed + wall, job.timer.collect())
    if epoch + 1 in job.cfg.snapshots:
        store.save_snapshot(job.run_id, epoch + 1)
    wall += time.perf_counter() - t0
    job.elapsed += wall
    metrics["time_s"] = wall
    store.record_epoch(job.run_id, epoch + 1, metrics)
    job.progress.epoch_done(epoch + 1, metrics)


def _finish(job: Job, store: Store, device: torch.device, group_size: int) -> None:
    history = job.history
    best = max(range(len(history)), key=lambda i: history[i]["test_acc"])
    timing = {**_timing_summary(job.timer.collect(), job.elapsed), "group_size": group_size}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    store.finish(job.run_id, {"final_acc": history[-1]["test_acc"], "best_acc": history[best]["test_acc"],
                              "best_epoch": best + 1, "wall_s": job.elapsed, "timing": timing,
                              "peak_mem_bytes": peak,
                              "health": health.assess(history, getattr(job.s.student, "num_classes", None))})


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
