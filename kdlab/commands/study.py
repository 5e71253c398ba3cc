"""`kdlab grid`, `kdlab report`, `kdlab merge` and `kdlab demo`: the study, over kdlab.study's API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from kdlab.commands.options import add_run_options, csv, overrides, pairs
from kdlab.errors import UserError
from kdlab.progress import echo
from kdlab.schedule.plan import PAPER_MODELS


def register(sub: Any) -> None:
    p = sub.add_parser("grid", help="run the study: teachers, students alone, every student from every teacher")
    p.add_argument("--teachers", default=",".join(PAPER_MODELS),
                   help="comma-separated teacher models, each MODEL or MODEL@WIDTH")
    p.add_argument("--students", default=",".join(PAPER_MODELS),
                   help="comma-separated student models, each MODEL or MODEL@WIDTH")
    p.add_argument("--teacher-width", type=float,
                   help="width of teachers given without @WIDTH (default: the preset's, 1.0; smoke 0.125)")
    p.add_argument("--student-width", type=float,
                   help="width of students given without @WIDTH (default: the preset's, 0.5; smoke 0.0625)")
    p.add_argument("--methods", default="kd", help="comma-separated distillation methods (default kd)")
    p.add_argument("--seeds", type=int, default=1,
                   help="number of seeds (default 1): S, S+1, ... S+N-1, where S is --seed (default 0)")
    p.add_argument("--method-arg", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method's own hyperparameter, e.g. dkd.beta=8 (repeatable)")
    p.add_argument("--assistants", default="",
                   help="TAKD: comma-separated MODEL@WIDTH assistants (width relative to the teachers')")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs and their state, run nothing")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the grid (default 1); on a CPU one per core, on a GPU a few")
    p.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster: auto (the one this node is in), "
                   "HOST:PORT, or local (start Ray on this machine); needs kdlab[ray]")
    p.add_argument("--gpus-per-run", type=float, help="with --ray: share of a GPU per run, e.g. 0.25 packs 4 "
                   "small runs on a card (default 1 on a cluster with GPUs, else 0)")
    p.add_argument("--retries", type=int, default=3, help="with --ray: times a run whose worker or node died "
                   "is tried again (default 3)")
    p.add_argument("--ray-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="with --ray HOST:PORT: how long the head node has to answer (default 60)")
    p.add_argument("--compress", default="", metavar="prune=R,int8",
                   help="then compress every distilled student (see `kdlab compress`), e.g. prune=0.5,int8")
    add_run_options(p)
    p.set_defaults(handler=grid)

    p = sub.add_parser("report", help="the paper's Tables 1-3 from the runs database, with statistics")
    p.add_argument("--runs-dir", action="append", help="runs database (default $KDLAB_RUNS_DIR or ./runs); "
                   "repeat it to report the runs of several together (see kdlab merge)")
    p.add_argument("--format", default="md", choices=["md", "csv", "json", "latex"])
    p.add_argument("--compare-paper", action="store_true", help="the paper's VCL and Colab numbers beside ours")
    p.add_argument("--dataset", help="only this dataset's study")
    p.add_argument("--preset", help="only this preset's study")
    p.add_argument("--out", help="also write every format and the plots (PNG) into this folder")
    p.set_defaults(handler=report)

    p = sub.add_parser("merge", help="copy the runs and checkpoints of runs dirs from other machines into one; "
                       "a run trained twice with different results is reported, never overwritten")
    p.add_argument("sources", nargs="+", metavar="SRC", help="runs dirs to copy from")
    p.add_argument("--into", required=True, metavar="DST", help="runs dir to copy into (created if missing)")
    p.set_defaults(handler=merge)

    p = sub.add_parser("demo", help="the 15-run study on synthetic data on the CPU (smoke preset), then the report")
    p.add_argument("--runs-dir", default="kdlab-demo", help="where the demo's runs go (default ./kdlab-demo)")
    p.add_argument("--data-dir", help="where the synthetic data set is written (default: inside the runs dir)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per run (default 2: enough for a spread)")
    p.add_argument("--workers", type=int, default=2, help="processes sharing the runs (default 2, one per core)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=demo)


def grid(args: argparse.Namespace) -> int:
    from kdlab.api import grid as run_grid

    settings = {k: v for k, v in overrides(args, {}).items() if k not in ("dataset", "data_dir")}
    result = run_grid(csv(args.teachers), csv(args.students), methods=csv(args.methods), seeds=args.seeds,
                      preset=args.preset, dataset=args.dataset, data_dir=args.data_dir, config=args.config,
                      method_args=method_args(args.method_arg), assistants=csv(args.assistants),
                      teacher_width=args.teacher_width, student_width=args.student_width, runs_dir=args.runs_dir,
                      workers=args.workers, ray=args.ray, gpus_per_run=args.gpus_per_run, retries=args.retries,
                      ray_timeout=args.ray_timeout, compress=args.compress or None, dry_run=args.dry_run,
                      quiet=args.quiet, verbose=True, log=echo, **settings)
    if result.dry_run:
        for r, state in zip(result.runs, result.states, strict=True):
            print(f"{r.run_id}  {state:<8} {r.role:<8} {r.label}")
        for line in result.compress_plan:
            print(line)
        print(f"{len(result.runs)} runs planned in {result.runs_dir}")
        if result.provisional:
            echo(f"kdlab: note: {result.runs[0].cfg.dataset} is not decoded yet (or not there), and a dry run "
                 "decodes nothing: these run ids are provisional, named after its place; the grid names them after "
                 "its content once it has read it")
        return 0
    print(result.summary())
    return 0 if result.ok else 1


def method_args(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """--method-arg METHOD.KEY=VALUE pairs, grouped by method."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in pairs(items, "--method-arg", "METHOD.KEY=VALUE").items():
        method, dot, name = key.partition(".")
        if not dot or not method or not name:
            raise UserError(f"--method-arg takes METHOD.KEY=VALUE, got {key!r}")
        out.setdefault(method.strip(), {})[name.strip()] = value
    return out


def report(args: argparse.Namespace) -> int:
    from kdlab.api import report as study_report

    result = study_report(args.runs_dir, args.out, dataset=args.dataset, preset=args.preset,
                          compare_paper=args.compare_paper)
    print(result.text(args.format))
    for path in result.files:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def merge(args: argparse.Namespace) -> int:
    from kdlab.api import merge as merge_runs

    result = merge_runs(args.sources, args.into, log=print)
    return 1 if result.combined.conflicts else 0


def demo(args: argparse.Namespace) -> int:
    from kdlab.api import demo as run_demo
    from kdlab.reporting import render

    result = run_demo(args.runs_dir, data_dir=args.data_dir, seeds=args.seeds, workers=args.workers,
                      quiet=args.quiet)
    print(render(result.report, "md", compare_paper=True))
    print(f"\n{result.runs} runs in {result.seconds:.0f}s; report and plots in {result.folder} "
          f"({len(result.report.files)} files)")
    return 0
