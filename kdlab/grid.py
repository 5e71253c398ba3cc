"""The study as a grid: teachers, students alone, and every student distilled from every teacher.

`plan()` lists the runs (teachers first, since distilled runs need them) with their configs and
ids, all known before anything trains: a distilled run's config names its teacher by the teacher
run's id, which is the hash of the teacher's config. `run_grid()` runs what is not finished,
resumes what was interrupted and skips what is done. Several processes may run the same grid on
one runs directory: each run is claimed in a database transaction, so none runs twice.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.config import PRESET_WIDTHS, Config, build_config, load_yaml
from kdlab.errors import RunBusy, UserError
from kdlab.models import list_models

PAPER_MODELS = ("vgg16", "resnet18", "densenet121")
POLL_S = 5.0


@dataclass
class PlannedRun:
    """One run of the grid: its role, config and the run it depends on."""

    role: str  # teacher | student | distill
    cfg: Config
    depends_on: str | None = None  # the teacher's run id
    label: str = ""

    @property
    def run_id(self) -> str:
        return self.cfg.run_hash()


@dataclass
class GridSpec:
    """What a grid is made of; defaults are the paper's study."""

    teachers: Sequence[str] = PAPER_MODELS
    students: Sequence[str] = PAPER_MODELS
    seeds: int = 1
    preset: str = "paper"
    methods: Sequence[str] = ("kd",)
    dataset: str | None = None
    data_dir: str | None = None
    config: str | Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def plan(spec: GridSpec) -> list[PlannedRun]:
    """The grid's runs in dependency order: teachers, students alone, then distilled students."""
    _check_spec(spec)
    teacher_width, student_width = PRESET_WIDTHS[spec.preset]
    file_values = load_yaml(spec.config) if spec.config else {}
    base = {k: v for k, v in {"dataset": spec.dataset, "data_dir": spec.data_dir, **spec.overrides}.items()
            if v is not None}

    def make(model: str, width: float, seed: int, **extra: Any) -> Config:
        return build_config(spec.preset, model, file_values, {**base, "width": width, "seed": seed, **extra})

    runs: list[PlannedRun] = []
    for seed in range(spec.seeds):
        teachers = {}
        for t in spec.teachers:
            cfg = make(t, teacher_width, seed)
            teachers[t] = cfg.run_hash()
            runs.append(PlannedRun("teacher", cfg, label=f"{t} s{seed}"))
        for s in spec.students:
            runs.append(PlannedRun("student", make(s, student_width, seed), label=f"{s}_half s{seed}"))
        for method in spec.methods:
            for t in spec.teachers:
                for s in spec.students:
                    cfg = make(s, student_width, seed, method=method, teacher=teachers[t])
                    runs.append(PlannedRun("distill", cfg, depends_on=teachers[t],
                                           label=f"{s}_half <- {t} {method} s{seed}"))
    # Teachers of every seed first, so a second process finds distillation work sooner.
    order = {"teacher": 0, "student": 1, "distill": 2}
    return sorted(runs, key=lambda r: order[r.role])


def _check_spec(spec: GridSpec) -> None:
    from kdlab.methods import METHODS

    known = list_models()
    for name in (*spec.teachers, *spec.students):
        if name not in known:
            raise UserError(f"unknown model {name!r} in --teachers/--students: choose from {', '.join(known)}")
    if spec.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {spec.seeds}")
    for m in spec.methods:
        if m not in METHODS or m == "ce":
            choices = ", ".join(sorted(k for k in METHODS if k != "ce"))
            raise UserError(f"unknown distillation method {m!r} in --methods: choose from {choices}")
    if spec.preset not in PRESET_WIDTHS:
        raise UserError(f"unknown preset {spec.preset!r}: choose one of {', '.join(PRESET_WIDTHS)}")


def states(runs: list[PlannedRun], store: Any | None) -> list[str]:
    """Each planned run's state in the store: done, running, failed, pending or new."""
    out = []
    for r in runs:
        rec = store.get(r.run_id) if store is not None else None
        out.append("new" if rec is None else rec.status)
    return out


def run_grid(runs: list[PlannedRun], runs_dir: str | Path, *, quiet: bool = True, silent: bool = False,
             log: Any = print, dataset: Any = None) -> dict[str, int]:
    """Run every planned run not yet done; returns counts of what happened.

    Runs whose teacher another process is still training wait for it; a run another live
    process holds is left to it. Failed runs are not retried (their error is in the store).
    """
    from kdlab.api import load_teacher
    from kdlab.data import load_dataset
    from kdlab.loop import run as run_training
    from kdlab.store import Store
    from kdlab.teacher import Teacher

    if not runs:
        return {}
    dataset = dataset or load_dataset(runs[0].cfg.dataset, runs[0].cfg.data_dir)
    store = Store(runs_dir)
    teachers: dict[str, Teacher] = {}
    counts = {"trained": 0, "skipped": 0, "failed": 0, "busy": 0}
    pending = list(runs)
    try:
        while pending:
            progressed, waiting = False, []
            for r in pending:
                rec = store.get(r.run_id)
                if rec is not None and rec.status in ("done", "failed"):
                    counts["skipped" if rec.status == "done" else "failed"] += 1
                    progressed = True
                    continue
                teacher = None
                if r.depends_on:
                    dep = store.get(r.depends_on)
                    if dep is None or dep.status != "done":
                        if dep is not None and dep.status == "failed":
                            log(f"skip {r.label}: its teacher run {r.depends_on} failed")
                            counts["failed"] += 1
                            progressed = True
                        else:
                            waiting.append(r)
                        continue
                    if r.depends_on not in teachers:
                        model, _, _ = load_teacher(r.depends_on, Path(runs_dir))
                        teachers[r.depends_on] = Teacher(model, run_id=r.depends_on)
                    teacher = teachers[r.depends_on]
                    teacher.model.to(_device(r.cfg))
                    r.cfg.teacher_path = dep.checkpoint
                log(f"run {r.run_id[:8]} {r.label}")
                try:
                    result = run_training(r.cfg, store, teacher=teacher, dataset=dataset, quiet=quiet,
                                          silent=silent, label=r.label)
                except RunBusy:
                    waiting.append(r)
                    continue
                counts["trained" if result.status == "done" else "failed"] += 1
                if result.status == "failed":
                    log(f"failed {r.label}: {result.error}")
                progressed = True
            pending = waiting
            if pending and not progressed:
                time.sleep(POLL_S)  # another process holds what is left; wait for it
    finally:
        store.close()
    return counts


def spawn_workers(count: int, grid_args: list[str]) -> list[subprocess.Popen]:
    """Start `count` more `kdlab grid` processes on the same runs directory.

    They share the work through the store's claims: on a CPU each uses a core, on a GPU several
    small models train at once (at CIFAR sizes one process leaves the GPU mostly idle).
    """
    command = [sys.executable, "-m", "kdlab.cli", "grid", *grid_args, "--workers", "1", "--quiet"]
    return [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(count)]


def wait_workers(workers: list[subprocess.Popen]) -> int:
    """Wait for spawned workers; the number that failed."""
    return sum(w.wait() != 0 for w in workers)


def _device(cfg: Config) -> Any:
    from kdlab.device import resolve_device

    return resolve_device(cfg.device)
