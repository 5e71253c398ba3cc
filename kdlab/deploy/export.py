"""A run's model to ONNX, checked: `onnx.checker`, then ONNX Runtime against PyTorch on test images.

The exporter is PyTorch's torch.export-based one (`torch.onnx.export(..., dynamo=True)`, the
default and maintained path since PyTorch 2.9; the TorchScript exporter is deprecated and will be
removed). It writes opset 18 and later, and falls back silently to another opset when asked for
one it cannot write, so the opset of the written file is checked. The batch dimension is
dynamic; image size and channels are fixed.

An export is accepted only if the checker passes and ONNX Runtime's logits on a batch of test
images match PyTorch's within `ATOL + RTOL * max|logit|`, with 100% top-1 agreement; otherwise
it is an error and nothing is recorded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.deploy import require
from kdlab.deploy.files import keep_made, made_before
from kdlab.deploy.latency import cpu_model, measure_new_model
from kdlab.deploy.runs import (
    DEFAULT_OPSET,
    MODEL_FILE,
    deploy_config,
    deploy_id,
    file_size,
    load_run_model,
    model_flops,
    scratch_dir,
)
from kdlab.deploy.runtime import (
    accuracy,
    dataset_of,
    evaluation_loader,
    first_batch,
    normalisation,
    run_logits,
    session,
)
from kdlab.errors import UserError
from kdlab.models import count_params, paper_params
from kdlab.store import RunRecord, Store

FORMATS = ("onnx",)
MIN_OPSET = 18  # the torch.export-based exporter's first opset
ATOL, RTOL = 1e-4, 1e-4


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: kdlab exports {', '.join(FORMATS)}")


def check_opset(opset: int) -> None:
    """Refuse, before any work, an opset the installed exporter or onnx cannot write."""
    onnx = require("onnx")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UserError(f"opset {opset} cannot be written here: PyTorch's exporter writes opsets {MIN_OPSET} to "
                        f"{newest} (onnx {onnx.__version__})")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs its progress and warns about unrelated deprecations: keep the terminal for ours."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """Write `model` (eval mode, CPU) as ONNX with a dynamic batch dimension, and check the file."""
    require("onnxscript")  # the exporter's translation library
    onnx = require("onnx")
    batch = torch.export.Dim("batch")
    try:
        with _quiet_exporter():
            program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=opset,
                                        dynamic_shapes=({0: batch},), input_names=["x"], output_names=["logits"],
                                        verbose=False)
            program.save(str(path))
    except Exception as e:  # noqa: BLE001 (the exporter raises many kinds; all mean "could not export")
        raise UserError(f"PyTorch could not export this model to ONNX: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001 (ValidationError and shape-inference errors)
        raise UserError(f"the exported ONNX file fails onnx.checker: {str(e).splitlines()[0]}") from None
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise UserError(f"the installed exporter (torch {torch.__version__}) cannot write opset {opset}: it wrote "
                        f"{written}")


def stamp(path: Path, props: dict[str, Any]) -> None:
    """Record what a deployer must know (input normalisation, classes, source run) in the file itself."""
    onnx = require("onnx")
    proto = onnx.load(str(path))
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"kdlab.{key}", str(value)
    onnx.save(proto, str(path))


@torch.no_grad()
def compare(sess: Any, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """ONNX Runtime against PyTorch on a batch: max |logit difference| and top-1 agreement (percent)."""
    ours, theirs = torch.from_numpy(run_logits(sess, x)), model.eval()(x)
    return {"max_abs_diff": float((ours - theirs).abs().max()),
            "logit_scale": float(theirs.abs().max()),
            "top1_agreement": float((ours.argmax(1) == theirs.argmax(1)).float().mean() * 100),
            "check_images": len(x)}


def check_agreement(result: dict[str, float]) -> None:
    """An export that disagrees with PyTorch is an error, not a warning."""
    tolerance = ATOL + RTOL * result["logit_scale"]
    if result["max_abs_diff"] > tolerance or result["top1_agreement"] < 100.0:
        raise UserError(f"the ONNX model disagrees with PyTorch on {result['check_images']} test images: max "
                        f"|logit difference| {result['max_abs_diff']:.2e} (tolerance {tolerance:.2e}), top-1 "
                        f"agreement {result['top1_agreement']:.2f}%")


def export_settings(opset: int) -> dict[str, Any]:
    """What identifies an fp32 export of a run (with the run's id)."""
    return {"format": "onnx", "opset": opset}


def export_run(store: Store, source: RunRecord, opset: int = DEFAULT_OPSET, *, data_dir: str | None = None,
               label: str | None = None) -> RunRecord:
    """The fp32 ONNX export of a finished trained run, as a run of its own (made once, then reused; made
    again in place when its file is missing or damaged)."""
    check_opset(opset)
    settings = export_settings(opset)
    run_id = deploy_id(source.run_id, settings)
    existing, damaged = made_before(store, run_id)
    if existing is not None and damaged is None:
        return existing
    t0 = time.perf_counter()
    model = load_run_model(source, store.root)
    dataset = dataset_of(source.config, data_dir)
    loader = evaluation_loader(source.config, dataset)
    x = first_batch(loader)
    files = scratch_dir(store.root)
    try:
        path = files / MODEL_FILE
        export_onnx(model, x[:2], path, opset)
        sess = session(path)
        check = compare(sess, model, x)
        check_agreement(check)
        mean, std = normalisation(dataset)
        stamp(path, {"source_run": source.run_id, "model": source.config["model"], "input": "NCHW float32, "
                     "(pixel/255 - mean) / std", "mean": mean, "std": std, "classes": dataset.classes})
        acc = accuracy(sess, loader)
        image_shape = tuple(x.shape[1:])
        info = {"precision": "fp32", **settings, "size_bytes": file_size(path),
                "flops": model_flops(model, image_shape), "image_shape": list(image_shape), **check,
                "torch_acc": source.final_acc}
        measure_new_model(path, files)
        record = keep_made(store, run_id, deploy_config(source, settings),
                           label or f"{source.label or source.run_id} | onnx fp32", files, info, acc,
                           time.perf_counter() - t0, rebuilding=damaged, params=count_params(model),
                           paper_params=paper_params(model), device=cpu_model(), versions=deploy_versions())
    except BaseException:
        shutil.rmtree(files, ignore_errors=True)
        raise
    return record


def deploy_versions() -> dict[str, str]:
    """Library versions behind a deployment result (kdlab's, torch's and the ONNX stack's)."""
    from kdlab.device import versions

    out = versions()
    for name in ("onnx", "onnxruntime", "onnxscript", "torch_pruning"):
        with contextlib.suppress(UserError):
            out[name] = require(name).__version__
    return out
