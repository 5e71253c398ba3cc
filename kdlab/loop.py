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

import torch
from torch import nn

from kdlab import accounting, bnstats, distributed, graphs, health
from kdlab.accounting import EpochClock
from kdlab.checkpoints import CheckpointWriter, checkpoint_state
from kdlab.config import Config
from kdlab.data import dataset_for
from kdlab.data.datasets import Dataset
from kdlab.data.loader import SplitLoader
from kdlab.data.residency import input_size, make_loaders
from kdlab.device import device_name, resolve_device, versions
from kdlab.engine import Engine
from kdlab.errors import RunBusy, UserError
from kdlab.job import Job, make_job, prepare_teacher
from kdlab.loggers import start_loggers
from kdlab.models.profile import model_facts
from kdlab.progress import MAX_LIVE_RUNS, Progress, echo
from kdlab.store import Heartbeat, RunRecord, Store, owner_id
from kdlab.teacher import Teacher

SYNC_EVERY = 50  # steps between the loop's reads of the device (progress bar, non-finite check)


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
              on_claim: Callable[[str, str], None] | None = None,
              on_resume: Callable[[str, int], None] | None = None) -> dict[str, RunRecord | None]:
    """Train several runs side by side on one loader: each batch is made once, a teacher serving
    several students runs once per batch for all of them, and on a GPU the runs' steps overlap.

    All runs must share `loader_key`. Returns each run's record (None: another process holds it).
    Finished runs are returned as they are; interrupted ones resume from their checkpoints.
    Under torchrun (WORLD_SIZE > 1) the one run trains on all the processes (`kdlab.distributed`).
    `on_resume(run_id, epoch)` is told where each run starts (else a resumed run says it itself).
    """
    if len({loader_key(cfg) for cfg, _, _ in specs}) > 1:
        raise ValueError("runs of one group must share their loader settings (loader_key)")
    world = distributed.current()
    if world is not None:
        if len(specs) > 1:
            raise UserError("torchrun trains one run on several processes: use it with `kdlab train` or "
                            "`kdlab distill`, and `kdlab grid --ray` for a study on several GPUs")
        if specs[0][0].processes != world.size:  # the id must say how many processes trained the run
            raise ValueError(f"a config built for {specs[0][0].processes} processes, run on {world.size}: build it "
                             "under torchrun (kdlab.configure.build_config)")
        distributed.init(world, resolve_device(specs[0][0].device), graphs=specs[0][0].graphs)
        store = distributed.for_rank(store, world)
        silent = silent or not world.main
    out: dict[str, RunRecord | None] = {}
    owner = owner_id()
    claimed: list[tuple[Config, Teacher | None, str]] = []
    for cfg, teacher, label in specs:
        run_id = cfg.run_hash()
        store.ensure(run_id, cfg.to_dict(), label)
        state = store.claim(run_id, owner)
        if state != "claimed":
            out[run_id] = store.get(run_id) if state == "done" else None
            continue
        if on_claim is not None:
            on_claim(run_id, label or run_id)
        claimed.append((cfg, teacher, label or run_id))
    if not claimed:
        return out
    if any(cfg.compile != "none" for cfg, _, _ in claimed):
        _keep_compile_caches(store.root)
    writer = CheckpointWriter(store)
    jobs: list[Job] = []  # made as the group starts: each job whole, its loggers started
    try:
        writes = store.is_writer  # in a run on several processes, rank 0 keeps the claim
        with Heartbeat(store, [cfg.run_hash() for cfg, _, _ in claimed], owner) if writes else nullcontext():
            dataset = dataset or dataset_for(claimed[0][0])
            _train_group(claimed, jobs, store, writer, dataset, quiet, silent, world, on_resume)
    except BaseException as e:
        writer.close()
        alive = {j.run_id: j.alive for j in jobs}
        for cfg, _, _ in claimed:
            if isinstance(e, (KeyboardInterrupt, SystemExit, UserError)):  # bad input is not the run's failure
                store.release(cfg.run_hash(), owner)
            elif alive.get(cfg.run_hash(), True):
                store.fail(cfg.run_hash(), f"{type(e).__name__}: {e}")
        raise
    finally:
        for job in jobs:
            job.log.close()  # TensorBoard, MLflow (kdlab.loggers)
    writer.close()
    distributed.barrier()  # the other processes read what rank 0 has just recorded
    for cfg, _, _ in claimed:
        out[cfg.run_hash()] = store.get(cfg.run_hash())
    return out


def _keep_compile_caches(root: Path) -> None:
    """Keep torch.compile's inductor and Triton caches in the runs directory (unless the user set
    them), so that later processes on the same runs reuse compiled kernels instead of compiling."""
    cache = Path(root) / "cache"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))


