"""Benchmarks of the training engine, as ratios against a baseline run in the same process.

* throughput: images/s of a plain eager loop (bf16 autocast + channels_last on a GPU, the loop the
  figures in DESIGN.md came from) against kdlab's engine with a preset's settings, per model, the
  one-off cost of warming up and capturing (or compiling) the engine's step, and the share of the
  device's bf16 peak the engine reaches (FLOPs counted by torch's FlopCounterMode);
* kd_overhead: time per step and peak memory of a KD step against the same student trained alone,
  for every teacher/student pair; and per teacher, its students distilled side by side (one teacher
  forward per batch, as the grid trains them) against the same students trained alone side by side
  and against the sum of each alone.

Both drive the real engine (`kdlab.engine.Engine`, on jobs made by `kdlab.job.make_job`), not a copy of it.
Results are written as JSON with the device's name and library versions; nothing here is a test.
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

from kdlab.config import PRESET_WIDTHS, Config
from kdlab.configure import build_config
from kdlab.data.datasets import Dataset, Split
from kdlab.device import device_name, resolve_device, versions
from kdlab.engine import Engine
from kdlab.graphs import WARMUP_CALLS
from kdlab.job import engine_device, make_job, prepare_teacher
from kdlab.loop import build_loaders, lr_factor
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


def _time_steps(step: Callable[[int], None], device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step after `warmup` steps, seconds the warm-up steps took): compilation,
    autotuning, graph capture and caches happen in the warm-up."""
    _sync(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(device)
    t1 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    return (time.perf_counter() - t1) / steps, t1 - t0


def eager_baseline(cfg: Config, dataset: Dataset, warmup: int, steps: int) -> float:
    """Seconds per step of the plain loop: eager model, autocast and channels_last as cfg says,
    torch's default SGD, batches made on the device. The yardstick the engine is measured against."""
    device, fmt = engine_device(cfg)  # the engine's device, threads and format, so the two compare fairly
    model = create_model(cfg.model, cfg.width, dataset.num_classes).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, dataset.num_classes, (cfg.batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def step(_: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=cfg.precision in ("bf16", "fp16")):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return _time_steps(step, device, warmup, steps)[0]


def group_step_time(cfgs: list[Config], dataset: Dataset, warmup: int, steps: int,
                    teacher: Teacher | None = None) -> dict[str, Any]:
    """Runs trained side by side on one loader through the engine (a shared teacher runs once per
    batch), as the grid trains them: seconds per step of the whole group, seconds of warm-up
    (capture and compilation included, beyond what the same steps cost warm), peak device memory."""
    device = resolve_device(cfgs[0].device)
    train, test = build_loaders(cfgs[0], dataset, device)
    jobs = [make_job(cfg, dataset, teacher=teacher if cfg.method != "ce" else None, label="bench", device=device)
            for cfg in cfgs]
    engine = Engine(jobs, train, test, device, cfgs[0].precision)
    engine.start_epoch(jobs, 0)
    n = len(train)
    state: dict[str, Any] = {"it": train.epoch(0), "epoch": 0}

    def step(i: int) -> None:
        try:
            batch = next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = train.epoch(state["epoch"])
            batch = next(state["it"])
        engine.step(jobs, batch, [c.lr * lr_factor(c, 0, i % n, n) for c in cfgs])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The first steps warm up and capture the graphs: time them apart from the steady state.
    warmup = max(warmup, WARMUP_CALLS + 1)
    seconds, warm_s = _time_steps(step, device, warmup, steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    fallbacks = [engine.state(j).train_step.fallback for j in jobs if engine.state(j).train_step.fallback]
    graphed = engine.graphs and not fallbacks
    engine.close()
    return {"step_s": seconds, "compile_s": max(0.0, warm_s - warmup * seconds), "peak_mem_bytes": peak,
            "graphs": graphed, "fallbacks": fallbacks}


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
    """Engine vs plain eager loop, images/s, per model at the preset's teacher and student widths,
    with the engine's one-off warm-up cost (compile_s) beside its speed."""
    dataset = random_dataset()
    rows = []
    for model in models:
        for width in PRESET_WIDTHS[preset]:
            cfg = build_config(preset, model, overrides={"width": width, "dataset": "random", **(overrides or {})})
            base = eager_baseline(cfg, dataset, warmup, steps)
            engine = group_step_time([cfg], dataset, warmup, steps)
            fast = engine["step_s"]
            flops = train_flops(cfg)
            device = device_name(resolve_device(cfg.device))
            top = peak_tflops(device)
            rows.append({"model": model, "width": width, "batch_size": cfg.batch_size,
                         "eager_img_s": cfg.batch_size / base, "engine_img_s": cfg.batch_size / fast,
                         "speedup": base / fast, "compile_s": engine["compile_s"], "compile": cfg.compile,
                         "graphs": engine["graphs"], "fallbacks": engine["fallbacks"], "precision": cfg.precision,
                         "train_tflops": flops / fast / 1e12,
                         "share_of_bf16_peak": (flops / fast / 1e12 / top) if top else None,
                         "peak_mem_bytes": engine["peak_mem_bytes"]})
    return rows


def kd_overhead(teachers: list[str], students: list[str], preset: str = "fast", warmup: int = 20, steps: int = 50,
                overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per pair: seconds per step of the student alone and distilled (one run, its own teacher
    forward). Per teacher: all its students distilled side by side sharing one teacher forward,
    against the same students trained alone side by side (`ratio`, the grid's way both ways) and
    against the sum of each trained alone (`ratio_vs_each_alone`)."""
    dataset = random_dataset()
    t_width, s_width = PRESET_WIDTHS[preset]
    extra = {"width": s_width, "dataset": "random", **(overrides or {})}
    alone_cfgs = {s: build_config(preset, s, overrides=extra) for s in students}
    alone = {s: group_step_time([c], dataset, warmup, steps) for s, c in alone_cfgs.items()}
    alone_together = group_step_time(list(alone_cfgs.values()), dataset, warmup, steps)
    rows = []
    for t in teachers:
        teacher = _bench_teacher(t, t_width, alone_cfgs[students[0]])
        kd_cfgs = [replace(alone_cfgs[s], method="kd", teacher="bench") for s in students]
        for s, kd_cfg in zip(students, kd_cfgs, strict=True):
            kd = group_step_time([kd_cfg], dataset, warmup, steps, teacher)
            rows.append({"teacher": t, "student": s, "alone_step_s": alone[s]["step_s"], "kd_step_s": kd["step_s"],
                         "ratio": kd["step_s"] / alone[s]["step_s"],
                         "alone_peak_mem_bytes": alone[s]["peak_mem_bytes"], "kd_peak_mem_bytes": kd["peak_mem_bytes"]})
        shared = group_step_time(kd_cfgs, dataset, warmup, steps, teacher)
        each_alone = sum(alone[s]["step_s"] for s in students)
        rows.append({"teacher": t, "student": "+".join(students), "alone_step_s": alone_together["step_s"],
                     "kd_step_s": shared["step_s"], "ratio": shared["step_s"] / alone_together["step_s"],
                     "each_alone_step_s": each_alone, "ratio_vs_each_alone": shared["step_s"] / each_alone,
                     "alone_peak_mem_bytes": alone_together["peak_mem_bytes"],
                     "kd_peak_mem_bytes": shared["peak_mem_bytes"], "shared_teacher": True})
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
                     f"{'compile s':>11}{'bf16 share':>11}")
        for r in results["throughput"]:
            share = f"{r['share_of_bf16_peak']:.1%}" if r["share_of_bf16_peak"] is not None else "-"
            lines.append(f"{r['model']:<20}{r['width']:>6g}{r['eager_img_s']:>13,.0f}{r['engine_img_s']:>14,.0f}"
                         f"{r['speedup']:>8.2f}x{r['compile_s']:>11.1f}{share:>11}")
    if results.get("kd_overhead"):
        lines.append(f"{'student':<20}{'teacher':<20}{'alone ms':>10}{'kd ms':>10}{'kd/alone':>10}")
        for r in results["kd_overhead"]:
            lines.append(f"{r['student']:<20}{r['teacher']:<20}{r['alone_step_s'] * 1e3:>10.2f}"
                         f"{r['kd_step_s'] * 1e3:>10.2f}{r['ratio']:>9.2f}x")
    return "\n".join(lines)
