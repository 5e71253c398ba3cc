"""The runs deployment reads and makes: finding them, loading their models, recording new ones.

A *deployment run* (an ONNX export, an int8 model) is a row of the store like a trained run, with
its config copied from the run it serves (dataset, preset, seed, model) plus a `deploy` entry:
the source run's id and the settings (format, opset, quantization). Its id is a hash of those,
so the same command twice returns the same run. Its accuracy is the test set's through ONNX
Runtime; its files live in `RUNS/deploy/<run_id>/`: `model.onnx`, `deploy.json` (size, FLOPs,
agreement with PyTorch..., and the sha256 of every file it made) and `latency.json` (every
measurement of the model, whatever it was measured by: `kdlab.deploy.latency`).

Runs trained for deployment (a pruned model's KD recovery, QAT) are ordinary runs of the loop;
`parent_of` follows any of these back to the run it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.config import Config
from kdlab.digests import file_sha256
from kdlab.errors import RunBusy, UserError
from kdlab.reporting.naming import is_deployment_run  # noqa: F401 (the deploy layer's name for it too)
from kdlab.store import RunRecord, Store, read_checkpoint_file

DEFAULT_OPSET = 20  # the ONNX opset exports are written in unless asked otherwise (kdlab.deploy.export)
RECOVERY_LR = 0.1  # recovery fine-tunes at this fraction of the original run's lr; QAT at a tenth of that

DEPLOY_DIR = "deploy"
PRUNED_DIR = "pruned"
MODEL_FILE = "model.onnx"
INFO_FILE = "deploy.json"
LATENCY_FILE = "latency.json"


def recovery_defaults(config: dict[str, Any]) -> tuple[int, float]:
    """The epochs and lr `compress` fine-tunes with unless told, from the config of the trained run it
    starts from: a tenth of its epochs, at least one (paper 100 -> 10, fast 40 -> 4, smoke 2 -> 1), at
    RECOVERY_LR of its lr (QAT at RECOVERY_LR of that)."""
    return max(1, round(int(config["epochs"]) / 10)), float(config["lr"]) * RECOVERY_LR


def finished_run(store: Store, spec: str) -> RunRecord:
    """A finished run by id or unambiguous prefix; one line for anything else."""
    record = store.find(spec)
    if record is None:
        raise UserError(f"no run {spec!r} in {store.root}: give a run id (or prefix) from `kdlab report`")
    if record.status != "done" or record.final_acc is None:
        raise UserError(f"run {record.run_id} is not finished (status {record.status}): finish it first")
    return record


def parent_of(record: RunRecord, by_id: dict[str, RunRecord]) -> RunRecord | None:
    """The run a deployment run came from: its source, the model a QAT run copied, a pruned run's parent."""
    cfg = record.config
    if "deploy" in cfg:
        return by_id.get(cfg["deploy"]["source"])
    if cfg.get("method") == "qat":
        return by_id.get(str(cfg.get("teacher")))
    if str(cfg.get("model", "")).startswith("pruned:"):
        return by_id.get((cfg.get("model_args") or {}).get("parent", ""))
    return None


def lineage(record: RunRecord, by_id: dict[str, RunRecord]) -> list[RunRecord]:
    """The run and its ancestors, back to the trained run it all started from (last)."""
    chain = [record]
    while (up := parent_of(chain[-1], by_id)) is not None and up not in chain:
        chain.append(up)
    return chain


# ---- deployment runs --------------------------------------------------------------------------


