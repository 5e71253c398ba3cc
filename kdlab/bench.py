"""Benchmarks of the training engine, as ratios against a baseline run in the same process.

* throughput: images/s of a plain eager loop (bf16 autocast + channels_last on a GPU, the loop the
  figures in DESIGN.md came from) against kdlab's engine with a preset's settings, per model, and
  the share of the device's bf16 peak the engine reaches (FLOPs counted by torch's FlopCounterMode);
* kd_overhead: time per step and peak memory of a KD step against the same student trained alone,
  for every teacher/student pair, both through kdlab's engine.

Both use the real engine (`kdlab.loop.build` and `kdlab.loop._step`), not a copy of it. Results are
written as JSON with the device's name and library versions; nothing here is a test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdlab.config import PRESET_WIDTHS, Config, build_config
from kdlab.data.datasets import Dataset, Split
from kdlab.device import device_name, resolve_device, versions
from kdlab.loop import Job, build, engine_device, new_sums, prepare_teacher
from kdlab.loop import _step as engine_step
from kdlab.models import create_model
from kdlab.teacher import Teacher

# Dense bf16 peak (TFLOP/s) by device name, for the "share of the card" figure; measured matmul
# rates on this workplace's cards were ~790-800 TFLOP/s, the datasheet says 989 (dense, SXM).
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def random_dataset(n: int = 4096, num_classes: int = 10, seed: int = 0) -> Dataset:
    """Random uint8 images: throughput does not depend on what the pixels show."""
    rng = np.random.default_rng(seed)
    split = Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                  rng.integers(0, num_classes, n).astype(np.int64))
    return Dataset("random", split, split, [str(i) for i in range(num_classes)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[int], None], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` steps (compilation, autotuning and caches stay out of it)."""
    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def eager_baseline(cfg: Config, dataset: Dataset, warmup: int, steps: int) -> float:
    """Seconds per step of the plain loop: eager model, autocast and channels_last as cfg says,
    torch's default SGD, batches made on the device. The yardstick the engine is measured against."""
    device, fmt = engine_device(cfg)  # the engine's device, threads and format, so the two compare fairly
    model = create_model(cfg.model, cfg.width, dataset.num_classes).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, dataset.num_classes, (cfg.batch_size,), device=device)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32

    def step(_: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=cfg.precision == "bf16"):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _time_steps(step, device, warmup, steps)


def engine_step_time(cfg: Config, dataset: Dataset, warmup: int, steps: int,
                     teacher: Teacher | None = None) -> tuple[float, int | None]:
    """Seconds per step of kdlab's engine for cfg (data made on the device included), and peak
    device memory in bytes (None on a CPU)."""
    return group_step_time([cfg], dataset, warmup, steps, teacher)


