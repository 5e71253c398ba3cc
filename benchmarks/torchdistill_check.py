#!/usr/bin/env python3
"""kdlab against torchdistill 1.1.5 on the same KD job, in one script (issue 8, target 4).

The job: a resnet18 teacher (kdlab's, trained here with `kdlab.train` unless --teacher names a kdlab
checkpoint) distilled into resnet18 at width 0.5 with Hinton KD, on CIFAR-10 in the official python
layout, with kdlab's `--preset fast` recipe: batch size, epochs, SGD (Nesterov, weight decay), the
one-cycle schedule stepped per batch, T and alpha, random crop (4-pixel pad) + flip, bf16 autocast,
channels_last. Both sides train kdlab's own model definitions on the same images.

* torchdistill (`torchdistill_run.py`): its documented pipeline, the YAML config `torchdistill_kd.yaml`
  (filled from kdlab's preset) read by its `yaml_util`, kdlab's models in its model registry
  (`torchdistill_kdlab.py`), its `DistillationBox` driven by the epoch loop of its example
  `examples/torchvision/image_classification.py`, its DataLoader (workers, pinned memory) and
  torchvision's per-image transforms.
* kdlab: `kdlab.distill(...)` with the preset, in a fresh runs directory.

Each side (and the teacher) runs in a fresh process. Measured per side: wall time (from reading the
config to the last epoch, data loading, compilation and checkpoints included), per-epoch time (training
and the loop's own evaluation, as kdlab records an epoch; checkpoints are charged to the run), training
images/s over the epochs after the first (steady) and over the whole wall time (overall), and the last
epoch's test accuracy on the same test images. The summary prints the ratios (kdlab / torchdistill img/s,
accuracy difference) and one JSON file lands in --out with the device, versions, settings, every figure
and what could not be made identical.

On the GPU machine (torch 2.11, no network) torchdistill travels as its wheel, installed without its
dependencies (see torchdistill_check.sh). Here, in a venv of its own:
    python3 -m venv .tdvenv && . .tdvenv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 \
        PyYAML scipy matplotlib && pip install --no-deps torchdistill==1.1.5 && pip install --no-deps -e .
    python3 benchmarks/torchdistill_check.py --data-dir .data --out /tmp/tdcheck --epochs 2 --train-limit 2000 \
        --test-limit 1000 --set compile=none --set precision=fp32 --set channels_last=false
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdlab.config import Config

HERE = Path(__file__).resolve().parent
SIDES = ("torchdistill", "kdlab")

# What the torchdistill side cannot share with kdlab's engine, stored with every result.
NOT_IDENTICAL = [
    "data pipeline: torchdistill reads PIL images through torchvision transforms in DataLoader workers "
    "(RandomCrop padding 4, RandomHorizontalFlip, ToTensor, Normalize); kdlab keeps the uint8 split on the "
    "device and crops/flips there: the same augmentation family, not the same random draws",
    "batch order and the student's initial weights come from each side's own random streams (same seed)",
    "schedule: torchdistill's OneCycleLR (linear, div_factor 1000, final_div_factor 1e4, per step) for kdlab's "
    "onecycle (linear ramp from lr/1000 over `warmup` of the steps, then linear to zero): equal up to one step",
    "bf16 autocast on the torchdistill side comes from a forward process registered in its registry: its "
    "image-classification pipeline has no mixed-precision setting (its DistillationBox takes a Hugging Face "
    "Accelerator, as its text examples do, but that would leave the frozen teacher in fp32); losses in float32 "
    "on both sides",
    "engine: kdlab runs as its preset says (fast: each step replayed as a CUDA graph, torch.compile as set); "
    "torchdistill has no such setting and runs eager",
    "optimiser: torch.optim.SGD with torch's default implementation (foreach) on torchdistill, fused on kdlab",
    "teacher mode: put in eval mode once by this script (torchdistill's default pre-epoch process leaves the "
    "teacher's mode alone, so its example would run the teacher's BatchNorm in training mode); kdlab: eval mode",
    "DataLoader workers persist across epochs (its samples restart them every epoch: --no-persistent-workers)",
    "no DataParallel wrapper on one device (its samples name one; on one GPU it only adds a scatter per batch)",
    "the example's per-step logging (loss.item(), a host-device wait every step) is left out: it would only "
    "slow torchdistill down; its final test pass (best checkpoint, batch size 1) is replaced by the last "
    "epoch's evaluation, as kdlab reports the last epoch",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON file (default benchmarks/results)")
    p.add_argument("--epochs", type=int, help="epochs of the KD job (default: the preset's, 40 for fast)")
    p.add_argument("--teacher", help="a kdlab checkpoint of the teacher (default: train it here first)")
    p.add_argument("--teacher-epochs", type=int, help="epochs when the teacher is trained here (default --epochs)")
    p.add_argument("--train-limit", type=int, default=0, help="first N training images only (0: all)")
    p.add_argument("--test-limit", type=int, default=0, help="first N test images only (0: all)")
    p.add_argument("--preset", default="fast", help="kdlab preset giving the recipe (default fast)")
    p.add_argument("--model", default="resnet18", help="architecture of teacher and student (default resnet18)")
    p.add_argument("--widths", help="teacher,student widths (default: the preset's, 1,0.5)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="torchdistill DataLoader workers (default min(16, cores): its samples use 16)")
    p.add_argument("--no-persistent-workers", action="store_true",
                   help="restart the DataLoader workers every epoch, as torchdistill's samples do")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a kdlab setting for both sides, e.g. --set compile=none (repeatable)")
    p.add_argument("--sides", default=",".join(SIDES), help="which sides, in this order (default torchdistill,kdlab)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (checkpoints, filled YAML)")
    p.add_argument("--side", choices=("teacher", *SIDES), help=argparse.SUPPRESS)  # a child process's part
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the recipe, shared by every process -------------------------------------------------------------


def recipe(args: argparse.Namespace, role: str = "student") -> tuple[Config, dict[str, Any], list[float]]:
    """The resolved kdlab Config of the student (or teacher) run, the overrides it came from (what kdlab's
    API is given) and the teacher and student widths. The torchdistill side reads its recipe from the Config."""
    from kdlab.api import resolve_config
    from kdlab.commands.options import pairs as _pairs
    from kdlab.config import PRESET_WIDTHS

    widths = [float(w) for w in args.widths.split(",")] if args.widths else list(PRESET_WIDTHS[args.preset])
    epochs = args.teacher_epochs if role == "teacher" and args.teacher_epochs else args.epochs
    overrides = {**_pairs(args.set, "--set"), "dataset": "cifar10", "data_dir": args.data_dir, "epochs": epochs,
                 "train_limit": args.train_limit, "test_limit": args.test_limit,
                 "width": widths[0] if role == "teacher" else widths[1]}
    return resolve_config(args.preset, args.model, None, overrides), overrides, widths


# --- child processes: one part each ------------------------------------------------------------------


def side_teacher(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import kdlab

    cfg, overrides, _ = recipe(args, "teacher")
    rec = kdlab.train(args.model, preset=args.preset, runs_dir=work / "teacher-runs", quiet=True, verbose=True,
                      **overrides)
    return {"checkpoint": rec.checkpoint, "final_acc": rec.final_acc, "wall_s": rec.wall_s, "epochs": cfg.epochs,
            "width": cfg.width, "run_id": rec.run_id}


def side_kdlab(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import kdlab

    cfg, overrides, _ = recipe(args)
    t0 = time.perf_counter()
    rec = kdlab.distill(args.teacher, args.model, preset=args.preset, runs_dir=work / "kdlab-runs", quiet=True,
                        verbose=True, **overrides)
    wall = time.perf_counter() - t0
    if rec.status != "done":
        raise RuntimeError(f"kdlab run {rec.run_id} ended {rec.status}: {rec.error}")
    n_train, _ = split_sizes(cfg)
    epochs = [{"epoch": i + 1, "time_s": h["time_s"], "test_acc": h["test_acc"], "train_loss": h["train_loss"]}
              for i, h in enumerate(rec.history)]
    return {"wall_s": wall, "epochs": epochs, "final_acc": rec.final_acc, "best_acc": rec.best_acc,
            "train_images_per_epoch": n_train // cfg.batch_size * cfg.batch_size, "timing": rec.timing,
            "peak_mem_bytes": rec.peak_mem_bytes, "run_id": rec.run_id}


def side_torchdistill(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from torchdistill_run import run_torchdistill, write_config

    cfg, _, widths = recipe(args)
    # Written before the clock starts, as a user writes the config before running it.
    path, values = write_config(cfg, args.model, widths, split_sizes(cfg), args.teacher, work, args.workers,
                                not args.no_persistent_workers)
    result = run_torchdistill(cfg, path)
    return {**result, "workers": values["workers"], "persistent_workers": values["persistent_workers"],
            "config_yaml": path.read_text()}


def split_sizes(cfg: Config) -> tuple[int, int]:
    """Training and test images the job uses, as kdlab's train_limit and test_limit cut them."""
    from kdlab.data import load_dataset

    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    n_train, n_test = len(dataset.train.labels), len(dataset.test.labels)
    return min(cfg.train_limit or n_train, n_train), min(cfg.test_limit or n_test, n_test)


