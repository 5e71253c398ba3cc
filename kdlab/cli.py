"""The `kdlab` command: a thin layer over the Python API.

User errors print one line on stderr and exit with code 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from kdlab.errors import UserError
from kdlab.progress import echo
from kdlab.schedule.plan import PAPER_MODELS

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn
    return wrap


class _Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line too (and still exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"kdlab: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by train, distill and grid: where data and runs are, and the recipe."""
    p.add_argument("--dataset", help="cifar10, cifar100, synthetic, a folder with train/<class>/ and test/<class>/ "
                   "(or val/<class>/), or hf:PATH_OR_NAME (a Hugging Face dataset; kdlab[hf])")
    p.add_argument("--data-dir", help="where datasets live (default $KDLAB_DATA_DIR or ~/.cache/kdlab/data)")
    p.add_argument("--cache-dir", help="where datasets are decoded to, once (default $KDLAB_CACHE_DIR or "
                   "~/.cache/kdlab/decoded)")
    p.add_argument("--preset", default="paper", help="paper (the paper's recipe), fast (GPU), smoke (seconds, CPU), "
                   "imagenet (the ImageNet KD benchmark's recipe)")
    p.add_argument("--config", help="YAML file of settings; command-line options override it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set weight_decay=1e-4 --set compile=none (repeatable)")
    p.add_argument("--runs-dir", help="runs database and checkpoints (default $KDLAB_RUNS_DIR or ./runs)")
    p.add_argument("--quiet", action="store_true", help="one line per epoch, no live progress bar")
    p.add_argument("--mlflow", metavar="URI", help="also log to MLflow: a tracking server or a local folder "
                   "(needs kdlab[mlflow]); TensorBoard files go to RUNS_DIR/tb/ when tensorboard is installed")


def _add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1,
                   help="train this one run on N local GPUs (DistributedDataParallel, started through torchrun)")


def _distributed_launch(args: argparse.Namespace) -> int | None:
    """`--nproc N`: run this same command under torchrun on N processes (None: train here)."""
    from kdlab import distributed

    if args.nproc == 1 or distributed.current() is not None:
        return None
    return distributed.launch(args.nproc, _without_option(args.argv[1:], "--nproc"))


def _quiet_rank() -> bool:
    """In a run on several processes only rank 0 prints the result."""
    from kdlab import distributed

    world = distributed.current()
    return world is not None and not world.main


