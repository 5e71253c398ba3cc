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

from kdlab.config import PRESET_WIDTHS, Config, bind_dataset, build_config, load_yaml
from kdlab.data import identity_for
from kdlab.data.residency import input_size
from kdlab.device import resolve_device
from kdlab.errors import UserError, warn
from kdlab.loop import loader_key, prepare_teacher, run_group
from kdlab.models import check_model_name, display_name, input_size_note, list_models
from kdlab.progress import GridProgress, live_session

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
    """What a grid is made of; defaults are the paper's study.

    Teachers and students are model names, each optionally MODEL@WIDTH; a bare name takes
    `teacher_width` / `student_width` (default: the preset's, 1.0 and 0.5 for paper and fast).
    """

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
    teacher_width: float | None = None
    student_width: float | None = None

    def widths(self) -> tuple[float, float]:
        """The grid's default teacher and student widths: given, else the preset's."""
        preset_teacher, preset_student = PRESET_WIDTHS[self.preset]
        return self.teacher_width or preset_teacher, self.student_width or preset_student


# Settings the grid sets per run from its own options: given through --set or a config file they
# would be overwritten without a word, so they are refused with the option to use instead.
_GRID_OWNED = {
    "model": "--teachers and --students", "width": "--teacher-width/--student-width or MODEL@WIDTH names",
    "method": "--methods", "method_args": "--method-arg METHOD.KEY=VALUE", "teacher": "nothing (the grid trains "
    "its own teachers)", "teacher_path": "nothing (the grid trains its own teachers)", "preset": "--preset",
}


def plan(spec: GridSpec, decode: bool = True) -> list[PlannedRun]:
    """The grid's runs in dependency order: teachers, students alone, then distilled students.

    Every run's config is bound to the dataset's content (one fingerprint for the whole grid), so
    the ids are final before anything trains. With `decode` false (a dry run) data that is not
    decoded yet, or not there, is neither decoded nor downloaded: the configs stay unbound
    (`provisional`), their ids named after the dataset's place instead of its content."""
    _check_spec(spec)
    file_values = load_yaml(spec.config) if spec.config else {}
    for source, values in (("--set", spec.overrides), (f"config file {spec.config}", file_values)):
        owned = sorted(set(values) & set(_GRID_OWNED))
        if owned:
            raise UserError(f"kdlab grid sets {owned[0]!r} per run, so {owned[0]} from {source} would be ignored: "
                            f"use {_GRID_OWNED[owned[0]]}")
    base = {k: v for k, v in {"dataset": spec.dataset, "data_dir": spec.data_dir, **spec.overrides}.items()
            if v is not None}
    # --seed (or a seed in the config file) is the first of the grid's seeds: S, S+1, ... S+N-1.
    first_seed = base.pop("seed", file_values.get("seed", 0))
    if isinstance(first_seed, bool) or not isinstance(first_seed, int) or first_seed < 0:
        raise UserError(f"seed must be an integer >= 0, got {first_seed!r}")
    identity: list[Any] = []  # the dataset's, looked up with the first config

    def make(model: str, width: float, seed: int, **extra: Any) -> Config:
        cfg = build_config(spec.preset, model, file_values, {**base, "width": width, "seed": seed, **extra})
        if not identity:
            identity.append(identity_for(cfg, decode))
        return bind_dataset(cfg, identity[0]) if identity[0] is not None else cfg

    teacher_width, student_width = spec.widths()
    teachers = [parse_member(t, teacher_width) for t in spec.teachers]
    students = [parse_member(s, student_width) for s in spec.students]
    runs: list[PlannedRun] = []
    for seed in range(first_seed, first_seed + spec.seeds):
        runs += _seed_runs(spec, seed, teachers, students, make)
    # Not identified (a dry run on data not decoded yet): the size policy, when set, says the size.
    stored = identity[0].info["image_size"] if identity[0] is not None else [runs[0].cfg.image_size] * 2
    if all(stored):
        _warn_small_inputs([m for m, _ in (*teachers, *students)], input_size(runs[0].cfg, stored))
    # Teachers of every seed first, so a second process finds distillation work sooner.
    order = {"teacher": 0, "student": 1, "assistant": 2, "distill": 3}
    unique = {}
    for r in sorted(runs, key=lambda r: order[r.role]):
        unique.setdefault(r.run_id, r)  # a TAKD assistant can be the same run as a distilled student
    return list(unique.values())


def provisional(runs: list[PlannedRun]) -> bool:
    """True when a plan's configs are not bound to the data's content (a dry run on data not decoded yet)."""
    return bool(runs) and runs[0].cfg.data_fingerprint is None