def environment() -> dict[str, Any]:
    import torch

    from kdlab.device import device_name, resolve_device, versions

    info = versions()
    spec = importlib.util.find_spec("torchvision")
    if spec is not None:
        import torchvision

        info["torchvision"] = torchvision.__version__
    return {"device": device_name(resolve_device("auto")), "versions": info,
            "cpu_cores": os.cpu_count(), "cuda": torch.cuda.is_available()}


def child(args: argparse.Namespace) -> int:
    work = Path(args.work)
    run = {"teacher": side_teacher, "kdlab": side_kdlab, "torchdistill": side_torchdistill}[args.side]
    result = {"side": args.side, **environment(), **run(args, work)}
    (work / f"{args.side}.json").write_text(json.dumps(result, indent=2))
    return 0


# --- the parent: teacher, sides, summary ----------------------------------------------------------------


def spawn(side: str, argv: list[str], work: Path, extra: list[str]) -> tuple[dict[str, Any] | None, float]:
    """Run one part in a fresh process; its result (None if it failed) and its process wall time."""
    t0 = time.perf_counter()
    code = subprocess.call([sys.executable, __file__, *argv, *extra, "--side", side, "--work", str(work)])
    elapsed = time.perf_counter() - t0
    path = work / f"{side}.json"
    if code != 0 or not path.exists():
        print(f"[tdcheck] {side} failed (exit {code}) after {elapsed:.0f}s", file=sys.stderr, flush=True)
        return None, elapsed
    return json.loads(path.read_text()), elapsed


