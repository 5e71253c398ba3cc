"""int8 with ONNX Runtime: post-training static quantization to QDQ, calibrated on training images.

The fp32 ONNX export of a run is pre-processed (`quant_pre_process`: shape inference and ORT's
graph optimisations, which fold BatchNorm into the convs before ranges are taken), then quantized
by `quantize_static`: weights int8, symmetric, one scale per output channel; activations uint8,
one range per tensor, from the min and max seen on the first N training images (MinMax); QDQ
format, so the file is standard ONNX that any runtime can read and ORT runs with int8 kernels.
The int8 model is a run: its accuracy is the test set's through ONNX Runtime.

The second mode, for when post-training quantization loses too much: quantization-aware
fine-tuning with KD (`qat_run`, the training method `qat`), after which the fine-tuned model is
quantized the same way.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from kdlab.deploy import require
from kdlab.deploy.export import check_opset, deploy_versions
from kdlab.deploy.files import keep_made, made_before, model_file
from kdlab.deploy.latency import cpu_model, measure_new_model
from kdlab.deploy.runs import (
    MODEL_FILE,
    deploy_config,
    deploy_id,
    deploy_info,
    derived_config,
    file_size,
    load_run_model,
    model_args,
    scratch_dir,
)
from kdlab.deploy.runtime import (
    accuracy,
    calibration_loader,
    dataset_of,
    evaluation_loader,
    first_batch,
    images,
    run_logits,
    session,
)
from kdlab.store import RunRecord, Store

DEFAULT_CALIBRATION = 512


def quantize_int8(fp32: Path, out: Path, batches: list[Any]) -> None:
    """Write the int8 QDQ model of the fp32 ONNX file `fp32` to `out`, calibrated on `batches`
    (numpy arrays of normalised images)."""
    q = require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    name = session(prepared).get_inputs()[0].name

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.rest = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            x = next(self.rest, None)
            return None if x is None else {name: x}

    q.quantize_static(str(prepared), str(out), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      calibrate_method=q.CalibrationMethod.MinMax)
    prepared.unlink()


def int8_settings(opset: int, calibration: int) -> dict[str, Any]:
    """What identifies an int8 model of a run (with the run's id)."""
    return {"format": "onnx", "opset": opset, "quantize": "int8", "calibration": calibration, "calibrate": "minmax",
            "weights": "int8 per-channel symmetric", "activations": "uint8 per-tensor"}


def int8_run(store: Store, source: RunRecord, fp32: RunRecord, calibration: int = DEFAULT_CALIBRATION, *,
             data_dir: str | None = None, label: str | None = None) -> RunRecord:
    """The int8 model of a trained run (`fp32` is that run's ONNX export), as a run of its own."""
    opset = fp32.config["deploy"]["opset"]
    check_opset(opset)
    settings = int8_settings(opset, calibration)
    run_id = deploy_id(source.run_id, settings)
    existing, damaged = made_before(store, run_id)
    if existing is not None and damaged is None:
        return existing
    dataset = dataset_of(source.config, data_dir)
    calib = calibration_loader(source.config, dataset, calibration)  # checks the count first
    t0 = time.perf_counter()
    loader = evaluation_loader(source.config, dataset)
    files = scratch_dir(store.root)
    try:
        path = files / MODEL_FILE
        fp32_path = model_file(store, fp32)
        quantize_int8(fp32_path, path, images(calib))
        require("onnx").checker.check_model(str(path), full_check=True)
        sess, reference = session(path), session(fp32_path)
        x = first_batch(loader)
        agreement = float((run_logits(sess, x).argmax(1) == run_logits(reference, x).argmax(1)).mean() * 100)
        acc = accuracy(sess, loader)
        base = deploy_info(store.root, fp32.run_id)
        info = {"precision": "int8", **settings, "size_bytes": file_size(path), "flops": base.get("flops"),
                "image_shape": base.get("image_shape"), "top1_agreement_fp32": agreement,
                "check_images": len(x), "fp32_run": fp32.run_id, "fp32_acc": fp32.final_acc}
        measure_new_model(path, files)
        record = keep_made(store, run_id, deploy_config(source, settings),
                           label or f"{source.label or source.run_id} | onnx int8", files, info, acc,
                           time.perf_counter() - t0, rebuilding=damaged, params=fp32.params,
                           paper_params=fp32.paper_params, device=cpu_model(), versions=deploy_versions())
    except BaseException:
        shutil.rmtree(files, ignore_errors=True)
        raise
    return record


def qat_run(store: Store, source: RunRecord, *, epochs: int, lr: float, overrides: dict[str, Any] | None = None,
            data_dir: str | None = None, quiet: bool = True, silent: bool = False) -> RunRecord:
    """Quantization-aware fine-tuning of a finished run, distilled from that run in fp32 (method `qat`):
    a run of the training loop like any other."""
    from kdlab.deploy.prune import check_trained
    from kdlab.training import execute

    check_trained(source)
    changes = {"model_args": model_args(source.config, store.root), "method": "qat", "method_args": {},
               "teacher": source.run_id, "teacher_path": str(source.checkpoint), "epochs": epochs, "lr": lr,
               "scheduler": "cosine", "warmup": 0.0, "snapshots": []}
    cfg = derived_config(source, changes, overrides, data_dir)
    return execute(cfg, store.root, teacher_model=load_run_model(source, store.root), quiet=quiet, silent=silent,
                   label=f"{source.label or source.run_id} | qat {epochs} ep")
