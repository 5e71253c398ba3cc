"""The study's API: `grid` (plan and run the paper's grid), `report` (its tables from runs dirs),
`merge` (runs dirs from several machines into one) and `demo`. The CLI's `kdlab grid`, `report`,
`merge` and `demo` each parse their options, call one of these, and print what it returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.errors import UserError
from kdlab.schedule.plan import PAPER_MODELS
from kdlab.store import RunRecord, has_store, open_store, runs_dir_or_default

if TYPE_CHECKING:
    from kdlab.deploy.table import Deployment
    from kdlab.merge import MergeResult
    from kdlab.reporting import Report
    from kdlab.schedule.plan import PlannedRun

Log = Callable[[str], Any]


def _quiet(message: str) -> None:
    """The API's default log: nothing (verbose=True logs to stderr)."""


@dataclass
class GridResult:
    """What `grid` did: the planned runs and what happened to them."""

    runs: list[PlannedRun]
    runs_dir: Path
    counts: dict[str, int] = field(default_factory=dict)  # trained, skipped, failed, diverged (+ compressed, ...)
    dry_run: bool = False
    states: list[str] = field(default_factory=list)  # a dry run: each planned run's state in the store
    compress_plan: list[str] = field(default_factory=list)  # a dry run with compress: the steps' lines
    provisional: bool = False  # a dry run on data not decoded yet: the run ids are provisional

    @property
    def ok(self) -> bool:
        """Nothing failed: no run, no compression step."""
        return self.counts.get("failed", 0) == self.counts.get("compress failed", 0) == 0

    def summary(self) -> str:
        """The counts in one line, as `kdlab grid` prints them ("15 trained, 0 skipped, 0 failed")."""
        from kdlab.schedule.scheduler import summary

        return summary(self.counts)

    def records(self) -> list[RunRecord | None]:
        """The planned runs as the store holds them now, in plan order (None: not in the store)."""
        if not has_store(self.runs_dir):
            return [None] * len(self.runs)
        store = open_store(self.runs_dir)
        try:
            return [store.get(r.run_id) for r in self.runs]
        finally:
            store.close()