def _train_group(claimed: list[tuple[Config, Teacher | None, str]], jobs: list[Job], store: Store,
                 writer: CheckpointWriter, dataset: Dataset, quiet: bool, silent: bool,
                 world: distributed.World | None, on_resume: Callable[[str, int], None] | None = None) -> None:
    """Make the group's jobs (appended to `jobs`: the caller closes their loggers) and train them."""
    device = resolve_device(claimed[0][0].device)
    if world is not None and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    train_loader, test_loader = build_loaders(claimed[0][0], dataset, device, world)
    for cfg, teacher, label in claimed:
        run_id = cfg.run_hash()
        log = start_loggers(cfg, run_id, label, store)
        progress = Progress(cfg.epochs, len(train_loader), train_loader.batch_size,
                            quiet=quiet or len(claimed) > MAX_LIVE_RUNS, silent=silent,
                            label=f"{cfg.model}@{cfg.width:g}/{cfg.method} {run_id[:8]}")
        # PyTorch has SyncBatchNorm for GPUs only: on CPUs the statistics stay per process.
        sync_bn = world is not None and cfg.sync_bn and device.type == "cuda"
        job = make_job(cfg, dataset, teacher=teacher, run_id=run_id, label=label, sync_bn=sync_bn, device=device,
                       checkpoint=store.load_checkpoint(run_id), progress=progress, log=log)
        jobs.append(job)
        _record_resume(store, job)
        store.set_info(run_id, device=device_name(device), versions_json=versions(),
                       **model_facts(job.s.student, input_size(cfg, dataset.train.images.shape[1:3]),
                                     warn=not silent))
        if on_resume is not None:
            on_resume(job.run_id, job.start_epoch)
        elif job.start_epoch and not silent:
            name = job.label if job.label != job.run_id else f"{job.cfg.model}@{job.cfg.width:g}/{job.cfg.method}"
            echo(f"resuming {name} {job.run_id[:8]} at epoch {job.start_epoch} of {job.cfg.epochs}")
    engine = Engine(jobs, train_loader, test_loader, device, jobs[0].cfg.precision, world)
    try:
        _train_epochs(jobs, engine, train_loader, device, store, writer)
    finally:
        engine.close()
        for job in jobs:
            job.release()  # the models and optimisers: the next group's memory
        graphs.release_memory()


def _train_epochs(jobs: list[Job], engine: Engine, train_loader: SplitLoader, device: torch.device, store: Store,
                  writer: CheckpointWriter) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = EpochClock(engine, device)
    first, last = min(j.start_epoch for j in jobs), max(j.cfg.epochs for j in jobs)
    for epoch in range(first, last):
        active = [j for j in jobs if j.active(epoch)]
        if not active:
            continue
        clock.start(active)
        _train_epoch(engine, active, train_loader, clock, epoch, store)
        alive = [j for j in active if j.alive]
        _reestimate_bn(alive, train_loader, epoch)
        results = engine.evaluate(alive) if alive else {}
        walls = clock.charge(alive)  # the epoch's wall time, in proportion to the device time each run used
        for job in alive:
            _end_epoch(job, engine, store, writer, epoch, walls[job.run_id], results[job.run_id])
    writer.flush()  # a run is finished only once its last checkpoint is on disk
    for job in jobs:
        if job.alive and job.history:
            _finish(job, store, engine, device, len(jobs))


def _train_epoch(engine: Engine, jobs: list[Job], loader: SplitLoader, clock: EpochClock, epoch: int,
                 store: Store) -> None:
    engine.start_epoch(jobs, epoch)
    steps = len(loader)
    batches = loader.epoch(epoch)
    for step in range(steps):
        with clock.data():
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
    metrics = {"train_loss": sums["loss"], "train_acc": sums["acc"], "lr": sums["lr"],
               "terms": sums["terms"], "test_loss": test[0], "test_acc": test[1]}
    metrics["time_s"] = wall  # the epoch's own time: the checkpoint's copy below is charged to the run
    job.history.append(metrics)
    done = epoch + 1
    snapshot = done if done in job.cfg.snapshots else None
    due = done % job.cfg.checkpoint_every == 0 or done == job.cfg.epochs or snapshot is not None
    if due and store.is_writer:  # in a run on several processes, rank 0 writes them
        state = checkpoint_state(job.run_id, job.cfg, job.s, done, job.history, job.elapsed + wall,
                                 accounting.totals(job, engine))
        writer.submit(job.run_id, state, snapshot)
    job.elapsed += wall + time.perf_counter() - t0
    store.record_epoch(job.run_id, done, metrics)
    job.log.epoch(done, metrics)
    job.progress.epoch_done(done, metrics)


def _finish(job: Job, store: Store, engine: Engine, device: torch.device, group_size: int) -> None:
    history = job.history
    best = max(range(len(history)), key=lambda i: history[i]["test_acc"])
    timing = accounting.timing_summary(job, engine, group_size)
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


def _record_resume(store: Store, job: Job) -> None:
    """The store's epochs as the job's checkpoint has them: the database may run ahead of the
    checkpoint (epochs recorded while their checkpoint was still being written when the process
    died), and the run continues from what the checkpoint knows."""
    store.truncate_epochs(job.run_id, 0)
    for i, metrics in enumerate(job.history):
        store.record_epoch(job.run_id, i + 1, metrics)
