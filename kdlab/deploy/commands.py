"""The deploy layer's commands: `kdlab export`, `kdlab compress`, `kdlab latency` (parsers and bodies).

`kdlab/cli.py` adds these parsers and sends the three commands here, so the command line stays
one thin layer whatever the deploy layer grows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kdlab.errors import UserError

COMMANDS = ("export", "compress", "latency")


def add_parsers(sub: Any) -> None:
    """The three subcommands, on the `kdlab` parser's subparsers."""
    p = sub.add_parser("export", help="a finished run's model to ONNX, checked against PyTorch; a run of its own")
    p.add_argument("run", help="a finished run's id (or prefix)")
    p.add_argument("--format", default="onnx", help="onnx (the one format)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 20; the exporter writes 18 and later)")
    p.add_argument("--out", help="also copy the ONNX file here")
    _common(p)

    p = sub.add_parser("compress", help="prune (recovered with KD) and/or quantize a finished run; each model a run")
    p.add_argument("run", help="a finished run's id (or prefix), usually a distilled student")
    p.add_argument("--prune", type=float, metavar="RATIO", help="remove this fraction of every layer's channels")
    p.add_argument("--criterion", help="channel ranking: l1 (the default), l2 (filter norm) or bn (BatchNorm scale)")
    p.add_argument("--teacher", help="recovery teacher (default: the run's own teacher, else the unpruned run)")
    p.add_argument("--epochs", type=int, help="recovery and QAT epochs (default: a tenth of the run's, at least 1)")
    p.add_argument("--lr", type=float, help="recovery lr (default: a tenth of the run's; QAT a tenth of this)")
    p.add_argument("--quantize", choices=["int8"], help="int8: static QDQ quantization with ONNX Runtime")
    p.add_argument("--calibration", type=int, help="training images that set int8 ranges (512)")
    p.add_argument("--qat", help="quantization-aware KD: auto (the default: when int8 loses more than 1 point), "
                   "always or never")
    p.add_argument("--opset", type=int, help="ONNX opset (default 20)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the fine-tuning runs, e.g. --set compile=none (repeatable)")
    p.add_argument("--quiet", action="store_true", help="one line per epoch, no live progress bar")
    _common(p)

    p = sub.add_parser("latency", help="median and p90 latency and throughput: ONNX Runtime (CPU), PyTorch eager")
    p.add_argument("target", help="a finished run's id (or prefix), or an ONNX file")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--threads", default="1,all", help="comma-separated CPU thread counts; all = every core")
    p.add_argument("--runtime", help="onnxruntime and/or torch (PyTorch eager fp32, CPU and GPU where present; "
                   "trained runs only); default both for a trained run, onnxruntime for an ONNX model")
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per setting, at least (default 1)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    _common(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the run's dataset is now, if it moved")
    p.add_argument("--runs-dir", help="runs database (default $KDLAB_RUNS_DIR or ./runs)")


def run_command(args: argparse.Namespace) -> int:
    """Run `kdlab export|compress|latency`."""
    return {"export": _export, "compress": _compress, "latency": _latency}[args.command](args)


def _runs_dir(args: argparse.Namespace) -> Path:
    from kdlab.api import default_runs_dir

    return Path(args.runs_dir) if args.runs_dir else default_runs_dir()


def _store(args: argparse.Namespace) -> Any:
    from kdlab.store import Store

    return Store(_runs_dir(args), create=False)


def _export(args: argparse.Namespace) -> int:
    from kdlab.deploy.export import DEFAULT_OPSET, check_format, check_opset, export_run
    from kdlab.deploy.files import model_file
    from kdlab.deploy.runs import deploy_info, finished_run
    from kdlab.outputs import copy_to, writable_file

    check_format(args.format)
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    check_opset(opset)
    out = writable_file(args.out, "--out") if args.out else None
    store = _store(args)
    try:
        source = finished_run(store, args.run)
        record = export_run(store, source, opset, data_dir=args.data_dir)
        path = model_file(store, record)
        info = deploy_info(store.root, record.run_id)
    finally:
        store.close()
    print(f"run {record.run_id}: ONNX (opset {opset}) of run {source.run_id} ({source.config['model']}), "
          f"{info['size_bytes'] / 1e6:.3f} MB, {info['flops'] / 1e6:.1f} MFLOPs per image")
    print(f"check on {info['check_images']} test images: max |logit difference| vs PyTorch "
          f"{info['max_abs_diff']:.2e}, top-1 agreement {info['top1_agreement']:.2f}%")
    print(f"test accuracy in ONNX Runtime {record.final_acc:.2f}% (PyTorch {source.final_acc:.2f}%)")
    if out is not None:
        copy_to(path, out, "--out")
        path = out
    print(f"file {path}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from kdlab.cli import _pairs
    from kdlab.deploy.compress import CompressSpec, compress, format_steps
    from kdlab.deploy.runs import finished_run

    given = {k: getattr(args, k) for k in ("criterion", "epochs", "lr", "calibration", "qat", "opset")
             if getattr(args, k) is not None}
    spec = CompressSpec(prune=args.prune, int8=args.quantize == "int8", teacher=args.teacher, given=frozenset(given),
                        overrides={k.replace("-", "_"): v for k, v in _pairs(args.set, "--set").items()}, **given)
    spec.check()
    store = _store(args)
    try:
        record = finished_run(store, args.run)
        steps = compress(store, record, spec, data_dir=args.data_dir, quiet=args.quiet,
                         log=lambda m: print(f"kdlab compress: {m}", file=sys.stderr, flush=True))
        print(format_steps(steps, store.root))
    finally:
        store.close()
    return 0


def _latency(args: argparse.Namespace) -> int:
    from kdlab.deploy.latency import format_latency, measure_file, measure_run, parse_counts, parse_runtimes

    batches, threads = parse_counts(args.batch, "--batch"), parse_counts(args.threads, "--threads")
    runtimes = parse_runtimes(args.runtime)
    if not args.seconds > 0:
        raise UserError(f"--seconds must be > 0, got {args.seconds}")
    target = Path(args.target).expanduser()
    if target.exists() or target.suffix or "/" in args.target:  # a file, not a run id
        if not target.exists():
            raise UserError(f"{target} does not exist: give an ONNX file, or a run id (or prefix)")
        if not target.is_file():
            raise UserError(f"{target} is a folder: give an ONNX file, or a run id (or prefix)")
        what, entries = measure_file(target, _runs_dir(args), batches, threads, runtimes, args.seconds)
    else:
        store = _store(args)
        try:
            what, entries = measure_run(store, args.target, batches, threads, runtimes, args.seconds,
                                        data_dir=args.data_dir)
        finally:
            store.close()
    if args.json:
        print(json.dumps({"target": what, "measurements": entries}, indent=2))
    else:
        print(f"latency of {what}\n{format_latency(entries)}")
    return 0
