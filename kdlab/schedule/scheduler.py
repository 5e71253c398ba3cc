"""The one scheduler of a grid, whatever trains it: this process, worker processes or Ray tasks.

It records the plan in the store, decides what is ready (a run's teacher, or its TAKD assistant,
done), groups the ready runs (the students of one teacher side by side: one loader, one teacher
forward per batch for all of them), hands the groups to an executor (`kdlab.schedule.executors`),
numbers the runs this command trains across the whole grid, and counts what became of each run.
The runs themselves are claimed in the store by the process that trains them, so that several
commands on one runs directory never train a run twice: only what this command's processes
claimed counts as trained; a run another command finished counts as skipped, one it holds is
waited for. Failed runs are not run again.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from kdlab.errors import UserError
from kdlab.loop import loader_key
from kdlab.progress import GridProgress, live_session
from kdlab.schedule.executors import Executor
from kdlab.schedule.plan import PlannedRun
from kdlab.schedule.work import Event

POLL_S = 5.0  # how often runs another process holds are looked at again
TICK_S = 1.0  # how long an executor waits for news before the scheduler looks at the store again
RETRIES = 3  # Ray: times a task whose worker or node died is run again
RAY_TIMEOUT_S = 60.0  # Ray: how long a HOST:PORT head node has to answer


def check_options(*, workers: int = 1, ray: str | None = None, gpus_per_run: float | None = None,
                  retries: int = RETRIES, ray_timeout: float = RAY_TIMEOUT_S) -> None:
    """Refuse, in one line, options that do not go together (before anything is planned or written)."""
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if ray is None:
        if gpus_per_run is not None:
            raise UserError("--gpus-per-run places runs on the GPUs of a Ray cluster: use it with --ray")
        return
    if importlib.util.find_spec("ray") is None:
        raise UserError("--ray needs Ray, which is not installed: pip install 'kdlab[ray]'")
    if workers != 1:
        raise UserError("--workers and --ray do not mix: Ray places the runs (see --gpus-per-run)")
    if gpus_per_run is not None and not 0 <= gpus_per_run <= 1:
        raise UserError(f"--gpus-per-run takes a share of one GPU, 0 to 1, got {gpus_per_run:g}")
    if retries < 0:
        raise UserError(f"--retries must be >= 0, got {retries}")
    if not ray_timeout > 0:
        raise UserError(f"--ray-timeout must be > 0 seconds, got {ray_timeout:g}")


def run_grid(runs: list[PlannedRun], runs_dir: str | Path, *, workers: int = 1, ray: str | None = None,
             gpus_per_run: float | None = None, retries: int = RETRIES, ray_timeout: float = RAY_TIMEOUT_S,
             quiet: bool = True, silent: bool = False, log: Any = print, dataset: Any = None) -> dict[str, int]:
    """Run every planned run not yet done: in this process, on `workers` local processes, or on the
    Ray cluster at `ray` (see `kdlab.schedule.executors`). Returns the counts of what this command's
    processes did: trained, skipped (done before, or by another command), failed, diverged.
    """
    from kdlab.data import dataset_for
    from kdlab.data.checks import check_unchanged

    check_options(workers=workers, ray=ray, gpus_per_run=gpus_per_run, retries=retries, ray_timeout=ray_timeout)
    if not runs:
        return {}
    # The data loaded (or generated, or decoded) once, before any executor starts: none races for it.
    dataset = dataset or dataset_for(runs[0].cfg)
    check_unchanged(dataset, runs[0].cfg)
    executor: Executor
    if ray is not None:
        from kdlab.schedule.executors.ray import RayTasks

        executor = RayTasks(runs_dir, dataset, address=ray, gpus_per_run=gpus_per_run, retries=retries,
                            timeout=ray_timeout)
        log(f"{len(runs)} runs on Ray ({executor.gpus:g} GPU per run, at most {executor.slots} tasks at once), "
            f"checkpoints in {executor.runs_dir}")
    elif workers > 1:
        from kdlab.schedule.executors.workers import Workers

        executor = Workers(runs_dir, workers, quiet=True, silent=silent, device=runs[0].cfg.device)
    else:
        from kdlab.schedule.executors.inprocess import InProcess

        executor = InProcess(runs_dir, dataset, quiet=quiet, silent=silent, device=runs[0].cfg.device)
    try:
        return Scheduler(runs, executor, log).run(live=not quiet and not silent)
    finally:
        executor.close()


def summary(counts: dict[str, int]) -> str:
    """The grid's last line: '12 trained, 3 skipped, 0 failed' (and diverged runs, if any)."""
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n or k != "diverged")