def group_step_time(cfgs: list[Config], dataset: Dataset, warmup: int, steps: int,
                    teacher: Teacher | None = None) -> tuple[float, int | None]:
    """Seconds per step of runs trained side by side on one loader (a shared teacher runs once per
    batch), as the grid trains a teacher's students; and peak device memory."""
    from kdlab.timing import SegmentTimer

    device = resolve_device(cfgs[0].device)
    jobs = []
    for cfg in cfgs:
        job = Job(cfg, cfg.run_hash(), teacher if cfg.method != "ce" else None, "bench")
        loaders = (jobs[0].s.train_loader, jobs[0].s.test_loader) if jobs else None
        job.s = build(cfg, dataset, teacher.model if teacher else None, loaders)
        job.timer = SegmentTimer(device)
        job.s.method.start_epoch(0)
        job.sums = new_sums(device)
        jobs.append(job)
    loader = jobs[0].s.train_loader
    n = len(loader)
    state: dict[str, Any] = {"it": loader.epoch(0), "epoch": 0}

    def step(i: int) -> None:
        try:
            batch = next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = loader.epoch(state["epoch"])
            batch = next(state["it"])
        for job in jobs:
            engine_step(job, batch, 0, i % n, n)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _time_steps(step, device, warmup, steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak


def train_flops(cfg: Config, num_classes: int = 10) -> float:
    """FLOPs of one training step (forward and backward) of cfg's model at its batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(cfg.model, cfg.width, num_classes)
    x = torch.randn(cfg.batch_size, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def throughput(models: list[str], preset: str = "fast", warmup: int = 20, steps: int = 50,
               overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Engine vs plain eager loop, images/s, per model at the preset's teacher and student widths."""
    dataset = random_dataset()
    rows = []
    for model in models:
        for width in PRESET_WIDTHS[preset]:
            cfg = build_config(preset, model, overrides={"width": width, "dataset": "random", **(overrides or {})})
            base = eager_baseline(cfg, dataset, warmup, steps)
            fast, peak = engine_step_time(cfg, dataset, warmup, steps)
            flops = train_flops(cfg)
            device = device_name(resolve_device(cfg.device))
            top = peak_tflops(device)
            rows.append({"model": model, "width": width, "batch_size": cfg.batch_size,
                         "eager_img_s": cfg.batch_size / base, "engine_img_s": cfg.batch_size / fast,
                         "speedup": base / fast, "compile": cfg.compile, "precision": cfg.precision,
                         "train_tflops": flops / fast / 1e12,
                         "share_of_bf16_peak": (flops / fast / 1e12 / top) if top else None,
                         "peak_mem_bytes": peak})
    return rows


def kd_overhead(teachers: list[str], students: list[str], preset: str = "fast", warmup: int = 20, steps: int = 50,
                overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per pair: seconds per step of the student alone and distilled (one run, its own teacher
    forward); per teacher: all its students side by side sharing one teacher forward, against the
    sum of the same students alone (the grid's way)."""
    dataset = random_dataset()
    t_width, s_width = PRESET_WIDTHS[preset]
    extra = {"width": s_width, "dataset": "random", **(overrides or {})}
    alone_cfgs = {s: build_config(preset, s, overrides=extra) for s in students}
    alone = {s: engine_step_time(c, dataset, warmup, steps) for s, c in alone_cfgs.items()}
    rows = []
    for t in teachers:
        teacher = _bench_teacher(t, t_width, alone_cfgs[students[0]])
        kd_cfgs = [replace(alone_cfgs[s], method="kd", teacher="bench") for s in students]
        for s, kd_cfg in zip(students, kd_cfgs, strict=True):
            kd, kd_mem = engine_step_time(kd_cfg, dataset, warmup, steps, teacher)
            rows.append({"teacher": t, "student": s, "alone_step_s": alone[s][0], "kd_step_s": kd,
                         "ratio": kd / alone[s][0], "alone_peak_mem_bytes": alone[s][1], "kd_peak_mem_bytes": kd_mem})
        shared, shared_mem = group_step_time(kd_cfgs, dataset, warmup, steps, teacher)
        total_alone = sum(alone[s][0] for s in students)
        rows.append({"teacher": t, "student": "+".join(students), "alone_step_s": total_alone, "kd_step_s": shared,
                     "ratio": shared / total_alone, "alone_peak_mem_bytes": None, "kd_peak_mem_bytes": shared_mem,
                     "shared_teacher": True})
    return rows


def _bench_teacher(name: str, width: float, cfg: Config) -> Teacher:
    return prepare_teacher(create_model(name, width), cfg)


def environment() -> dict[str, Any]:
    device = resolve_device("auto")
    return {"device": device_name(device), "versions": versions(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    """benchmarks/results/<device>-<date>.json, never overwriting an earlier file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() else "_" for c in results["environment"]["device"])[:40].strip("_")
    path = out_dir / f"{stem}-{results['environment']['date'][:19].replace(':', '')}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def format_table(results: dict[str, Any]) -> str:
    lines = [f"device: {results['environment']['device']}  torch {results['environment']['versions']['torch']}"]
    if results.get("throughput"):
        lines.append(f"{'model':<20}{'width':>6}{'eager img/s':>13}{'engine img/s':>14}{'speedup':>9}"
                     f"{'bf16 share':>11}")
        for r in results["throughput"]:
            share = f"{r['share_of_bf16_peak']:.1%}" if r["share_of_bf16_peak"] is not None else "-"
            lines.append(f"{r['model']:<20}{r['width']:>6g}{r['eager_img_s']:>13,.0f}{r['engine_img_s']:>14,.0f}"
                         f"{r['speedup']:>8.2f}x{share:>11}")
    if results.get("kd_overhead"):
        lines.append(f"{'student':<20}{'teacher':<20}{'alone ms':>10}{'kd ms':>10}{'kd/alone':>10}")
        for r in results["kd_overhead"]:
            lines.append(f"{r['student']:<20}{r['teacher']:<20}{r['alone_step_s'] * 1e3:>10.2f}"
                         f"{r['kd_step_s'] * 1e3:>10.2f}{r['ratio']:>9.2f}x")
    return "\n".join(lines)