def deploy_id(source_id: str, settings: dict[str, Any]) -> str:
    """Identity of a deployment run: its source run and its settings."""
    blob = json.dumps({"source": source_id, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def deploy_config(source: RunRecord, settings: dict[str, Any]) -> dict[str, Any]:
    """The stored config of a deployment run: the source's, with what was done to it."""
    kind = "int8" if settings.get("quantize") else settings["format"]
    return {**source.config, "method": kind, "teacher": None, "teacher_path": None,
            "deploy": {"source": source.run_id, **settings}}


def artifact_dir(root: Path, run_id: str) -> Path:
    return Path(root) / DEPLOY_DIR / run_id


def scratch_dir(root: Path) -> Path:
    """A fresh folder for files being made; moved into place only when the run is recorded."""
    path = Path(root) / DEPLOY_DIR / f".tmp-{os.getpid()}-{time.time_ns()}"
    path.mkdir(parents=True)
    return path


def record_deploy_run(store: Store, run_id: str, config: dict[str, Any], label: str, files: Path,
                      info: dict[str, Any], final_acc: float, wall_s: float, *, params: int | None,
                      paper_params: int | None, device: str, versions: dict[str, str]) -> RunRecord:
    """Store a finished deployment run and move its files into place. If another process made it
    meanwhile, ours are discarded and its run returned (RunBusy while it is still at it)."""
    from kdlab.store import owner_id

    owner = owner_id()
    store.ensure(run_id, config, label)
    state = store.claim(run_id, owner)
    if state != "claimed":
        shutil.rmtree(files, ignore_errors=True)
        if state == "busy":
            raise RunBusy(f"run {run_id} is being made by another live process")
        return store.get(run_id)
    try:
        target = artifact_dir(store.root, run_id)
        if target.exists():  # left by a process killed between these lines
            shutil.rmtree(target)
        write_json(files / INFO_FILE, {**info, "files": file_digests(files)})
        os.replace(files, target)
        store.set_info(run_id, device=device, versions_json=versions, params=params, paper_params=paper_params)
        store.finish(run_id, {"final_acc": final_acc, "best_acc": final_acc, "best_epoch": 1, "wall_s": wall_s,
                              "timing": {"wall_s": wall_s}})
    except BaseException:
        store.release(run_id, owner)
        raise
    return store.get(run_id)


def deploy_info(root: Path, run_id: str) -> dict[str, Any]:
    return read_json(artifact_dir(root, run_id) / INFO_FILE, {})


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of each file a deployment run made (its model and any external data), by name: kept in
    its deploy.json and checked whenever the model is used (kdlab.deploy.files)."""
    return {p.name: file_sha256(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name not in (INFO_FILE, LATENCY_FILE)}


def copy_run_files(src: Path, dst: Path, record: RunRecord) -> None:
    """Copy what the deploy layer keeps for a run beside the store (`kdlab merge`): its folder under
    deploy/ (ONNX file, facts, latency) and, for a pruned model, the pruned weights it starts from."""
    folder = artifact_dir(src, record.run_id)
    if folder.is_dir():
        target = artifact_dir(dst, record.run_id)
        tmp = target.with_name(f".tmp-{os.getpid()}-{record.run_id}")
        shutil.copytree(folder, tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    digest = (record.config.get("model_args") or {}).get("sha256")
    if str(record.config.get("model", "")).startswith("pruned:") and digest:
        name = f"{digest[:16]}.pt"
        if (Path(src) / PRUNED_DIR / name).is_file() and not (Path(dst) / PRUNED_DIR / name).exists():
            (Path(dst) / PRUNED_DIR).mkdir(parents=True, exist_ok=True)
            tmp = Path(dst) / PRUNED_DIR / f"{name}.tmp{os.getpid()}"
            shutil.copyfile(Path(src) / PRUNED_DIR / name, tmp)
            os.replace(tmp, Path(dst) / PRUNED_DIR / name)


def read_json(path: Path, default: Any) -> Any:
    """A JSON file's content; `default` when it is missing or damaged (the files checks say which)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return default


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ---- models of runs ---------------------------------------------------------------------------


def run_config(record: RunRecord) -> Config:
    """A trained run's config as a Config (fields this kdlab does not know are left out)."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in record.config.items() if k in names})


def derived_config(record: RunRecord, changes: dict[str, Any], overrides: dict[str, Any] | None = None,
                   data_dir: str | None = None) -> Config:
    """A fine-tuning run's config: `record`'s, with `changes`, then the user's `overrides` (--set),
    validated as any config is."""
    from kdlab.config import _DERIVED_FIELDS
    from kdlab.configure import bind_dataset, build_config

    cfg = {k: v for k, v in {**dataclasses.asdict(run_config(record)), **changes}.items() if k not in _DERIVED_FIELDS}
    extra = {**(overrides or {}), **({"data_dir": data_dir} if data_dir else {})}
    return bind_dataset(build_config(cfg["preset"], cfg["model"], cfg, extra))  # same data: same fingerprint


def fp32_export(runs: list[RunRecord], source_id: str) -> RunRecord | None:
    """The newest finished fp32 ONNX export of run `source_id` among `runs`."""
    found = [r for r in runs if r.status == "done" and r.final_acc is not None
             and r.config.get("deploy", {}).get("source") == source_id and not r.config["deploy"].get("quantize")]
    return found[-1] if found else None


def model_args(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """A run's model_args with file locations pointed into this runs dir (which may have moved)."""
    args = dict(config.get("model_args") or {})
    if str(config.get("model", "")).startswith("pruned:") and "sha256" in args:
        args["path"] = str(Path(root) / PRUNED_DIR / f"{args['sha256'][:16]}.pt")
    return args


def load_run_model(record: RunRecord, root: Path) -> nn.Module:
    """A trained run's final model on the CPU, in eval mode, as plain float layers (a QAT run's
    quantization-aware layers are turned back into ordinary ones)."""
    from kdlab.methods.qat import make_quant_aware, strip_quant_aware
    from kdlab.models import create_model

    if "deploy" in record.config:
        raise UserError(f"run {record.run_id} is an ONNX model ({record.config['method']}), not a trained one: "
                        f"give the run it came from, {record.config['deploy']['source']}")
    if record.checkpoint is None:
        raise UserError(f"run {record.run_id} has no checkpoint in {root}")
    ckpt = read_checkpoint_file(record.checkpoint)
    cfg = record.config
    model = create_model(cfg["model"], cfg["width"], ckpt["model"]["num_classes"], **model_args(cfg, root))
    qat = cfg.get("method") == "qat"
    if qat:
        make_quant_aware(model)
    model.load_state_dict(ckpt["student"])
    if qat:
        strip_quant_aware(model)
    return model.eval()


def model_flops(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Floating-point operations of one image's forward pass (a multiply-add counts 2), as PyTorch's
    FlopCounterMode counts them (convolutions and matrix products; BatchNorm, ReLU, pooling are
    left out, a few percent at most here)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *image_shape))
    return int(counter.get_total_flops())


def file_size(path: Path) -> int:
    """Bytes on disk of an ONNX model with any external data files beside it."""
    return sum(p.stat().st_size for p in Path(path).parent.iterdir()
               if p.is_file() and (p == path or p.name.startswith(Path(path).name + ".")))


def save_latency(folder: Path, entries: list[dict[str, Any]]) -> None:
    """Add measurements to the latency.json in a run's folder, replacing older ones of the same setting and CPU."""
    path = folder / LATENCY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ("runtime", "device", "cpu", "batch", "threads")
    new = {tuple(e[k] for k in key) for e in entries}
    kept = [e for e in read_json(path, []) if tuple(e.get(k) for k in key) not in new]
    write_json(path, kept + entries)
