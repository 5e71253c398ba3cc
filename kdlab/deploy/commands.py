"""The deploy layer's commands: `kdlab export`, `kdlab compress`, `kdlab latency` (parsers and bodies).

`kdlab/cli.py` adds these parsers and sends the three commands here, so the command line stays
one thin layer whatever the deploy layer grows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
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
    p.add_argument("--criterion", default="l1", help="channel ranking: l1, l2 (filter norm) or bn (BatchNorm scale)")
    p.add_argument("--teacher", help="recovery teacher (default: the run's own teacher, else the unpruned run)")
    p.add_argument("--epochs", type=int, help="recovery and QAT epochs (default: a tenth of the run's, at least 1)")
    p.add_argument("--lr", type=float, help="recovery lr (default: a tenth of the run's; QAT a tenth of this)")
    p.add_argument("--quantize", choices=["int8"], help="int8: static QDQ quantization with ONNX Runtime")
    p.add_argument("--calibration", type=int, default=512, help="training images that set int8 ranges (512)")
    p.add_argument("--qat", default="auto",
                   help="quantization-aware KD: auto (when int8 loses more than 1 point), always or never")
    p.add_argument("--opset", type=int, help="ONNX opset (default 20)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the fine-tuning runs, e.g. --set compile=none (repeatable)")
    p.add_argument("--quiet", action="store_true", help="one line per epoch, no live progress bar")
    _common(p)

    p = sub.add_parser("latency", help="median and p90 latency and throughput: ONNX Runtime (CPU), PyTorch eager")
    p.add_argument("target", help="a finished run's id (or prefix), or an ONNX file")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--threads", default="1,all", help="comma-separated CPU thread counts; all = every core")
    p.add_argument("--runtime", default="onnxruntime,torch",
                   help="onnxruntime and/or torch (PyTorch eager fp32, CPU and GPU where present) for trained runs")
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per setting, at least (default 1)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    _common(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the run's dataset is now, if it moved")
    p.add_argument("--runs-dir", help="runs database (default $KDLAB_RUNS_DIR or ./runs)")


def run_command(args: argparse.Namespace) -> int:
    """Run `kdlab export|compress|latency`."""
    return {"export": _export, "compress": _compress, "latency": _latency}[args.command](args)


def _store(args: argparse.Namespace) -> Any:
    from kdlab.api import default_runs_dir
    from kdlab.store import Store

    return Store(Path(args.runs_dir) if args.runs_dir else default_runs_dir(), create=False)


def _export(args: argparse.Namespace) -> int:
    from kdlab.deploy.export import DEFAULT_OPSET, check_format, check_opset, export_run
    from kdlab.deploy.runs import deploy_info, finished_run, model_file

    check_format(args.format)
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    check_opset(opset)
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    store = _store(args)
    try:
        source = finished_run(store, args.run)
        record = export_run(store, source, opset, data_dir=args.data_dir)
        path = model_file(store.root, record)
        info = deploy_info(store.root, record.run_id)
    finally:
        store.close()
    print(f"run {record.run_id}: ONNX (opset {opset}) of run {source.run_id} ({source.config['model']}), "
          f"{info['size_bytes'] / 1e6:.3f} MB, {info['flops'] / 1e6:.1f} MFLOPs per image")
    print(f"check on {info['check_images']} test images: max |logit difference| vs PyTorch "
          f"{info['max_abs_diff']:.2e}, top-1 agreement {info['top1_agreement']:.2f}%")
    print(f"test accuracy in ONNX Runtime {record.final_acc:.2f}% (PyTorch {source.final_acc:.2f}%)")
    if out is not None:
        shutil.copyfile(path, out)
        path = out
    print(f"file {path}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from kdlab.cli import _pairs
    from kdlab.deploy.compress import CompressSpec, compress, format_steps
    from kdlab.deploy.export import DEFAULT_OPSET
    from kdlab.deploy.runs import finished_run

    spec = CompressSpec(prune=args.prune, criterion=args.criterion, int8=args.quantize == "int8", epochs=args.epochs,
                        lr=args.lr, calibration=args.calibration, qat=args.qat,
                        opset=DEFAULT_OPSET if args.opset is None else args.opset, teacher=args.teacher,
                        overrides={k.replace("-", "_"): v for k, v in _pairs(args.set, "--set").items()})
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
    from kdlab.deploy.latency import format_latency, onnx_latency, parse_counts, save_latency
    from kdlab.deploy.runs import artifact_dir, finished_run, model_file

    batches, threads = parse_counts(args.batch, "--batch"), parse_counts(args.threads, "--threads")
    runtimes = {t.strip() for t in args.runtime.split(",") if t.strip()}
    if not runtimes or not runtimes <= {"onnxruntime", "torch"}:
        raise UserError(f"--runtime takes onnxruntime and/or torch, got {args.runtime!r}")
    if not args.seconds > 0:
        raise UserError(f"--seconds must be > 0, got {args.seconds}")
    target = Path(args.target).expanduser()
    if target.is_file():
        entries = onnx_latency(target, batches, threads, args.seconds)
        what = str(target)
    else:
        store = _store(args)
        try:
            record = finished_run(store, args.target)
            if "deploy" in record.config:
                entries = onnx_latency(model_file(store.root, record), batches, threads, args.seconds)
            else:
                entries = _trained_latency(store, record, batches, threads, runtimes, args)
            save_latency(artifact_dir(store.root, record.run_id), entries)
            what = f"run {record.run_id} ({record.label or record.config['model']})"
        finally:
            store.close()
    if args.json:
        print(json.dumps({"target": what, "measurements": entries}, indent=2))
    else:
        print(f"latency of {what}\n{format_latency(entries)}")
    return 0


def _trained_latency(store: Any, record: Any, batches: list[int], threads: list[int], runtimes: set[str],
                     args: argparse.Namespace) -> list[dict[str, Any]]:
    """A trained run: PyTorch eager on its model, ONNX Runtime on its export (made here, not kept,
    when the run has no export run yet)."""
    from kdlab.data.residency import input_size
    from kdlab.deploy.export import DEFAULT_OPSET, export_onnx
    from kdlab.deploy.latency import onnx_latency, torch_latency
    from kdlab.deploy.runs import fp32_export, load_run_model, model_file
    from kdlab.deploy.runtime import dataset_of

    model = load_run_model(record, store.root)
    images = dataset_of(record.config, args.data_dir).test.images
    shape = (images.shape[3], *input_size(record.config, images.shape[1:3]))
    entries = torch_latency(model, shape, batches, threads, args.seconds) if "torch" in runtimes else []
    if "onnxruntime" in runtimes:
        exported = fp32_export(store.runs(), record.run_id)
        if exported is not None:
            entries += onnx_latency(model_file(store.root, exported), batches, threads, args.seconds)
        else:
            import torch

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                export_onnx(model, torch.zeros(2, *shape), path, DEFAULT_OPSET)
                entries += onnx_latency(path, batches, threads, args.seconds)
    return entries
