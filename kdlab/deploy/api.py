"""The deploy layer's Python API: `export`, `compress` and `latency` of a run in a runs dir (what
`kdlab export`, `kdlab compress` and `kdlab latency` call, and `kdlab.export(...)` etc. from Python)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.errors import UserError
from kdlab.store import RunRecord, Store, runs_dir_or_default


def _store(runs_dir: str | Path | None) -> Store:
    return Store(runs_dir_or_default(runs_dir), create=False)


@dataclass
class Exported:
    """`export`'s result: the ONNX run, the run it came from, its file and its facts (size, check)."""

    record: RunRecord
    source: RunRecord
    path: Path  # the ONNX file (the copy at `out` when one was asked for)
    info: dict[str, Any]
    opset: int


def export(run: str, *, runs_dir: str | Path | None = None, fmt: str = "onnx", opset: int | None = None,
           out: str | Path | None = None, data_dir: str | None = None) -> Exported:
    """A finished run's model to ONNX (a run of its own, checked against PyTorch on test images);
    `out` also copies the file there. Exporting again returns the stored export."""
    from kdlab.deploy.export import DEFAULT_OPSET, check_format, check_opset, export_run
    from kdlab.deploy.files import model_file
    from kdlab.deploy.runs import deploy_info, finished_run
    from kdlab.outputs import copy_to, writable_file

    check_format(fmt)
    opset = DEFAULT_OPSET if opset is None else opset
    check_opset(opset)
    target = writable_file(out, "--out") if out is not None else None
    store = _store(runs_dir)
    try:
        source = finished_run(store, run)
        record = export_run(store, source, opset, data_dir=data_dir)
        path = model_file(store, record)
        info = deploy_info(store.root, record.run_id)
    finally:
        store.close()
    if target is not None:
        copy_to(path, target, "--out")
        path = target
    return Exported(record, source, path, info, opset)


@dataclass
class Compressed:
    """`compress`'s result: each step's run, and where they are."""

    steps: list[Any]
    root: Path
    text: str = ""  # the steps as `kdlab compress` prints them


def compress(run: str, *, prune: float | None = None, quantize: str | None = None, teacher: str | None = None,
             overrides: dict[str, Any] | None = None, runs_dir: str | Path | None = None,
             data_dir: str | None = None, quiet: bool = True, log: Callable[[str], Any] | None = None,
             **settings: Any) -> Compressed:
    """Prune (recovered with KD) and/or quantize (`quantize="int8"`) a finished run; every model made is
    a run. `settings`: criterion, epochs, lr, calibration, qat, opset (see `kdlab compress --help`);
    `overrides` are settings of the fine-tuning runs."""
    from kdlab.deploy.compress import CompressSpec, format_steps
    from kdlab.deploy.compress import compress as compress_run
    from kdlab.deploy.runs import finished_run

    given = {k: v for k, v in settings.items() if v is not None}
    unknown = set(given) - {"criterion", "epochs", "lr", "calibration", "qat", "opset"}
    if unknown:
        raise UserError(f"compress has no setting {sorted(unknown)[0]!r}")
    if quantize not in (None, "int8"):
        raise UserError(f"quantize takes int8, got {quantize!r}")
    spec = CompressSpec(prune=prune, int8=quantize == "int8", teacher=teacher, given=frozenset(given),
                        overrides={k.replace("-", "_"): v for k, v in (overrides or {}).items()}, **given)
    spec.check()
    store = _store(runs_dir)
    try:
        record = finished_run(store, run)
        steps = compress_run(store, record, spec, data_dir=data_dir, quiet=quiet, log=log or (lambda m: None))
        return Compressed(steps, store.root, format_steps(steps, store.root))
    finally:
        store.close()


@dataclass
class Latency:
    """`latency`'s result: what was measured, and one entry per runtime, device, batch and threads."""

    what: str
    measurements: list[dict[str, Any]] = field(default_factory=list)


def latency(target: str | Path, *, batches: Sequence[int] = (1, 64), threads: Sequence[int] | None = None,
            runtimes: set[str] | None = None, seconds: float = 1.0, runs_dir: str | Path | None = None,
            data_dir: str | None = None) -> Latency:
    """Median and p90 latency and throughput of a finished run (by id or prefix) or of an ONNX file:
    ONNX Runtime on the CPU, and PyTorch eager for a trained run. `threads`: CPU thread counts (default
    1 and every core); `runtimes`: onnxruntime and/or torch (default: what suits the model)."""
    import os

    from kdlab.deploy.latency import measure_file

    if not seconds > 0:
        raise UserError(f"--seconds must be > 0, got {seconds}")
    counts = list(threads) if threads is not None else [1, os.cpu_count() or 1]
    path = Path(target).expanduser()
    if path.exists() or path.suffix or "/" in str(target):  # a file, not a run id
        if not path.exists():
            raise UserError(f"{path} does not exist: give an ONNX file, or a run id (or prefix)")
        if not path.is_file():
            raise UserError(f"{path} is a folder: give an ONNX file, or a run id (or prefix)")
        return Latency(*measure_file(path, runs_dir_or_default(runs_dir), list(batches), counts, runtimes, seconds))
    store = _store(runs_dir)
    try:
        return Latency(*measure_run(store, str(target), list(batches), counts, runtimes, seconds, data_dir=data_dir))
    finally:
        store.close()


def measure_run(store: Store, spec: str, batches: list[int], threads: list[int], runtimes: set[str] | None,
                seconds: float, data_dir: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """`kdlab latency RUN`: an ONNX run in ONNX Runtime; a trained run in PyTorch and in ONNX Runtime through
    its fp32 export. Each figure is kept where the module's docstring says. Returns (what, measurements)."""
    from kdlab.data.residency import input_size
    from kdlab.deploy.export import export_run
    from kdlab.deploy.files import model_file
    from kdlab.deploy.latency import RUNTIMES, check_onnx_only, onnx_latency, torch_latency
    from kdlab.deploy.runs import artifact_dir, finished_run, fp32_export, load_run_model, save_latency
    from kdlab.deploy.runtime import dataset_of

    record = finished_run(store, spec)
    what = f"run {record.run_id} ({record.label or record.config['model']})"
    if "deploy" in record.config:
        source = record.config["deploy"]["source"]
        check_onnx_only(runtimes, f"run {record.run_id}", f"the trained run it came from, {source}")
        entries = onnx_latency(model_file(store, record), batches, threads, seconds)
        save_latency(artifact_dir(store.root, record.run_id), entries)
        return what, entries
    runtimes = runtimes or set(RUNTIMES)
    entries = []
    if "torch" in runtimes:
        images = dataset_of(record.config, data_dir).test.images
        shape = (images.shape[3], *input_size(record.config, images.shape[1:3]))
        mine = torch_latency(load_run_model(record, store.root), shape, batches, threads, seconds)
        save_latency(artifact_dir(store.root, record.run_id), mine)
        entries += mine
    if "onnxruntime" in runtimes:
        export = fp32_export(store.runs(), record.run_id)
        if export is None:
            export = export_run(store, record, data_dir=data_dir)
            print(f"kdlab latency: run {export.run_id} is the ONNX export of run {record.run_id}, made to time it",
                  file=sys.stderr)
        theirs = onnx_latency(model_file(store, export), batches, threads, seconds)
        save_latency(artifact_dir(store.root, export.run_id), theirs)
        entries += theirs
    return what, entries