def _names(value: Sequence[str] | str) -> list[str]:
    """Model or method names: a sequence, or one comma-separated string."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [t.strip() for t in items if t.strip()]


def grid(teachers: Sequence[str] | str = PAPER_MODELS, students: Sequence[str] | str = PAPER_MODELS, *,
         methods: Sequence[str] | str = ("kd",), seeds: int = 1, preset: str = "paper", dataset: str | None = None,
         data_dir: str | None = None, config: str | Path | None = None,
         method_args: dict[str, dict[str, Any]] | None = None, assistants: Sequence[str] | str = (),
         teacher_width: float | None = None, student_width: float | None = None,
         runs_dir: str | Path | None = None, workers: int = 1, ray: str | None = None,
         gpus_per_run: float | None = None, retries: int = 3, ray_timeout: float = 60.0,
         compress: str | None = None, dry_run: bool = False, quiet: bool = True, verbose: bool = False,
         log: Log | None = None, **overrides: Any) -> GridResult:
    """Plan the study (teachers, students alone, every student from every teacher, per method and
    seed) and run what is not done yet; returns the plan and the counts of what happened.

    Teachers and students are model names, each optionally MODEL@WIDTH. `overrides` are Config
    fields for every run (epochs, lr, seed: the first of `seeds` seeds, ...). `workers` processes on
    this machine share the runs, or `ray` (auto, HOST:PORT or local) places them on a Ray cluster
    (`ray_timeout`: seconds a HOST:PORT head node has to answer).
    `compress` (e.g. "prune=0.5,int8") then compresses every distilled student. `dry_run` plans and
    reads the store only. With verbose=False nothing is printed; `log` takes the progress lines.
    """
    from kdlab import distributed
    from kdlab.deploy.compress import compress_grid, parse_compress, plan_lines
    from kdlab.schedule.plan import GridSpec, plan, provisional, states
    from kdlab.schedule.scheduler import check_options, log_finished_runs, run_grid

    if distributed.current() is not None:
        raise UserError("kdlab grid does not run under torchrun (that trains one run on several GPUs): run the "
                        "grid with --workers on one machine, or with --ray on a cluster")
    executors = dict(workers=workers, ray=ray, gpus_per_run=gpus_per_run, retries=retries, ray_timeout=ray_timeout)
    check_options(**executors)  # before anything is planned or written
    if log is None:
        from kdlab.progress import echo

        log = echo if verbose else _quiet
    spec = GridSpec(teachers=_names(teachers), students=_names(students), seeds=seeds, preset=preset,
                    methods=_names(methods), dataset=dataset, data_dir=data_dir, config=config,
                    overrides={k: v for k, v in overrides.items() if v is not None}, method_args=method_args or {},
                    assistants=_names(assistants), teacher_width=teacher_width, student_width=student_width)
    runs = plan(spec, decode=not dry_run)
    root = runs_dir_or_default(runs_dir)
    compress_spec = parse_compress(compress) if compress else None
    result = GridResult(runs, root, dry_run=dry_run)
    if dry_run:
        store = open_store(root) if has_store(root) else None
        result.states = states(runs, store)
        result.compress_plan = plan_lines(runs, compress_spec, store) if compress_spec else []
        result.provisional = provisional(runs)
        return result
    log_finished_runs(runs, root)  # --mlflow on runs finished before: their stored records
    result.counts = run_grid(runs, root, **executors, quiet=quiet, silent=not verbose, log=log)
    if compress_spec:
        result.counts.update(compress_grid(runs, root, compress_spec, quiet=quiet, log=log))
    return result


@dataclass
class StudyReport:
    """`report`'s result: the study's tables, the deployment table, and the files written."""

    report: Report
    deployment: Deployment
    compare_paper: bool = False
    files: list[Path] = field(default_factory=list)

    def text(self, fmt: str = "md") -> str:
        """The report as `kdlab report --format FMT` prints it: md, csv, json or latex."""
        from kdlab.deploy.table import with_deployment
        from kdlab.reporting import render

        return with_deployment(render(self.report, fmt, compare_paper=self.compare_paper), self.deployment, fmt)


def report(runs_dir: str | Path | Sequence[str | Path] | None = None, out: str | Path | None = None, *,
           dataset: str | None = None, preset: str | None = None, compare_paper: bool = False) -> StudyReport:
    """The paper's Tables 1-3 (with statistics over seeds) and the deployment table, from one runs dir
    or several read as one (see `merge`); with `out`, every format and the plots are written there."""
    from kdlab.deploy.table import deployment_over, write_deployment
    from kdlab.merge import report_over
    from kdlab.outputs import writable_dir
    from kdlab.reporting import write_report

    folder = writable_dir(out, "--out") if out is not None else None
    if runs_dir is None or isinstance(runs_dir, (str, Path)):
        runs_dirs: list[str | Path] = [runs_dir_or_default(runs_dir)]
    else:
        runs_dirs = list(runs_dir)
    tables = report_over(runs_dirs, dataset=dataset, preset=preset)
    result = StudyReport(tables, deployment_over(runs_dirs, dataset=dataset, preset=preset), compare_paper)
    if folder is not None:
        result.files = write_report(tables, folder, compare_paper=compare_paper)
        result.files += write_deployment(result.deployment, folder)
    return result


def merge(sources: Sequence[str | Path], into: str | Path, log: Log = print) -> MergeResult:
    """Copy the runs of runs dirs from other machines into `into` (created if missing), with their
    checkpoints, run cards and TensorBoard files; a run trained twice with different results is a
    conflict, reported (in `log`) and never overwritten. See kdlab.merge."""
    from kdlab.merge import merge as merge_runs
    from kdlab.outputs import writable_dir

    return merge_runs(sources, writable_dir(into, "--into"), log=log)


@dataclass
class DemoResult:
    """`demo`'s result: its runs, the report and the files written, and how long it took."""

    runs: int
    report: Report  # its files (report.files) are in `folder`
    seconds: float
    folder: Path


def demo(runs_dir: str | Path = "kdlab-demo", *, data_dir: str | None = None, seeds: int = 2, workers: int = 2,
         quiet: bool = False, log: Log | None = None) -> DemoResult:
    """The paper's study on synthetic data, smoke preset, on the CPU: the grid, then its report
    (written to RUNS_DIR/report). `log` gets the opening line (default: stderr)."""
    from kdlab.outputs import writable_dir
    from kdlab.progress import echo
    from kdlab.reporting import report as study_report
    from kdlab.schedule.plan import GridSpec, plan
    from kdlab.schedule.scheduler import run_grid

    root = writable_dir(runs_dir, "--runs-dir")
    data = data_dir or str(root / "data")
    t0 = time.perf_counter()
    runs = plan(GridSpec(seeds=seeds, preset="smoke", dataset="synthetic", data_dir=data))
    (log or echo)(f"kdlab demo: the paper's study ({len(runs)} runs: 15 x {seeds} seeds) on synthetic data, smoke "
                  f"preset, CPU, {workers} processes")
    run_grid(runs, root, workers=workers, quiet=quiet, silent=quiet, log=echo)
    tables = study_report(root, root / "report", dataset="synthetic", preset="smoke", compare_paper=True)
    return DemoResult(len(runs), tables, time.perf_counter() - t0, root / "report")