def _seed_runs(spec: GridSpec, seed: int, teachers: list[tuple[str, float]], students: list[tuple[str, float]],
               make: Any) -> list[PlannedRun]:
    """One seed's runs: its teachers, the students alone, and each method's distilled students."""
    from kdlab.methods import METHODS

    reference = spec.widths()[0]

    def name(model: str, width: float) -> str:
        return display_name(model, width, reference)

    def method_cfg(student: tuple[str, float], method: str, teacher: str | None) -> Config:
        return make(*student, seed, method=method, teacher=teacher, method_args=spec.method_args.get(method, {}))

    runs, teacher_ids = [], {}
    for t in teachers:
        cfg = make(*t, seed)
        teacher_ids[name(*t)] = cfg.run_hash()
        runs.append(PlannedRun("teacher", cfg, label=f"{name(*t)} s{seed}"))
    for s in students:
        runs.append(PlannedRun("student", make(*s, seed), label=f"{name(*s)} s{seed}"))
    for method in spec.methods:
        if not METHODS[method].needs_teacher_for(method_cfg(students[0], method, "x")):
            # Online and self distillation: no separate teacher, one run per student.
            runs += [PlannedRun("distill", method_cfg(s, method, None), label=f"{name(*s)} {method} s{seed}")
                     for s in students]
            continue
        for t, teacher_id in teacher_ids.items():
            runs += [PlannedRun("distill", method_cfg(s, method, teacher_id), depends_on=teacher_id,
                                label=f"{name(*s)} <- {t} {method} s{seed}") for s in students]
    for assistant in spec.assistants:
        a_name, relative = parse_member(assistant, 1.0)
        runs += _takd_chain((a_name, relative * reference), seed, teacher_ids, students, make, name)
    return runs


def parse_member(text: str, default_width: float) -> tuple[str, float]:
    """'resnet18@0.25' -> ('resnet18', 0.25); a bare name takes `default_width` (a model from another
    library, 'timm:NAME', is built as named: width 1)."""
    model, at, width = text.partition("@")
    if not at:
        return model, 1.0 if ":" in model else default_width
    try:
        value = float(width)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UserError(f"{text!r}: write MODEL@WIDTH with a width > 0, e.g. resnet18@0.25")
    return model, value


def _takd_chain(assistant: tuple[str, float], seed: int, teachers: dict[str, str], students: list[tuple[str, float]],
                make: Any, name: Any) -> list[PlannedRun]:
    """TAKD (Mirzadeh et al. 2020): teacher -> assistant -> student, each link plain KD."""
    out = []
    for t, teacher_id in teachers.items():
        a_cfg = make(*assistant, seed, method="kd", teacher=teacher_id)
        out.append(PlannedRun("assistant", a_cfg, depends_on=teacher_id,
                              label=f"{name(*assistant)} <- {t} kd s{seed}"))
        for s in students:
            cfg = make(*s, seed, method="kd", teacher=a_cfg.run_hash())
            out.append(PlannedRun("distill", cfg, depends_on=a_cfg.run_hash(),
                                  label=f"{name(*s)} <- {name(*assistant)} <- {t} takd s{seed}"))
    return out


def _warn_small_inputs(models: list[str], image_size: Sequence[int]) -> None:
    for model in dict.fromkeys(models):
        note = input_size_note(model, image_size)
        if note:
            warn(note)


def _check_spec(spec: GridSpec) -> None:
    from kdlab.methods import METHODS

    if spec.preset not in PRESET_WIDTHS:
        raise UserError(f"unknown preset {spec.preset!r}: choose one of {', '.join(PRESET_WIDTHS)}")
    for flag, width in (("--teacher-width", spec.teacher_width), ("--student-width", spec.student_width)):
        if width is not None and not width > 0:
            raise UserError(f"{flag} must be > 0, got {width}")
    known = list_models()
    for member in (*spec.teachers, *spec.students):
        name, _ = parse_member(member, 1.0)
        if ":" in name:  # a model from another library (timm:NAME, torchvision:NAME): its source checks it
            check_model_name(name)
        elif name not in known:
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
    teacher_width = spec.widths()[0]
    for assistant in spec.assistants:
        name, relative = parse_member(assistant, 1.0)
        if name not in known:
            raise UserError(f"unknown assistant model {name!r}: choose from {', '.join(known)}")
        _warn_if_larger(name, relative * teacher_width, [parse_member(t, teacher_width) for t in spec.teachers])


def _warn_if_larger(name: str, width: float, teachers: Sequence[tuple[str, float]]) -> None:
    """A TAKD assistant larger than its teacher is allowed (it is an experiment), but worth a word."""
    from kdlab.models import create_model, paper_params

    size = paper_params(create_model(name, width))
    for t, t_width in teachers:
        if size > paper_params(create_model(t, t_width)):
            warn(f"assistant {name}@{width:g} ({size:,} params) is larger than teacher {t}@{t_width:g}")