def own_figures(result: dict[str, Any]) -> dict[str, Any]:
    """A part's result without what the whole file already says (its environment, where its files were)."""
    return {k: v for k, v in result.items() if k not in ("side", "versions", "cpu_cores", "cuda", "checkpoint")}


def rates(result: dict[str, Any]) -> dict[str, float]:
    """Images/s: steady (the epochs after the first, each with its loop's evaluation) and overall (every
    trained image over the side's whole wall time)."""
    times = [e["time_s"] for e in result["epochs"]]
    steady = times[1:] or times
    per_epoch = result["train_images_per_epoch"]
    out = {"steady_img_s": per_epoch * len(steady) / sum(steady),
           "overall_img_s": per_epoch * len(times) / result["wall_s"],
           "first_epoch_s": times[0], "steady_epoch_s": sum(steady) / len(steady)}
    if "train_s" in result["epochs"][0]:  # torchdistill: training alone, without evaluation
        train = [e["train_s"] for e in result["epochs"]]
        out["steady_train_only_img_s"] = per_epoch * len(train[1:] or train) / sum(train[1:] or train)
    return out


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    sides = results["runs"]
    for side in sides.values():
        side.update(rates(side))
    if not all(s in sides for s in SIDES):
        return {}
    k, t = sides["kdlab"], sides["torchdistill"]
    ratios = {"steady_img_s": k["steady_img_s"] / t["steady_img_s"],
              "overall_img_s": k["overall_img_s"] / t["overall_img_s"],
              "accuracy_points": k["final_acc"] - t["final_acc"]}
    ratios["target_met_steady"] = ratios["steady_img_s"] >= 5 and ratios["accuracy_points"] >= 0
    ratios["target_met_overall"] = ratios["overall_img_s"] >= 5 and ratios["accuracy_points"] >= 0
    return ratios


def table(results: dict[str, Any]) -> str:
    lines = [f"device: {results['device']}  torch {results['versions'].get('torch')}  "
             f"torchdistill {results['versions'].get('torchdistill', '-')}  epochs {results['settings']['epochs']}  "
             f"train images/epoch {results['settings'].get('train_images_per_epoch', '-')}",
             f"{'side':<14}{'wall s':>9}{'epoch 1 s':>11}{'epoch s':>9}{'img/s steady':>14}{'img/s overall':>15}"
             f"{'final acc':>11}"]
    for name, r in results["runs"].items():
        lines.append(f"{name:<14}{r['wall_s']:>9.1f}{r['first_epoch_s']:>11.2f}{r['steady_epoch_s']:>9.2f}"
                     f"{r['steady_img_s']:>14,.0f}{r['overall_img_s']:>15,.0f}{r['final_acc']:>10.2f}%")
    teacher, through = results.get("teacher", {}), results["runs"].get("torchdistill", {})
    if "final_acc" in teacher and "teacher_acc" in through:  # the same teacher seen through both pipelines
        lines.append(f"teacher ({teacher['epochs']} epochs): {teacher['final_acc']:.2f}% by kdlab, "
                     f"{through['teacher_acc']:.2f}% through torchdistill's data pipeline")
    ratio = results.get("ratios")
    if ratio:
        lines.append(f"kdlab / torchdistill img/s: {ratio['steady_img_s']:.2f}x steady, "
                     f"{ratio['overall_img_s']:.2f}x overall; accuracy kdlab - torchdistill: "
                     f"{ratio['accuracy_points']:+.2f} points")
        lines.append(f"issue 8 target 4 (>= 5x img/s, accuracy >= torchdistill's): steady "
                     f"{'met' if ratio['target_met_steady'] else 'NOT met'}, overall "
                     f"{'met' if ratio['target_met_overall'] else 'NOT met'}")
    return "\n".join(lines)


