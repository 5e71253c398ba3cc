"""The files of a deployment run: checked against the digests recorded when they were made, and rebuilt
by the command that made them.

A deployment run's folder, `RUNS/deploy/<run>/`, holds `model.onnx` (with any external data files
beside it), `deploy.json` (facts about the model, and under "files" the sha256 of every file the run
made) and `latency.json` (measurements, added to over time, so not digested). Whatever reads a model
(`kdlab latency`, `report`, int8 quantization of an fp32 export) checks it first and says in one line
what is wrong and which command rebuilds it; the commands that make models (`export`, `compress`)
rebuild a missing or damaged file in place, keeping the run and its measurements. Runs recorded
before digests were kept are checked by their recorded size.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from kdlab.deploy.runs import (
    DEFAULT_OPSET,
    INFO_FILE,
    LATENCY_FILE,
    MODEL_FILE,
    RECOVERY_LR,
    artifact_dir,
    deploy_info,
    file_digests,
    file_size,
    lineage,
    read_json,
    record_deploy_run,
    recovery_defaults,
    save_latency,
    write_json,
)
from kdlab.digests import file_sha256
from kdlab.errors import UserError, warn
from kdlab.store import RunRecord, Store


def file_problem(root: Path, record: RunRecord) -> str | None:
    """What is wrong with a deployment run's files, in a few words naming the file; None when they are
    as they were made."""
    folder = artifact_dir(root, record.run_id)
    info = deploy_info(root, record.run_id)
    if not info:
        return f"{folder / INFO_FILE}, the record of what run {record.run_id} made, is missing or damaged"
    digests: dict[str, str | None] = info.get("files") or {MODEL_FILE: None}
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if digest is not None and file_sha256(path) != digest:
            return f"{path} is damaged (its sha256 differs from the one recorded when it was made)"
    path = folder / MODEL_FILE
    if "files" not in info and "size_bytes" in info and file_size(path) != info["size_bytes"]:
        return f"{path} is damaged ({file_size(path):,} bytes; {info['size_bytes']:,} when it was made)"
    return None


# What `compress` sets on its fine-tuning runs itself (prune.recovery_config, quantize.qat_run): any other
# difference from the run they were made from came from the user's --set.
_FINE_TUNING_SETS = {"model", "model_args", "method", "method_args", "teacher", "teacher_path", "epochs", "lr",
                     "scheduler", "warmup", "snapshots", "data_dir"}


def rebuild_command(record: RunRecord, by_id: dict[str, RunRecord]) -> str:
    """The command that makes a deployment run's files again: `export` for an fp32 model, the `compress`
    that made an int8 one (from the trained run it all started from), with every option that run was made
    with, so that it finds its fine-tuning runs finished instead of training others."""
    from kdlab.config import _DERIVED_FIELDS

    dep = record.config["deploy"]
    opset = "" if dep.get("opset", DEFAULT_OPSET) == DEFAULT_OPSET else f" --opset {dep['opset']}"
    if not dep.get("quantize"):
        return f"kdlab export {dep['source'][:8]}{opset}"
    chain = lineage(record, by_id)[1:]  # the trained runs it came from, the first trained one last
    steps, epochs, lr, sets = [], None, None, {}
    for run, parent in zip(chain, chain[1:], strict=False):
        cfg = run.config
        if cfg.get("method") == "qat":
            steps.append("--qat always")
            lr = lr or float(cfg["lr"]) / RECOVERY_LR  # QAT trains at a tenth of the recovery lr
        elif str(cfg.get("model", "")).startswith("pruned:"):
            args = cfg.get("model_args") or {}
            steps.append(f"--prune {args.get('ratio', 0):g} --criterion {args.get('criterion', 'l1')}")
            lr = float(cfg["lr"])
            default_teacher = parent.config.get("teacher") or parent.run_id
            if cfg.get("teacher") != default_teacher:
                teacher = str(cfg["teacher"])  # a run id, or file:SHA for a checkpoint given by its path
                named = shlex.quote(str(cfg.get("teacher_path"))) if teacher.startswith("file:") else teacher[:8]
                steps.append(f"--teacher {named}")
        else:
            continue
        epochs = epochs or cfg.get("epochs")
        sets.update({k: v for k, v in cfg.items() if k not in _FINE_TUNING_SETS and k not in _DERIVED_FIELDS
                     and v != parent.config.get(k)})
    origin = chain[-1] if chain else None
    options = [*steps, *([f"--epochs {epochs}"] if epochs else [])]
    if lr is not None and origin is not None and not math.isclose(lr, recovery_defaults(origin.config)[1]):
        options.append(f"--lr {lr:.10g}")
    options += [f"--set {shlex.quote(f'{k}={v if isinstance(v, str) else json.dumps(v)}')}"
                for k, v in sorted(sets.items())]
    options.append(f"--quantize int8 --calibration {dep.get('calibration')}")
    return f"kdlab compress {(origin.run_id if origin else dep['source'])[:8]} {' '.join(options)}{opset}"


def problem_line(by_id: dict[str, RunRecord], record: RunRecord, problem: str) -> str:
    """One line: what is wrong, and the command that rebuilds it."""
    command = rebuild_command(record, by_id)
    made_by = "" if command.startswith("kdlab export") else " (the command that made it)"
    return f"{problem}: `{command}`{made_by} rebuilds it"


def model_file(store: Store, record: RunRecord) -> Path:
    """The ONNX file a deployment run serves, checked: one line naming what is wrong and the command that
    rebuilds it when it is missing or damaged."""
    if "deploy" not in record.config:
        raise UserError(f"run {record.run_id} is not an ONNX model")
    problem = file_problem(store.root, record)
    if problem is not None:
        raise UserError(problem_line({r.run_id: r for r in store.runs()}, record, problem))
    return artifact_dir(store.root, record.run_id) / MODEL_FILE


def made_before(store: Store, run_id: str) -> tuple[RunRecord | None, str | None]:
    """A deployment run made before: (the run, None) when its files are whole, (the run, what is wrong)
    when they must be made again, (None, None) when it was never finished."""
    existing = store.get(run_id)
    if existing is None or existing.status != "done":
        return None, None
    return existing, file_problem(store.root, existing)


def keep_made(store: Store, run_id: str, config: dict[str, Any], label: str, files: Path, info: dict[str, Any],
              final_acc: float, wall_s: float, *, rebuilding: str | None, **facts: Any) -> RunRecord:
    """Record a new deployment run (see `record_deploy_run`), or put the files made again in place of a
    finished run's damaged ones (`rebuilding` says what was wrong), keeping its record and measurements."""
    if rebuilding is None:
        return record_deploy_run(store, run_id, config, label, files, info, final_acc, wall_s, **facts)
    _replace_files(artifact_dir(store.root, run_id), files, info)
    record = store.get(run_id)
    assert record is not None and record.final_acc is not None
    warn(f"{rebuilding}: rebuilt it (test accuracy in ONNX Runtime {final_acc:.2f}%; {record.final_acc:.2f}% "
         "when first made)")
    return record


def _replace_files(target: Path, files: Path, info: dict[str, Any]) -> None:
    write_json(files / INFO_FILE, {**info, "files": file_digests(files)})
    # The measurements of the run's model so far stay: the file is made from the same model and settings.
    if target.is_dir():
        fresh = read_json(files / LATENCY_FILE, [])
        write_json(files / LATENCY_FILE, read_json(target / LATENCY_FILE, []))
        save_latency(files, fresh)
    old = target.with_name(f".old-{os.getpid()}-{target.name}")
    if target.exists():
        os.replace(target, old)
    os.replace(files, target)
    shutil.rmtree(old, ignore_errors=True)
