"""The comparison's KD job through torchdistill 1.1.5's documented pipeline (torchdistill_check.py's part).

The recipe comes from a resolved kdlab Config and is written into torchdistill_kd.yaml, which
torchdistill's own `yaml_util` reads (building the datasets); the models come from its registry, the
training from its `DistillationBox`, driven by the epoch loop of its example
`examples/torchvision/image_classification.py`: per epoch pre_epoch_process, per batch forward_process and
post_forward_process, then evaluation, a checkpoint when the accuracy improved, post_epoch_process.

Needs torchdistill (and torchvision), which kdlab does not depend on.
"""

from __future__ import annotations

import string
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchdistill
from torch.backends import cudnn
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies, load_ckpt, save_ckpt, set_seed
from torchdistill.core.distillation import get_distillation_box
from torchdistill.models.registry import get_model

from kdlab.config import Config
from kdlab.data import load_dataset
from kdlab.data.loader import channel_stats
from kdlab.device import resolve_device
from kdlab.teacher_lookup import load_teacher

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "torchdistill_kd.yaml"


def write_config(cfg: Config, model: str, widths: list[float], sizes: tuple[int, int], teacher: str, work: Path,
                 workers: int, persistent_workers: bool) -> tuple[Path, dict[str, Any]]:
    """torchdistill_kd.yaml filled from the recipe (`sizes`: the training and test images used), in `work`,
    with the teacher in torchdistill's checkpoint layout beside it. Returns the file and the values put in."""
    if cfg.scheduler != "onecycle":
        raise SystemExit(f"the torchdistill config expresses kdlab's onecycle schedule only, not {cfg.scheduler!r}")
    n_train, n_test = sizes
    mean, std = channel_stats(load_dataset(cfg.dataset, cfg.data_dir).train.images)  # as kdlab normalises
    teacher_ckpt = work / "teacher-torchdistill.pt"
    torch.save({"model": load_teacher(teacher, work).model.state_dict()}, teacher_ckpt)
    values = {
        "data_dir": str(Path(cfg.data_dir).resolve()), "train_images": n_train, "test_images": n_test,
        "mean": mean, "std": std, "teacher": model, "student": model, "teacher_width": widths[0],
        "student_width": widths[1], "channels_last": cfg.channels_last, "teacher_ckpt": str(teacher_ckpt),
        "student_ckpt": str(work / "student-torchdistill.pt"), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "eval_batch_size": cfg.eval_batch_size, "workers": workers,
        "persistent_workers": workers > 0 and persistent_workers,
        "forward_proc": "forward_batch_only_bf16" if cfg.precision == "bf16" else "forward_batch_only",
        "lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov, "weight_decay": cfg.weight_decay,
        "total_steps": n_train // cfg.batch_size * cfg.epochs, "warmup": cfg.warmup,
        "temperature": cfg.temperature, "alpha": cfg.alpha, "label_smoothing": cfg.label_smoothing,
    }
    path = work / TEMPLATE.name
    path.write_text(string.Template(TEMPLATE.read_text()).substitute({k: yaml_value(v) for k, v in values.items()}))
    return path, values


def run_torchdistill(cfg: Config, config_path: Path) -> dict[str, Any]:
    """Train the job the filled config describes; every figure the comparison reads."""
    device = resolve_device(cfg.device)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    sys.path.insert(0, str(HERE))  # where the config's dependency, torchdistill_kdlab, lives
    if device.type == "cuda":
        cudnn.benchmark = True  # what its example does unless told -disable_cudnn_benchmark
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    set_seed(cfg.seed)
    config = yaml_util.load_yaml_file(str(config_path))
    import_dependencies(config.get("dependencies"))
    models = {}
    for role in ("teacher_model", "student_model"):
        model_config = config["models"][role]
        model = get_model(model_config["key"], **model_config["kwargs"])
        load_ckpt(model_config.get("src_ckpt"), model=model, strict=True)
        models[role] = model.to(device)
    # torchdistill's default pre-epoch process leaves the teacher's mode alone: without this its BatchNorm
    # would run on batch statistics, unlike kdlab's teacher.
    models["teacher_model"].eval()
    box = get_distillation_box(models["teacher_model"], models["student_model"], config["datasets"],
                               config["train"], device, None, False, 1)
    precision = torch.bfloat16 if cfg.precision == "bf16" else None
    student_ckpt = config["models"]["student_model"]["dst_ckpt"]
    epochs, best = [], 0.0
    for epoch in range(box.num_epochs):
        start = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        loss_sum, steps = torch.zeros((), device=device), 0
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            loss_sum += loss.detach()
            steps += 1
        train_loss = float(loss_sum) / max(1, steps)  # waits for the device: the epoch's training ends here
        trained = time.perf_counter()
        acc = evaluate(box.student_model, box.val_data_loader, device, precision)
        evaluated = time.perf_counter()
        if acc > best:  # the example keeps the best checkpoint
            best = acc
            save_ckpt(box.student_model, box.optimizer, box.lr_scheduler, best, None, student_ckpt)
        box.post_epoch_process()
        end = time.perf_counter()
        # time_s as kdlab records an epoch's: training and evaluation; the checkpoint is charged to the run.
        epochs.append({"epoch": epoch + 1, "time_s": evaluated - start, "train_s": trained - start,
                       "eval_s": evaluated - trained, "checkpoint_s": end - evaluated, "test_acc": acc,
                       "train_loss": train_loss, "steps": steps})
        print(f"torchdistill epoch {epoch + 1}/{box.num_epochs} loss {train_loss:.4f} test {acc:.2f}% "
              f"{steps * cfg.batch_size / (trained - start):,.0f} img/s (training) {end - start:.1f}s",
              file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # After the clock: the teacher through torchdistill's pipeline, to be read beside kdlab's figure for it
    # (the same weights, images and normalisation give the same accuracy, up to bf16 rounding).
    teacher_acc = evaluate(box.teacher_model, box.val_data_loader, device, precision)
    box.clean_modules()
    return {"wall_s": wall, "epochs": epochs, "final_acc": epochs[-1]["test_acc"], "best_acc": best,
            "teacher_acc": teacher_acc, "train_images_per_epoch": len(box.train_data_loader) * cfg.batch_size,
            "peak_mem_bytes": peak, "torchdistill": torchdistill.__version__}


def evaluate(model: torch.nn.Module, loader: Any, device: torch.device, precision: torch.dtype | None) -> float:
    """Top-1 accuracy (percent) of `model` over a loader, in eval mode, one wait at the end."""
    model.eval()
    correct, total = torch.zeros((), device=device, dtype=torch.long), 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=precision or torch.float32,
                                                enabled=precision is not None):
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            correct += (model(images).argmax(1) == targets).sum()
            total += len(targets)
    return float(correct) / total * 100


def yaml_value(value: Any) -> str:
    """A Python value as YAML inside the template (where strings are already quoted)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(float(v)) for v in value) + "]"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        # YAML 1.1 (PyYAML) reads 5e-04 as a string: its floats need a dot in the mantissa.
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    return str(value)
