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
from kdlab.device import resolve_device
from kdlab.errors import UserError
from kdlab.loop import loader_key, prepare_teacher, run_group
from kdlab.models import list_models

PAPER_MODELS = ("vgg16", "resnet18", "densenet121")
POLL_S = 5.0


@dataclass
class PlannedRun:
    """One run of the grid: its role, config and the run it depends on."""

    role: str  # teacher | student | assistant | distill
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
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method
    assistants: Sequence[str] = ()  # TAKD chains: MODEL@WIDTH between each teacher and the students


def plan(spec: GridSpec) -> list[PlannedRun]:
    """The grid's runs in dependency order: teachers, students alone, then distilled students."""
    _check_spec(spec)
    teacher_width, student_width = PRESET_WIDTHS[spec.preset]
    file_values = load_yaml(spec.config) if spec.config else {}
    base = {k: v for k, v in {"dataset": spec.dataset, "data_dir": spec.data_dir, **spec.overrides}.items()
            if v is not None}

    def make(model: str, width: float, seed: int, **extra: Any) -> Config:
        return build_config(spec.preset, model, file_values, {**base, "width": width, "seed": seed, **extra})

    from kdlab.methods import METHODS

    def method_cfg(student: str, seed: int, method: str, teacher: str | None) -> Config:
        args = spec.method_args.get(method, {})
        return make(student, student_width, seed, method=method, teacher=teacher, method_args=args)

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
            if not METHODS[method].needs_teacher_for(method_cfg(spec.students[0], seed, method, "x")):
                # Online and self distillation: no separate teacher, one run per student.
                for s in spec.students:
                    runs.append(PlannedRun("distill", method_cfg(s, seed, method, None),
                                           label=f"{s}_half {method} s{seed}"))
                continue
            for t in spec.teachers:
                for s in spec.students:
                    runs.append(PlannedRun("distill", method_cfg(s, seed, method, teachers[t]),
                                           depends_on=teachers[t], label=f"{s}_half <- {t} {method} s{seed}"))
        for assistant in spec.assistants:
            runs += _takd_chain(spec, assistant, seed, teachers, make, student_width)
    # Teachers of every seed first, so a second process finds distillation work sooner.
    order = {"teacher": 0, "student": 1, "assistant": 2, "distill": 3}
    unique = {}
    for r in sorted(runs, key=lambda r: order[r.role]):
        unique.setdefault(r.run_id, r)  # a TAKD assistant can be the same run as a distilled student
    return list(unique.values())


def parse_assistant(text: str) -> tuple[str, float]:
    """'resnet18@0.75' -> ('resnet18', 0.75): a TAKD assistant's model and width, relative to the
    preset's teacher width (1.0 under paper and fast, so then it is the width itself)."""
    name, _, width = text.partition("@")
    try:
        return name, float(width) if width else 1.0
    except ValueError:
        raise UserError(f"assistant {text!r}: write MODEL@WIDTH, e.g. resnet18@0.75") from None


def _takd_chain(spec: GridSpec, assistant: str, seed: int, teachers: dict[str, str], make: Any,
                student_width: float) -> list[PlannedRun]:
    """TAKD (Mirzadeh et al. 2020): teacher -> assistant -> student, each link plain KD."""
    name, relative = parse_assistant(assistant)
    width = relative * PRESET_WIDTHS[spec.preset][0]
    out = []
    for t, teacher_id in teachers.items():
        a_cfg = make(name, width, seed, method="kd", teacher=teacher_id)
        out.append(PlannedRun("assistant", a_cfg, depends_on=teacher_id, label=f"{name}@{width:g} <- {t} kd s{seed}"))
        for s in spec.students:
            cfg = make(s, student_width, seed, method="kd", teacher=a_cfg.run_hash())
            out.append(PlannedRun("distill", cfg, depends_on=a_cfg.run_hash(),
                                  label=f"{s}_half <- {name}@{width:g} <- {t} takd s{seed}"))
    return out


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
    unknown_args = set(spec.method_args) - set(spec.methods)
    if unknown_args:
        raise UserError(f"--method-arg for {sorted(unknown_args)[0]!r}, which is not in --methods")
    for assistant in spec.assistants:
        name, width = parse_assistant(assistant)
        if name not in known:
            raise UserError(f"unknown assistant model {name!r}: choose from {', '.join(known)}")
        if width <= 0:
            raise UserError(f"assistant {assistant!r}: width must be > 0")
        _warn_if_larger(name, width, spec.teachers)
    if spec.preset not in PRESET_WIDTHS:
        raise UserError(f"unknown preset {spec.preset!r}: choose one of {', '.join(PRESET_WIDTHS)}")


