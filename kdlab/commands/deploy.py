"""`kdlab export`, `kdlab compress`, `kdlab latency`: a student to a deployed model, over kdlab.deploy.api."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kdlab.commands.options import settings

COMMANDS = ("export", "compress", "latency")


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="a finished run's model to ONNX, checked against PyTorch; a run of its own")
    p.add_argument("run", help="a finished run's id (or prefix)")
    p.add_argument("--format", default="onnx", help="onnx (the one format)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 20; the exporter writes 18 and later)")
    p.add_argument("--out", help="also copy the ONNX file here")
    _common(p)
    p.set_defaults(handler=export)

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
    p.set_defaults(handler=compress)

    p = sub.add_parser("latency", help="median and p90 latency and throughput: ONNX Runtime (CPU), PyTorch eager")
    p.add_argument("target", help="a finished run's id (or prefix), or an ONNX file")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--threads", default="1,all", help="comma-separated CPU thread counts; all = every core")
    p.add_argument("--runtime", help="onnxruntime and/or torch (PyTorch eager fp32, CPU and GPU where present; "
                   "trained runs only); default both for a trained run, onnxruntime for an ONNX model")
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per setting, at least (default 1)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    _common(p)
    p.set_defaults(handler=latency)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the run's dataset is now, if it moved")
    p.add_argument("--runs-dir", help="runs database (default $KDLAB_RUNS_DIR or ./runs)")


def export(args: argparse.Namespace) -> int:
    from kdlab.deploy.api import export as export_run

    done = export_run(args.run, runs_dir=args.runs_dir, fmt=args.format, opset=args.opset, out=args.out,
                      data_dir=args.data_dir)
    record, source, info = done.record, done.source, done.info
    print(f"run {record.run_id}: ONNX (opset {done.opset}) of run {source.run_id} ({source.config['model']}), "
          f"{info['size_bytes'] / 1e6:.3f} MB, {info['flops'] / 1e6:.1f} MFLOPs per image")
    print(f"check on {info['check_images']} test images: max |logit difference| vs PyTorch "
          f"{info['max_abs_diff']:.2e}, top-1 agreement {info['top1_agreement']:.2f}%")
    print(f"test accuracy in ONNX Runtime {record.final_acc:.2f}% (PyTorch {source.final_acc:.2f}%)")
    print(f"file {done.path}")
    return 0


def compress(args: argparse.Namespace) -> int:
    from kdlab.deploy.api import compress as compress_run

    given = {k: getattr(args, k) for k in ("criterion", "epochs", "lr", "calibration", "qat", "opset")}
    done = compress_run(args.run, prune=args.prune, quantize=args.quantize, teacher=args.teacher,
                        overrides=settings(args.set), runs_dir=args.runs_dir, data_dir=args.data_dir,
                        quiet=args.quiet, log=lambda m: print(f"kdlab compress: {m}", file=sys.stderr, flush=True),
                        **given)
    print(done.text)
    return 0


def latency(args: argparse.Namespace) -> int:
    from kdlab.deploy.api import latency as measure
    from kdlab.deploy.latency import format_latency, parse_counts, parse_runtimes
    from kdlab.errors import UserError

    batches, threads = parse_counts(args.batch, "--batch"), parse_counts(args.threads, "--threads")
    runtimes = parse_runtimes(args.runtime)
    if not args.seconds > 0:
        raise UserError(f"--seconds must be > 0, got {args.seconds}")
    done = measure(args.target, batches=batches, threads=threads, runtimes=runtimes, seconds=args.seconds,
                   runs_dir=args.runs_dir, data_dir=args.data_dir)
    if args.json:
        print(json.dumps({"target": done.what, "measurements": done.measurements}, indent=2))
    else:
        print(f"latency of {done.what}\n{format_latency(done.measurements)}")
    return 0
