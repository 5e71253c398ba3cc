"""The training loop: one loop for every run, from scratch or distilled, alone or side by side.

Read it top to bottom: claim the runs, set up (data, models, methods, optimisers), resume from the
last checkpoints, then per epoch train, evaluate, checkpoint and record. Methods supply loss
terms; the loop never asks which method it runs. How one step runs (CUDA graphs, streams, shared
teacher forwards) is the engine's business (`kdlab.engine`); the loop only says what to train.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab import bnstats, distributed, graphs, health
from kdlab.checkpoints import CheckpointWriter, to_host
from kdlab.config import Config
from kdlab.data import dataset_for
from kdlab.data.datasets import Dataset
from kdlab.data.loader import SplitLoader
from kdlab.data.residency import input_size, make_loaders
from kdlab.device import device_name, resolve_device, versions
from kdlab.engine import Engine, Job, Setup, autocast_for, loss_scaler
from kdlab.errors import RunBusy, UserError
from kdlab.loggers import start_loggers
from kdlab.methods import METHODS
from kdlab.models import create_model
from kdlab.models.profile import model_facts
from kdlab.models.weights import load_initial_weights
from kdlab.progress import MAX_LIVE_RUNS, Progress
from kdlab.store import Heartbeat, RunRecord, Store, owner_id
from kdlab.teacher import Teacher
from kdlab.timing import SegmentTimer

SYNC_EVERY = 50  # steps between the loop's reads of the device (progress bar, non-finite check)
CHECKPOINT_FORMAT = "kdlab-checkpoint"


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
    return (cfg.dataset, cfg.data_dir, cfg.image_size, cfg.cache_dir, cfg.train_limit, cfg.test_limit, cfg.batch_size,
            cfg.eval_batch_size, cfg.seed, cfg.augment, cfg.augmentation, cfg.crop_size, cfg.data_residency,
            cfg.channels_last, cfg.precision, cfg.device)


def build_loaders(cfg: Config, dataset: Dataset, device: torch.device,
                  world: distributed.World | None = None) -> tuple[SplitLoader, SplitLoader]:
    """The training and test loaders a config asks for (shared by every run with its loader_key), on
    the device or streamed from the cache as `kdlab.data.residency` decides; in a run on several
    processes, this process's slice of every batch."""
    shard = (world.rank, world.size) if world is not None else (0, 1)
    return make_loaders(cfg, dataset, device, shard)


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
    """Train several runs side by side on one loader: each batch is made once, a teacher serving
    several students runs once per batch for all of them, and on a GPU the runs' steps overlap.

    All runs must share `loader_key`. Returns each run's record (None: another process holds it).
    Finished runs are returned as they are; interrupted ones resume from their checkpoints.
    Under torchrun (WORLD_SIZE > 1) the one run trains on all the processes (`kdlab.distributed`).
    """
    if len({loader_key(cfg) for cfg, _, _ in specs}) > 1:
        raise ValueError("runs of one group must share their loader settings (loader_key)")
    world = distributed.current()
    if world is not None:
        if len(specs) > 1:
            raise UserError("torchrun trains one run on several processes: use it with `kdlab train` or "
                            "`kdlab distill`, and `kdlab grid --ray` for a study on several GPUs")
        distributed.init(world, resolve_device(specs[0][0].device), graphs=specs[0][0].graphs)
        store = distributed.for_rank(store, world)
        silent = silent or not world.main
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
    if any(j.cfg.compile != "none" for j in jobs):
        _keep_compile_caches(store.root)
    writer = CheckpointWriter(store)
    try:
        writes = store.is_writer  # in a run on several processes, rank 0 keeps the claim
        with Heartbeat(store, [j.run_id for j in jobs], owner) if writes else nullcontext():
            dataset = dataset or dataset_for(jobs[0].cfg)
            _train_group(jobs, store, writer, dataset, quiet, silent, world)
    except BaseException as e:
        writer.close()
        for job in jobs:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                store.release(job.run_id, owner)
            elif job.alive:
                store.fail(job.run_id, f"{type(e).__name__}: {e}")
        raise
    finally:
        for job in jobs:
            job.log.close()  # TensorBoard, MLflow (kdlab.loggers)
    writer.close()
    distributed.barrier()  # the other processes read what rank 0 has just recorded
    for job in jobs:
        out[job.run_id] = store.get(job.run_id)
    return out


def _keep_compile_caches(root: Path) -> None:
    """Keep torch.compile's inductor and Triton caches in the runs directory (unless the user set
    them), so that later processes on the same runs reuse compiled kernels instead of compiling."""
    cache = Path(root) / "cache"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))