def _warn_if_larger(name: str, width: float, teachers: Sequence[str]) -> None:
    """A TAKD assistant larger than its teacher is allowed (it is an experiment), but worth a word."""
    from kdlab.models import create_model, paper_params

    size = paper_params(create_model(name, width))
    for t in teachers:
        if size > paper_params(create_model(t, 1.0)):
            print(f"kdlab: warning: assistant {name}@{width:g} ({size:,} params) is larger than teacher {t}",
                  file=sys.stderr)


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

    The students of one teacher train side by side (one group, one loader, one teacher forward
    per batch for all of them). Runs whose teacher another process is still training wait for
    it; a run another live process holds is left to it. Failed runs are not retried.
    """
    from kdlab.data import load_dataset
    from kdlab.store import Store

    if not runs:
        return {}
    dataset = dataset or load_dataset(runs[0].cfg.dataset, runs[0].cfg.data_dir)
    store = Store(runs_dir)
    teachers: dict[str, Any] = {}
    counts = {"trained": 0, "skipped": 0, "failed": 0}
    pending = list(runs)
    try:
        while pending:
            ready, waiting, progressed = _sort_pending(pending, store, counts, log)
            for group in _groups(ready):
                specs = [(r.cfg, _teacher(r, store, teachers), r.label) for r in group]
                records = run_group(specs, store, dataset=dataset, quiet=quiet, silent=silent,
                                    on_claim=lambda run_id, label: log(f"run {run_id[:8]} {label}"))
                for r in group:
                    rec = records[r.run_id]
                    if rec is None:
                        waiting.append(r)  # another live process has it
                        continue
                    progressed = True
                    counts["trained" if rec.status == "done" else "failed"] += 1
                    if rec.status == "failed":
                        log(f"failed {r.label}: {rec.error}")
            pending = waiting
            if pending and not progressed:
                time.sleep(POLL_S)  # another process holds what is left; wait for it
    finally:
        store.close()
    return counts


def _sort_pending(pending: list[PlannedRun], store: Any, counts: dict[str, int],
                  log: Any) -> tuple[list[PlannedRun], list[PlannedRun], bool]:
    """Split pending runs into ready ones and ones that wait for their teacher; count the finished."""
    ready, waiting, progressed = [], [], False
    for r in pending:
        rec = store.get(r.run_id)
        if rec is not None and rec.status in ("done", "failed"):
            counts["skipped" if rec.status == "done" else "failed"] += 1
            progressed = True
            continue
        dep = store.get(r.depends_on) if r.depends_on else None
        if r.depends_on and (dep is None or dep.status != "done"):
            if dep is not None and dep.status == "failed":
                log(f"skip {r.label}: its teacher run {r.depends_on} failed")
                counts["failed"] += 1
                progressed = True
            else:
                waiting.append(r)
            continue
        ready.append(r)
    return ready, waiting, progressed


def _groups(ready: list[PlannedRun]) -> list[list[PlannedRun]]:
    """Which ready runs train together. On a GPU: every run that sees the same batches, whatever its
    teacher, so that their steps overlap on the card (one process keeps it busy). On a CPU, where
    runs side by side only take turns: the students of one teacher together (they share its
    forward), others alone, so that several processes on one grid share the work."""
    groups: dict[Any, list[PlannedRun]] = {}
    for r in ready:
        if resolve_device(r.cfg.device).type == "cuda":
            key: Any = loader_key(r.cfg)
        else:
            key = (loader_key(r.cfg), r.depends_on) if r.depends_on else r.run_id
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def _teacher(r: PlannedRun, store: Any, cache: dict[str, Any]) -> Any:
    """The run's teacher, loaded once per grid from its checkpoint and moved to the run's device.

    Only `store`'s methods are used (no second connection to the database), so that a Ray task
    can pass its store proxy."""
    from kdlab.api import load_teacher

    if not r.depends_on:
        return None
    r.cfg.teacher_path = store.get(r.depends_on).checkpoint
    if r.cfg.teacher_path is None:
        raise UserError(f"teacher run {r.depends_on} has no checkpoint in {store.root}: train it again")
    if r.depends_on not in cache:
        model, _, _ = load_teacher(r.cfg.teacher_path, store.root)
        cache[r.depends_on] = prepare_teacher(model, r.cfg, r.depends_on)
    return cache[r.depends_on]


def run_with_workers(runs: list[PlannedRun], runs_dir: str | Path, workers: int, worker_args: list[str], *,
                     quiet: bool = True, silent: bool = False, log: Any = print) -> tuple[dict[str, int], int]:
    """Run the grid in this process and `workers - 1` more `kdlab grid` processes (started with
    `worker_args`) on the same runs directory; returns this process's counts and how many
    workers failed. They share the work through the store's claims: on a CPU each uses a core,
    on a GPU several small models train at once (one process leaves the GPU mostly idle)."""
    from kdlab.data import load_dataset

    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if not runs:
        return {}, 0
    # Load (or download, or generate) the data once, before the workers start, so they never race for it.
    dataset = load_dataset(runs[0].cfg.dataset, runs[0].cfg.data_dir)
    command = [sys.executable, "-m", "kdlab.cli", "grid", *worker_args, "--workers", "1", "--quiet"]
    spawned = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(workers - 1)]
    counts = run_grid(runs, runs_dir, quiet=quiet, silent=silent, log=log, dataset=dataset)
    return counts, sum(p.wait() != 0 for p in spawned)