def states(runs: list[PlannedRun], store: Any | None) -> list[str]:
    """Each planned run's state in the store: done, running, failed, pending or new."""
    out = []
    for r in runs:
        rec = store.get(r.run_id) if store is not None else None
        out.append("new" if rec is None else rec.status)
    return out


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


def run_grid(runs: list[PlannedRun], runs_dir: str | Path, *, quiet: bool = True, silent: bool = False,
             log: Any = print, dataset: Any = None) -> dict[str, int]:
    """Run every planned run not yet done; returns counts of what happened.

    The students of one teacher train side by side (one group, one loader, one teacher forward
    per batch for all of them). Runs whose teacher another process is still training wait for
    it; a run another live process holds is left to it. Failed runs are not retried. Only what
    this process trained counts as trained; a run another process finished counts as skipped.
    """
    from kdlab.data import dataset_for
    from kdlab.data.checks import check_unchanged
    from kdlab.store import Store

    if not runs:
        return {}
    dataset = dataset or dataset_for(runs[0].cfg)
    check_unchanged(dataset, runs[0].cfg)
    store = Store(runs_dir)
    teachers: dict[str, Any] = {}
    counts = {"trained": 0, "skipped": 0, "failed": 0, "diverged": 0}
    # The plan goes into the store first, with each run's role: the report then knows what was
    # planned (and not trained yet) and what each run is for.
    for r in runs:
        store.ensure(r.run_id, r.cfg.to_dict(), r.label, r.role)
    pending = list(runs)
    with live_session(), GridProgress(len(runs), log, live=not quiet and not silent) as bar:
        try:
            while pending:
                ready, waiting, progressed = _sort_pending(pending, store, counts, log)
                bar.update(counts)
                for group in _groups(ready):
                    specs = [(r.cfg, _teacher(r, store, teachers), r.label) for r in group]
                    records = run_group(specs, store, dataset=dataset, quiet=quiet, silent=silent,
                                        on_claim=bar.started)
                    progressed |= _count(group, records, bar.claimed, counts, waiting, log)
                    bar.update(counts)
                pending = waiting
                if pending and not progressed:
                    time.sleep(POLL_S)  # another process holds what is left; wait for it
        finally:
            store.close()
    return counts


def _count(group: list[PlannedRun], records: dict[str, Any], claimed: set[str], counts: dict[str, int],
           waiting: list[PlannedRun], log: Any) -> bool:
    """Count a group's outcome (what another process finished is skipped, not trained); True if any ended."""
    progressed = False
    for r in group:
        rec = records[r.run_id]
        if rec is None:
            waiting.append(r)  # another live process has it
            continue
        progressed = True
        if r.run_id not in claimed:
            counts["skipped" if rec.status == "done" else "failed"] += 1
            continue
        counts["trained" if rec.status == "done" else "failed"] += 1
        if rec.status == "failed":
            log(f"failed {r.label}: {rec.error}")
        elif rec.diverged:
            counts["diverged"] += 1
            log(f"{rec.health} ({r.label}, run {r.run_id[:8]})")
    return progressed


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
    from kdlab.teacher_lookup import load_teacher

    if not r.depends_on:
        return None
    r.cfg.teacher_path = store.get(r.depends_on).checkpoint
    if r.cfg.teacher_path is None:
        raise UserError(f"teacher run {r.depends_on} has no checkpoint in {store.root}: train it again")
    if r.depends_on not in cache:
        cache[r.depends_on] = prepare_teacher(load_teacher(r.cfg.teacher_path, store.root).model, r.cfg,
                                              r.depends_on)
    return cache[r.depends_on]


def run_with_workers(runs: list[PlannedRun], runs_dir: str | Path, workers: int, worker_args: list[str], *,
                     quiet: bool = True, silent: bool = False, log: Any = print) -> tuple[dict[str, int], int]:
    """Run the grid in this process and `workers - 1` more `kdlab grid` processes (started with
    `worker_args`) on the same runs directory; returns this process's counts and how many
    workers failed. They share the work through the store's claims: on a CPU each uses a core,
    on a GPU several small models train at once (one process leaves the GPU mostly idle)."""
    from kdlab.data import dataset_for

    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if not runs:
        return {}, 0
    # Load (or download, or generate) the data once, before the workers start, so they never race for it.
    dataset = dataset_for(runs[0].cfg)
    command = [sys.executable, "-m", "kdlab.cli", "grid", *worker_args, "--workers", "1", "--quiet"]
    spawned = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(workers - 1)]
    counts = run_grid(runs, runs_dir, quiet=quiet, silent=silent, log=log, dataset=dataset)
    return counts, sum(p.wait() != 0 for p in spawned)