def result_path(out: Path, device: str, date: str) -> Path:
    slug = "-".join("".join(c.lower() if c.isalnum() else " " for c in device).split())[:40]
    return out / f"{slug}-torchdistill-{date}.json"


def parent(args: argparse.Namespace, argv: list[str]) -> int:
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - set(SIDES)
    if unknown or not sides:
        raise SystemExit(f"--sides takes {', '.join(SIDES)}, got {args.sides!r}")
    if not (Path(args.data_dir) / "cifar-10-batches-py").is_dir():
        raise SystemExit(f"{args.data_dir} has no cifar-10-batches-py/: make it with "
                         "python3 ../shared/datasets/cifar10-jpeg/make_cifar10_batches.py DIR")
    if "torchdistill" in sides and (importlib.util.find_spec("torchdistill") is None
                                    or importlib.util.find_spec("torchvision") is None):
        raise SystemExit("torchdistill (and torchvision) must be importable: see the top of this script")
    if args.teacher and not Path(args.teacher).is_file():
        raise SystemExit(f"--teacher {args.teacher}: no such file")
    cfg, _, widths = recipe(args)  # a bad --set or preset stops here, before anything trains
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tdcheck-"))
    started = datetime.now(timezone.utc)
    results: dict[str, Any] = {
        "stage": "torchdistill", "date": started.isoformat(timespec="seconds"), **environment(),
        "settings": {"preset": args.preset, "model": args.model, "teacher_width": widths[0],
                     "student_width": widths[1], "epochs": cfg.epochs, "train_limit": args.train_limit,
                     "test_limit": args.test_limit, "batch_size": cfg.batch_size, "lr": cfg.lr,
                     "momentum": cfg.momentum, "nesterov": cfg.nesterov, "weight_decay": cfg.weight_decay,
                     "scheduler": cfg.scheduler, "warmup": cfg.warmup, "temperature": cfg.temperature,
                     "alpha": cfg.alpha, "precision": cfg.precision, "channels_last": cfg.channels_last,
                     "compile": cfg.compile, "graphs": cfg.graphs, "seed": cfg.seed,
                     "augment": "random crop (pad 4) + flip",
                     "set": args.set, "workers": args.workers,
                     "persistent_workers": not args.no_persistent_workers},
        "not_identical": NOT_IDENTICAL, "runs": {}, "process_s": {}, "failed": []}
    path = result_path(out, results["device"], started.strftime("%Y%m%dT%H%M%S"))
    t0 = time.perf_counter()
    try:
        teacher = args.teacher
        if not teacher:
            info, elapsed = spawn("teacher", argv, work, [])
            if info is None:
                raise SystemExit("the teacher could not be trained: nothing to compare")
            results["teacher"] = {**own_figures(info), "process_s": elapsed}
            teacher = info["checkpoint"]
        else:
            results["teacher"] = {"checkpoint": str(teacher)}
        for side in sides:
            result, elapsed = spawn(side, argv, work, ["--teacher", teacher])
            results["process_s"][side] = elapsed
            if result is None:
                results["failed"].append(side)
                continue
            if side == "torchdistill":
                results["versions"]["torchdistill"] = result["torchdistill"]
                results["torchdistill_config"] = result.pop("config_yaml")
            results["runs"][side] = own_figures(result)
            results["settings"]["train_images_per_epoch"] = result["train_images_per_epoch"]
            results["ratios"] = summarise(results)
            results["wall_s"] = time.perf_counter() - t0
            path.write_text(json.dumps(results, indent=2))  # after each side: a timeout keeps what was done
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[tdcheck] work folder kept: {work}", file=sys.stderr)
    results["wall_s"] = time.perf_counter() - t0
    path.write_text(json.dumps(results, indent=2))
    if results["runs"]:
        print(table(results))
    print(f"[tdcheck] wrote {path}")
    return 1 if results["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    from kdlab.configure import preset_values
    from kdlab.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.epochs is None:
            args.epochs = preset_values(args.preset, args.model)["epochs"]
            argv += ["--epochs", str(args.epochs)]
        return child(args) if args.side else parent(args, argv)
    except UserError as e:  # a bad --set, preset or model: one line, as kdlab's CLI says it
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