def _pairs(items: Sequence[str], flag: str, form: str = "KEY=VALUE") -> dict[str, Any]:
    """KEY=VALUE options (repeatable) as a dict, each value parsed as YAML (3 -> int, [1, 2] -> list)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} takes {form}, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _overrides(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """Config overrides from the named options and --set KEY=VALUE pairs."""
    out = {"dataset": args.dataset, "data_dir": args.data_dir, "cache_dir": args.cache_dir, "epochs": args.epochs,
           "seed": args.seed,
           "batch_size": args.batch_size, "lr": args.lr, "device": args.device, "mlflow": args.mlflow, **extra}
    out.update({k.replace("-", "_"): v for k, v in _pairs(args.set, "--set").items()})
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdlab", description="Knowledge distillation for image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list the model zoo with parameter counts and FLOPs")
    p.add_argument("names", nargs="*", help="models to describe (default: kdlab's own), e.g. timm:resnet50")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--widths", default="1.0,0.5", help="comma-separated widths to list (default 1.0,0.5; "
                   "models from other libraries: 1)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32, help="image side for FLOPs (default 32)")
    p.add_argument("--all", action="store_true", help="list every model name of every source (timm, torchvision)")

    p = sub.add_parser("methods", help="list the training methods with their arguments and papers")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("train", help="train a model from scratch with cross-entropy")
    p.add_argument("model")
    p.add_argument("--width", type=float, help="width multiplier (default 1.0; smoke preset 0.125)")
    _add_run_options(p)
    _add_nproc(p)

    p = sub.add_parser("distill", help="train a student from a teacher (the paper's equation (2) by default)")
    p.add_argument("--teacher", help="a finished run's id (or prefix), RUN@EPOCH (a snapshot) or a checkpoint file; "
                   "none for online/self distillation (dml, byot)")
    p.add_argument("--teacher-model", help="architecture of a bare state-dict teacher checkpoint")
    p.add_argument("--teacher-width", type=float, help="width of a bare state-dict teacher checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="the teacher file is a whole pickled model: load it (this runs code from the file)")
    p.add_argument("--student", required=True, help="student model name")
    p.add_argument("--width", type=float, help="student width (default 0.5, the paper's half width)")
    p.add_argument("--method", default="kd", help="distillation method (default kd)")
    p.add_argument("--temperature", type=float, help="T of equation (1) (paper: 3)")
    p.add_argument("--alpha", type=float, help="weight of cross-entropy in equation (2) (paper: 0.7)")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a method's own hyperparameter (repeatable)")
    p.add_argument("--allow-other-data", action="store_true",
                   help="distil even if the teacher was trained on other data (another fingerprint or image size)")
    _add_run_options(p)
    _add_nproc(p)

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
    _add_run_options(p)

    p = sub.add_parser("report", help="the paper's Tables 1-3 from the runs database, with statistics")
    p.add_argument("--runs-dir", action="append", help="runs database (default $KDLAB_RUNS_DIR or ./runs); "
                   "repeat it to report the runs of several together (see kdlab merge)")
    p.add_argument("--format", default="md", choices=["md", "csv", "json", "latex"])
    p.add_argument("--compare-paper", action="store_true", help="the paper's VCL and Colab numbers beside ours")
    p.add_argument("--dataset", help="only this dataset's study")
    p.add_argument("--preset", help="only this preset's study")
    p.add_argument("--out", help="also write every format and the plots (PNG) into this folder")

    p = sub.add_parser("merge", help="copy the runs and checkpoints of runs dirs from other machines into one; "
                       "a run trained twice with different results is reported, never overwritten")
    p.add_argument("sources", nargs="+", metavar="SRC", help="runs dirs to copy from")
    p.add_argument("--into", required=True, metavar="DST", help="runs dir to copy into (created if missing)")

    p = sub.add_parser("demo", help="the 15-run study on synthetic data on the CPU (smoke preset), then the report")
    p.add_argument("--runs-dir", default="kdlab-demo", help="where the demo's runs go (default ./kdlab-demo)")
    p.add_argument("--data-dir", help="where the synthetic data set is written (default: inside the runs dir)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per run (default 2: enough for a spread)")
    p.add_argument("--workers", type=int, default=2, help="processes sharing the runs (default 2, one per core)")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("bench", help="engine speed: images/s against a plain eager loop, KD cost against alone")
    p.add_argument("--preset", default="fast", help="the engine settings to measure (default fast)")
    p.add_argument("--models", default=",".join(PAPER_MODELS), help="comma-separated models")
    p.add_argument("--what", default="throughput,kd", help="throughput, kd, or both (default)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation)")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")

    from kdlab.deploy.commands import add_parsers  # export, compress, latency

    add_parsers(sub)
    return parser


@command("models")
def _models(args: argparse.Namespace) -> int:
    from kdlab.models.listing import describe, print_sources, print_table

    if args.all:
        print_sources()
        return 0
    try:
        widths = [float(w) for w in args.widths.split(",")]
    except ValueError:
        raise UserError(f"--widths takes comma-separated numbers, got {args.widths!r}") from None
    if args.image_size < 1 or args.num_classes < 1:
        raise UserError("--image-size and --num-classes must be >= 1")
    rows = describe(args.names, widths, args.num_classes, args.image_size)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, args.image_size)
    return 0


@command("methods")
def _methods(args: argparse.Namespace) -> int:
    from kdlab.methods import METHODS

    rows = [{"name": name, "teacher": cls.needs_teacher, "features": cls.uses_features, "args": cls.defaults,
             "paper": cls.paper, "setting": cls.setting, "notes": cls.notes, "version": cls.version}
            for name, cls in sorted(METHODS.items())]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        needs = "teacher" if r["teacher"] else "no teacher"
        args_text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["args"].items())
        print(f"{r['name']:<8} {needs:<11} {r['paper']}\n{'':<20} args: {args_text or '-'}")
        for label in ("setting", "notes"):
            if r[label]:
                print(f"{'':<20} {'defaults from' if label == 'setting' else 'note'}: {r[label]}")
    print("Defaults are tuned for the setting named; on other data, lrs, batch sizes or run lengths, check them: "
          "a run whose training falls apart is flagged as diverged.")
    return 0


@command("train")
def _train(args: argparse.Namespace) -> int:
    from kdlab.api import train

    launched = _distributed_launch(args)
    if launched is not None:
        return launched
    record = train(args.model, preset=args.preset, config=args.config, runs_dir=args.runs_dir, quiet=args.quiet,
                   verbose=True, **_overrides(args, {"width": args.width}))
    return _print_record(record)


@command("distill")
def _distill(args: argparse.Namespace) -> int:
    from kdlab.api import distill

    launched = _distributed_launch(args)
    if launched is not None:
        return launched
    extra = {"width": args.width, "temperature": args.temperature, "alpha": args.alpha,
             "method_args": _pairs(args.method_arg, "--method-arg") or None}
    record = distill(args.teacher, args.student, teacher_model=args.teacher_model, teacher_width=args.teacher_width,
                     method=args.method, preset=args.preset, config=args.config, runs_dir=args.runs_dir,
                     quiet=args.quiet, verbose=True, allow_other_data=args.allow_other_data,
                     trust_checkpoint=args.trust_checkpoint, **_overrides(args, extra))
    return _print_record(record)


def _print_record(record: Any) -> int:
    cfg = record.config
    if record.status == "failed":
        raise UserError(f"run {record.run_id} failed: {record.error}")
    if _quiet_rank():
        return 0
    data = (cfg.get("data_info") or {}).get("name", cfg["dataset"])
    print(f"run {record.run_id}: {cfg['model']} width {cfg['width']:g}, method {cfg['method']}, "
          f"{data}, seed {cfg['seed']}")
    print(f"final test accuracy {record.final_acc:.2f}% (last epoch; best {record.best_acc:.2f}% at epoch "
          f"{record.best_epoch}), {record.epochs_done} epochs in {record.wall_s:.1f}s on {record.device}")
    print(f"checkpoint {record.checkpoint}")
    if record.diverged:
        # Finished, but not a result: say so last, where it is read, and exit non-zero for scripts.
        from kdlab.health import advice

        kind, _, why = record.health.partition(": ")
        tail = "" if kind == "test at chance" else f": {advice(record.health)}"  # its cause says what to do
        print(f"run {record.run_id} {kind.upper()}: {why}; its accuracy is not a result (the report lists it as "
              f"{kind}){tail}")
        return 1
    return 0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@command("grid")
def _grid(args: argparse.Namespace) -> int:
    from kdlab import distributed
    from kdlab.api import default_runs_dir
    from kdlab.deploy.compress import compress_grid, parse_compress, plan_lines
    from kdlab.schedule.plan import GridSpec, plan, provisional, states
    from kdlab.schedule.scheduler import check_options, log_finished_runs, run_grid, summary
    from kdlab.store import DB_NAME, Store

    if distributed.current() is not None:
        raise UserError("kdlab grid does not run under torchrun (that trains one run on several GPUs): run the "
                        "grid with --workers on one machine, or with --ray on a cluster")
    grid_options = dict(workers=args.workers, ray=args.ray, gpus_per_run=args.gpus_per_run, retries=args.retries,
                        ray_timeout=args.ray_timeout)
    check_options(**grid_options)
    overrides = {k: v for k, v in _overrides(args, {}).items() if k not in ("dataset", "data_dir")}
    spec = GridSpec(teachers=_csv(args.teachers), students=_csv(args.students), seeds=args.seeds,
                    preset=args.preset, methods=_csv(args.methods), dataset=args.dataset, data_dir=args.data_dir,
                    config=args.config, overrides={k: v for k, v in overrides.items() if v is not None},
                    method_args=_grid_method_args(args.method_arg), assistants=_csv(args.assistants),
                    teacher_width=args.teacher_width, student_width=args.student_width)
    runs = plan(spec, decode=not args.dry_run)
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    compress = parse_compress(args.compress) if args.compress else None
    if args.dry_run:
        store = Store(runs_dir, readonly=True) if (runs_dir / DB_NAME).exists() else None
        for r, state in zip(runs, states(runs, store), strict=True):
            print(f"{r.run_id}  {state:<8} {r.role:<8} {r.label}")
        for line in plan_lines(runs, compress, store) if compress else []:
            print(line)
        print(f"{len(runs)} runs planned in {runs_dir}")
        if provisional(runs):
            echo(f"kdlab: note: {runs[0].cfg.dataset} is not decoded yet (or not there), and a dry run decodes "
                 "nothing: these run ids are provisional, named after its place; the grid names them after its "
                 "content once it has read it")
        return 0
    log = echo
    log_finished_runs(runs, runs_dir)  # --mlflow on runs finished before: their stored records
    counts = run_grid(runs, runs_dir, **grid_options, quiet=args.quiet, log=log)
    if compress:
        counts.update(compress_grid(runs, runs_dir, compress, quiet=args.quiet, log=log))
    print(summary(counts))
    return 0 if counts.get("failed", 0) == counts.get("compress failed", 0) == 0 else 1


def _grid_method_args(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """--method-arg METHOD.KEY=VALUE pairs, grouped by method."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in _pairs(items, "--method-arg", "METHOD.KEY=VALUE").items():
        method, dot, name = key.partition(".")
        if not dot or not method or not name:
            raise UserError(f"--method-arg takes METHOD.KEY=VALUE, got {key!r}")
        out.setdefault(method.strip(), {})[name.strip()] = value
    return out