class Scheduler:
    """Hands an executor the runs that are ready, as they become ready, and counts what happens."""

    def __init__(self, runs: list[PlannedRun], executor: Executor, log: Any):
        self.runs, self.executor, self.log = runs, executor, log
        self.store = executor.store
        self.by_id = {r.run_id: r for r in runs}
        self.counts = {"trained": 0, "skipped": 0, "failed": 0, "diverged": 0}
        self.open = set(self.by_id)  # not yet counted, nor being trained
        self.flying: dict[int, list[PlannedRun]] = {}  # key -> a group the executor has
        self.busy: dict[str, float] = {}  # run id -> when to offer again a run another process held
        self.retried: set[str] = set()
        self.bar: GridProgress | None = None

    def run(self, live: bool) -> dict[str, int]:
        # The plan goes into the store first, with each run's role: the report then knows what was
        # planned (and not trained yet) and what each run is for.
        for r in self.runs:
            self.store.ensure(r.run_id, r.cfg.to_dict(), r.label, r.role)
        with live_session(), GridProgress(len(self.runs), self.log, live=live) as self.bar:
            key = 0
            while self.open or self.flying:
                ready, waiting = self._sort()
                self.bar.update(self.counts)
                for group in groups(ready, self.executor.together):
                    if len(self.flying) >= self.executor.slots:
                        break
                    self.open -= {r.run_id for r in group}
                    self.flying[key] = group
                    self.executor.submit(key, group)
                    key += 1
                if self.flying:
                    self.executor.poll(self._event, TICK_S)
                elif waiting:
                    time.sleep(POLL_S)  # another process holds what is left (or its teachers): wait for it
        return self.counts

    def _sort(self) -> tuple[list[PlannedRun], bool]:
        """The open runs that are ready, in plan order, and whether some wait; count the finished."""
        ready, waiting, now = [], False, time.monotonic()
        for r in self.runs:
            if r.run_id not in self.open:
                continue
            rec = self.store.get(r.run_id)
            if rec is not None and rec.status in ("done", "failed"):
                self.open.discard(r.run_id)
                self._count(r, rec, ours=False)
                continue
            dep = self.store.get(r.depends_on) if r.depends_on else None
            if dep is not None and dep.status == "failed":
                self.open.discard(r.run_id)
                self.counts["failed"] += 1
                self.log(f"skip {r.label}: its teacher run {r.depends_on} failed, so it was not run")
            elif (r.depends_on and (dep is None or dep.status != "done")) or self.busy.get(r.run_id, 0) > now:
                waiting = True
            else:
                ready.append(r)
        return ready, waiting

    def _event(self, event: Event) -> None:
        assert self.bar is not None
        if event.kind == "claimed" and event.retry:
            self.retried.add(event.run_id)
        elif event.kind == "claimed":
            self.bar.started(event.run_id, self.by_id[event.run_id].label)
        elif event.kind == "resumed":
            r = self.by_id[event.run_id]
            where = f"at epoch {event.epoch} of {r.cfg.epochs}"
            if event.run_id in self.retried:  # Ray ran its task again: the worker or node was lost
                self.log(f"retrying {r.label} {r.run_id[:8]} (its Ray task was lost): resuming {where}")
            elif event.epoch:
                self.log(f"resuming {r.label} {r.run_id[:8]} {where}")
        elif event.kind == "ended":
            self._ended(self.flying.pop(event.key), event.error)
            self.bar.update(self.counts)

    def _ended(self, group: list[PlannedRun], error: str | None) -> None:
        """Count a group's runs; a run another live process holds is offered again after a while."""
        for r in group:
            rec = self.store.get(r.run_id)
            ours = r.run_id in self.bar.claimed
            if ours or (rec is not None and rec.status in ("done", "failed")):
                self._count(r, rec, ours, error)
            elif error:
                self.counts["failed"] += 1
                self.log(f"failed {r.label}: {error}")
            else:
                self.open.add(r.run_id)
                self.busy[r.run_id] = time.monotonic() + POLL_S

    def _count(self, r: PlannedRun, rec: Any, ours: bool, error: str | None = None) -> None:
        if rec is not None and rec.status == "done":
            self.counts["trained" if ours else "skipped"] += 1
            if ours and rec.diverged:
                self.counts["diverged"] += 1
                self.log(f"{rec.health} ({r.label}, run {r.run_id[:8]})")
            return
        self.counts["failed"] += 1
        why = rec.error if rec is not None and rec.error else error or "stopped before it finished"
        self.log(f"failed {r.label}: {why}" + ("" if ours else " (failed runs are not run again)"))


def groups(ready: list[PlannedRun], together: bool = False) -> list[list[PlannedRun]]:
    """Which ready runs train together: the students of one teacher on the same batches (they share
    its forward), every other run alone, so that several processes share the work. `together`
    (one process on a GPU): every run that sees the same batches, whatever its teacher, so that
    their steps overlap on the card. A teacher is never in its students' group."""
    out: dict[Any, list[PlannedRun]] = {}
    for r in ready:
        if together:
            key: Any = loader_key(r.cfg)
        else:
            key = (loader_key(r.cfg), r.depends_on) if r.depends_on else r.run_id
        out.setdefault(key, []).append(r)
    return list(out.values())


def log_finished_runs(runs: list[PlannedRun], runs_dir: str | Path) -> None:
    """Runs the grid finished before, asked for again with a logger that lacks them (``--mlflow``):
    logged from their stored records, once, by the process that starts the grid (`log_finished`)."""
    from kdlab.loggers import LOGGERS
    from kdlab.loggers.base import log_finished
    from kdlab.store import DB_NAME, Store

    wanted = [r for r in runs if any(cls.wanted(r.cfg) for cls in LOGGERS.values())]
    if not wanted or not (Path(runs_dir) / DB_NAME).exists():
        return
    store = Store(runs_dir, readonly=True)
    try:
        for r in wanted:
            rec = store.get(r.run_id)
            if rec is not None and rec.status == "done":
                log_finished(r.cfg, rec, r.label, Path(runs_dir))
    finally:
        store.close()

