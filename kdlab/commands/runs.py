"""`kdlab train` and `kdlab distill`: one run (kdlab.api.train, kdlab.api.distill), on one process or
several (--nproc, through torchrun)."""

from __future__ import annotations

import argparse
from typing import Any

from kdlab.commands.options import add_nproc, add_run_options, distributed_launch, overrides, pairs, quiet_rank
from kdlab.errors import UserError


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model from scratch with cross-entropy")
    p.add_argument("model")
    p.add_argument("--width", type=float, help="width multiplier (default 1.0; smoke preset 0.125)")
    add_run_options(p)
    add_nproc(p)
    p.set_defaults(handler=train)

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
    add_run_options(p)
    add_nproc(p)
    p.set_defaults(handler=distill)


def train(args: argparse.Namespace) -> int:
    from kdlab.api import train as train_run

    launched = distributed_launch(args)
    if launched is not None:
        return launched
    record = train_run(args.model, preset=args.preset, config=args.config, runs_dir=args.runs_dir, quiet=args.quiet,
                       verbose=True, **overrides(args, {"width": args.width}))
    return print_record(record)


def distill(args: argparse.Namespace) -> int:
    from kdlab.api import distill as distill_run

    launched = distributed_launch(args)
    if launched is not None:
        return launched
    extra = {"width": args.width, "temperature": args.temperature, "alpha": args.alpha,
             "method_args": pairs(args.method_arg, "--method-arg") or None}
    record = distill_run(args.teacher, args.student, teacher_model=args.teacher_model,
                         teacher_width=args.teacher_width, method=args.method, preset=args.preset, config=args.config,
                         runs_dir=args.runs_dir, quiet=args.quiet, verbose=True,
                         allow_other_data=args.allow_other_data, trust_checkpoint=args.trust_checkpoint,
                         **overrides(args, extra))
    return print_record(record)


def print_record(record: Any) -> int:
    """A finished run in three lines (and its verdict if it diverged: exit 1); a failed run is a UserError."""
    cfg = record.config
    if record.status == "failed":
        raise UserError(f"run {record.run_id} failed: {record.error}")
    if quiet_rank():
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