def _without_option(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


@command("report")
def _report(args: argparse.Namespace) -> int:
    from kdlab.api import default_runs_dir
    from kdlab.deploy.table import deployment_over, with_deployment, write_deployment
    from kdlab.merge import report_over
    from kdlab.outputs import writable_dir
    from kdlab.report import render, write_report

    out = writable_dir(args.out, "--out") if args.out else None
    runs_dirs = args.runs_dir or [default_runs_dir()]
    report = report_over(runs_dirs, dataset=args.dataset, preset=args.preset)
    deployment = deployment_over(runs_dirs, dataset=args.dataset, preset=args.preset)
    print(with_deployment(render(report, args.format, compare_paper=args.compare_paper), deployment, args.format))
    if out is not None:
        written = write_report(report, out, compare_paper=args.compare_paper)
        for path in written + write_deployment(deployment, out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


@command("merge")
def _merge(args: argparse.Namespace) -> int:
    from kdlab.merge import merge
    from kdlab.outputs import writable_dir

    result = merge(args.sources, writable_dir(args.into, "--into"), log=print)
    return 1 if result.combined.conflicts else 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from kdlab.outputs import writable_dir
    from kdlab.report import build_report, render, write_report
    from kdlab.schedule.plan import GridSpec, plan
    from kdlab.schedule.scheduler import run_grid
    from kdlab.store import Store

    runs_dir = writable_dir(args.runs_dir, "--runs-dir")
    data_dir = args.data_dir or str(runs_dir / "data")
    spec = GridSpec(seeds=args.seeds, preset="smoke", dataset="synthetic", data_dir=data_dir)
    t0 = time.perf_counter()
    runs = plan(spec)
    print(f"kdlab demo: the paper's study ({len(runs)} runs: 15 x {args.seeds} seeds) on synthetic data, smoke "
          f"preset, CPU, {args.workers} processes", file=sys.stderr)
    run_grid(runs, runs_dir, workers=args.workers, quiet=args.quiet, silent=args.quiet, log=echo)
    store = Store(runs_dir, readonly=True)
    report = build_report(store, dataset="synthetic", preset="smoke")
    store.close()
    print(render(report, "md", compare_paper=True))
    written = write_report(report, runs_dir / "report", compare_paper=True)
    print(f"\n{len(runs)} runs in {time.perf_counter() - t0:.0f}s; report and plots in {runs_dir / 'report'} "
          f"({len(written)} files)")
    return 0


@command("bench")
def _bench(args: argparse.Namespace) -> int:
    from kdlab import bench
    from kdlab.outputs import writable_dir

    out = writable_dir(args.out, "--out")
    models, what = _csv(args.models), set(_csv(args.what))
    if args.warmup < 0 or args.steps < 1:
        raise UserError("--warmup must be >= 0 and --steps >= 1")
    if not what <= {"throughput", "kd"}:
        raise UserError(f"--what takes throughput and/or kd, got {args.what!r}")
    overrides = _pairs(args.set, "--set")
    results: dict[str, Any] = {"environment": bench.environment(), "preset": args.preset, "overrides": overrides,
                               "warmup": args.warmup, "steps": args.steps}
    if "throughput" in what:
        results["throughput"] = bench.throughput(models, args.preset, args.warmup, args.steps, overrides)
    if "kd" in what:
        results["kd_overhead"] = bench.kd_overhead(models, models, args.preset, args.warmup, args.steps, overrides)
    print(bench.format_table(results))
    print(f"wrote {bench.write_results(results, out)}", file=sys.stderr)
    return 0


@command("export")
@command("compress")
@command("latency")
def _deploy(args: argparse.Namespace) -> int:
    from kdlab.deploy.commands import run_command

    return run_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kdlab` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = ["kdlab", *argv]
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # so that a reader who left (`| head`) shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader of our output is gone: stop quietly, as Unix tools do (exit 128 + SIGPIPE).
        # Point stdout at /dev/null so that Python's own flush at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UserError as e:
        sys.stderr.write(f"kdlab: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("kdlab: interrupted; run the same command again to resume\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