def _train_group(jobs: list[Job], store: Store, writer: CheckpointWriter, dataset: Dataset, quiet: bool,
                 silent: bool, world: distributed.World | None) -> None:
    device = resolve_device(jobs[0].cfg.device)
    if world is not None and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    train_loader, test_loader = build_loaders(jobs[0].cfg, dataset, device, world)
    for job in jobs:
        # PyTorch has SyncBatchNorm for GPUs only: on CPUs the statistics stay per process.
        sync_bn = world is not None and job.cfg.sync_bn and device.type == "cuda"
        job.s = build(job.cfg, dataset, job.teacher.model if job.teacher else None, sync_bn)
        job.timer = SegmentTimer(device)
        store.set_info(job.run_id, device=device_name(device), versions_json=versions(),
                       **model_facts(job.s.student, input_size(job.cfg, dataset.train.images.shape[1:3]),
                                     warn=not silent))
        job.log = start_loggers(job.cfg, job.run_id, job.label, store)
        job.start_epoch, job.history, job.elapsed = _resume(store, job.run_id, job.s, job.timer)
        job.progress = Progress(job.cfg.epochs, len(train_loader), train_loader.batch_size,
                                quiet=quiet or len(jobs) > MAX_LIVE_RUNS, silent=silent,
                                label=f"{job.cfg.model}@{job.cfg.width:g}/{job.cfg.method} {job.run_id[:8]}")
    engine = Engine(jobs, train_loader, test_loader, device, jobs[0].cfg.precision, world)
    try:
        _train_epochs(jobs, engine, train_loader, device, store, writer)
    finally:
        engine.close()
        for job in jobs:
            job.s = None  # the models and optimisers: the next group's memory
        graphs.release_memory()


def _train_epochs(jobs: list[Job], engine: Engine, train_loader: SplitLoader, device: torch.device, store: Store,
                  writer: CheckpointWriter) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    group_timer = SegmentTimer(device)
    first, last = min(j.start_epoch for j in jobs), max(j.cfg.epochs for j in jobs)
    for epoch in range(first, last):
        active = [j for j in jobs if j.active(epoch)]
        if not active:
            continue
        t0 = time.perf_counter()
        before = {j.run_id: _own_time(j, engine) for j in active}
        data_before = group_timer.collect().get("data", 0.0)
        _train_epoch(engine, active, train_loader, group_timer, epoch, store)
        alive = [j for j in active if j.alive]
        _reestimate_bn(alive, train_loader, epoch)
        results = engine.evaluate(alive) if alive else {}
        # Charge the epoch's wall time to the runs in proportion to the device time each used.
        wall = time.perf_counter() - t0
        data = group_timer.collect().get("data", 0.0) - data_before
        own = {j.run_id: _own_time(j, engine) - before[j.run_id] for j in alive}
        total = sum(own.values()) or 1.0
        for job in alive:
            job.timer.totals["data"] += data * own[job.run_id] / total
            _end_epoch(job, engine, store, writer, epoch, wall * own[job.run_id] / total, results[job.run_id])
    writer.flush()  # a run is finished only once its last checkpoint is on disk
    for job in jobs:
        if job.alive and job.history:
            _finish(job, store, engine, device, len(jobs))


def _own_time(job: Job, engine: Engine) -> float:
    """Device seconds a run has used: its steps, its evaluations and its share of its teacher."""
    totals = job.timer.collect()
    return totals.get("step", 0.0) + totals.get("eval", 0.0) + _teacher_share(job, engine)


def _teacher_share(job: Job, engine: Engine) -> float:
    """A run's share of its teacher's forward time: the teacher's time split evenly among the students
    it serves in the group, plus the share recorded before a resume."""
    before = job.timer.totals.get("teacher", 0.0)
    if job.teacher is None:
        return before
    students = sum(j.teacher is job.teacher for j in engine.jobs)
    return before + engine.teacher_time().get(id(job.teacher), 0.0) / students


def _train_epoch(engine: Engine, jobs: list[Job], loader: SplitLoader, group_timer: SegmentTimer, epoch: int,
                 store: Store) -> None:
    engine.start_epoch(jobs, epoch)
    steps = len(loader)
    batches = loader.epoch(epoch)
    for step in range(steps):
        with group_timer("data"):
            batch = next(batches)
        alive = [j for j in jobs if j.alive]
        engine.step(alive, batch, [j.cfg.lr * lr_factor(j.cfg, epoch, step, steps) for j in alive])
        for job in alive:
            job.progress.tick(epoch + 1, step + 1)  # plain integers for the live line's clock: no device sync
        if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
            for job in alive:
                _check_finite(job, engine, store, epoch)


def _reestimate_bn(jobs: list[Job], loader: SplitLoader, epoch: int) -> None:
    """bn_stats=train: BatchNorm statistics re-estimated over the epoch's training batches, eagerly and
    in place, before the evaluation (kdlab.bnstats); charged to the runs' evaluation time."""
    jobs = [j for j in jobs if j.cfg.bn_stats == "train"]
    if not jobs:
        return
    for job in jobs:
        with job.timer("eval"):
            bnstats.reestimate([job.s.student], loader.epoch(epoch), job.s.autocast)


def _check_finite(job: Job, engine: Engine, store: Store, epoch: int) -> None:
    """Every SYNC_EVERY steps: the one wait for the device. A non-finite loss fails the run."""
    sums = engine.read(job)
    if sums["bad"] >= 0:
        job.alive = False
        store.fail(job.run_id, f"loss became NaN or infinite at epoch {epoch + 1}, step {sums['bad'] + 1}")
        return
    job.progress.step(epoch + 1, sums["steps"], sums["loss"], sums["acc"])


def _end_epoch(job: Job, engine: Engine, store: Store, writer: CheckpointWriter, epoch: int, wall: float,
               test: tuple[float, float]) -> None:
    sums = engine.read(job)
    t0 = time.perf_counter()
    metrics = {"train_loss": sums["loss"], "train_acc": sums["acc"], "lr": job.lr,
               "terms": sums["terms"], "test_loss": test[0], "test_acc": test[1]}
    metrics["time_s"] = wall  # the epoch's own time: the checkpoint's copy below is charged to the run
    job.history.append(metrics)
    done = epoch + 1
    snapshot = done if done in job.cfg.snapshots else None
    due = done % job.cfg.checkpoint_every == 0 or done == job.cfg.epochs or snapshot is not None
    if due and store.is_writer:  # in a run on several processes, rank 0 writes them
        state = _checkpoint_state(job, done, job.elapsed + wall, _teacher_share(job, engine))
        writer.submit(job.run_id, state, snapshot)
    job.elapsed += wall + time.perf_counter() - t0
    store.record_epoch(job.run_id, done, metrics)
    job.log.epoch(done, metrics)
    job.progress.epoch_done(done, metrics)


def _finish(job: Job, store: Store, engine: Engine, device: torch.device, group_size: int) -> None:
    history = job.history
    best = max(range(len(history)), key=lambda i: history[i]["test_acc"])
    timing = {**_timing_summary(job, engine), "group_size": group_size}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    store.finish(job.run_id, {"final_acc": history[-1]["test_acc"], "best_acc": history[best]["test_acc"],
                              "best_epoch": best + 1, "wall_s": job.elapsed, "timing": timing,
                              "peak_mem_bytes": peak,
                              "health": health.assess(history, getattr(job.s.student, "num_classes", None),
                                                      bn_note=_bn_note(job, engine))})
    job.log.finish(store.get(job.run_id), store.checkpoint_path(job.run_id))


def _bn_note(job: Job, engine: Engine) -> str | None:
    """What the health check may say of the student's BatchNorm statistics (kdlab.bnstats)."""
    return bnstats.describe(job.s.student, job.cfg, job.cfg.epochs * len(engine.train))


def _resume(store: Store, run_id: str, s: Setup, timer: SegmentTimer) -> tuple[int, list[dict[str, Any]], float]:
    """Continue from the last whole checkpoint: weights, optimiser, history and time so far."""
    ckpt = store.load_checkpoint(run_id)
    if ckpt is None:
        store.truncate_epochs(run_id, 0)
        return 0, [], 0.0
    s.student.load_state_dict(ckpt["student"])
    s.method.load_state_dict(ckpt["method"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.optimizer.param_groups[0]["lr"] = s.lr  # the loaded state holds a host copy of the lr tensor
    if s.scaler is not None and ckpt.get("scaler"):
        s.scaler.load_state_dict(ckpt["scaler"])  # fp16's loss scale where it had got to
    history = list(ckpt["history"])
    # The database may run ahead of the checkpoint (epochs recorded while their checkpoint was
    # still being written when the process died): keep what the checkpoint knows.
    store.truncate_epochs(run_id, 0)
    for i, metrics in enumerate(history):
        store.record_epoch(run_id, i + 1, metrics)
    timer.totals.update(ckpt["timing"])
    return ckpt["epoch"], history, ckpt["elapsed_s"]


def _checkpoint_state(job: Job, epoch: int, elapsed: float, teacher_s: float) -> dict[str, Any]:
    """The run's whole state after `epoch`, copied to host memory (the writer thread saves it)."""
    cfg, s = job.cfg, job.s
    return to_host({
        "format": CHECKPOINT_FORMAT, "version": 1, "run_id": job.run_id, "config": cfg.to_dict(), "epoch": epoch,
        "model": {"name": cfg.model, "width": cfg.width, "num_classes": s.student.num_classes},
        "student": s.student.state_dict(), "method": s.method.state_dict(), "optimizer": s.optimizer.state_dict(),
        "history": list(job.history), "elapsed_s": elapsed, "timing": {**job.timer.collect(), "teacher": teacher_s},
        "scaler": s.scaler.state_dict() if s.scaler is not None else None,
    })


def _timing_summary(job: Job, engine: Engine) -> dict[str, float]:
    """Split the wall time: data, teacher forward, student step, evaluation, and the one-off cost of
    warming up and capturing the steps (compilation included) as compile_s."""
    totals, wall = job.timer.collect(), job.elapsed
    parts = {"data_s": totals.get("data", 0.0), "teacher_s": _teacher_share(job, engine),
             "student_s": totals.get("step", 0.0), "eval_s": totals.get("eval", 0.0)}
    parts["other_s"] = max(0.0, wall - sum(parts.values()))
    parts["wall_s"] = wall
    parts["compile_s"] = job.setup_s()
    parts["processes"] = engine.world.size if engine.world is not None else 1
    return parts
