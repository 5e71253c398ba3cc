"""Latency: how long one batch takes where the model will run, measured, never assumed.

Protocol: untimed calls first (allocations, ORT's first-run work, cuDNN's choice of kernels):
`WARMUP` of them, or fewer (at least one) once a quarter of `seconds` has gone; then timed calls
until at least `MIN_RUNS` calls and `seconds` of wall time. The median and the 90th percentile
of the per-call times are reported, and throughput = batch / median.
ONNX Runtime runs on the CPU with `threads` intra-op threads; PyTorch eager runs with
`torch.set_num_threads(threads)` on the CPU, and on the GPU where there is one (each call
synchronised). Every measurement names the CPU (its model name and how many cores it has).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdlab.deploy.runs import LATENCY_FILE, artifact_dir, read_json, write_json
from kdlab.deploy.runtime import session
from kdlab.errors import UserError

WARMUP = 10
MIN_RUNS = 10
SECONDS = 1.0
# Measured once when a model is made (ONNX Runtime, one thread), for the deployment table;
# `kdlab latency` measures more settings.
ON_CREATION_BATCHES = (1, 64)
ON_CREATION_SECONDS = 0.5


def cpu_model() -> str:
    """The CPU's model name (e.g. 'AMD EPYC 9654 96-Core Processor') and its logical core count."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def parse_counts(text: str, flag: str) -> list[int]:
    """'1,64' -> [1, 64]; 'all' stands for every logical core (for --threads)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        value = (os.cpu_count() or 1) if part == "all" else part
        try:
            number = int(value)
        except ValueError:
            raise UserError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
        if number < 1:
            raise UserError(f"{flag} values must be >= 1, got {number}")
        out.append(number)
    if not out:
        raise UserError(f"{flag} needs at least one number")
    return out


def _time(call: Callable[[], Any], seconds: float, sync: Callable[[], None] = lambda: None) -> dict[str, Any]:
    start, warm = time.perf_counter(), 0
    while warm < WARMUP and (warm == 0 or time.perf_counter() - start < seconds / 4):
        call()
        sync()
        warm += 1
    times = []
    start = time.perf_counter()
    while len(times) < MIN_RUNS or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"median_ms": median * 1e3, "p90_ms": float(np.percentile(times, 90)) * 1e3, "runs": len(times),
            "warmup": warm}


def _entry(runtime: str, device: str, batch: int, threads: int | None, timing: dict[str, Any]) -> dict[str, Any]:
    return {"runtime": runtime, "device": device, "cpu": cpu_model(), "batch": batch, "threads": threads,
            **timing, "throughput": batch / (timing["median_ms"] / 1e3),
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def onnx_latency(path: Path, batches: list[int], threads: list[int], seconds: float = SECONDS) -> list[dict[str, Any]]:
    """ONNX Runtime on the CPU, for every (batch, threads) pair."""
    out = []
    for t in threads:
        sess = session(path, threads=t)
        shape = sess.get_inputs()[0].shape[1:]
        if not all(isinstance(d, int) for d in shape):
            raise UserError(f"{path}: its input shape {shape} is not fixed apart from the batch")
        name = sess.get_inputs()[0].name
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)
            out.append(_entry("onnxruntime", "cpu", b, t, _time(partial(sess.run, None, {name: x}), seconds)))
    return out


def torch_latency(model: nn.Module, image_shape: tuple[int, ...], batches: list[int], threads: list[int],
                  seconds: float = SECONDS) -> list[dict[str, Any]]:
    """PyTorch eager fp32: on the CPU for every (batch, threads) pair, and on the GPU where present."""
    model = model.eval()
    out = []
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for b in batches:
                x = torch.randn(b, *image_shape)
                with torch.inference_mode():
                    out.append(_entry("torch-eager", "cpu", b, t, _time(partial(model, x), seconds)))
    finally:
        torch.set_num_threads(before)
    if torch.cuda.is_available():
        gpu = model.to("cuda")
        for b in batches:
            x = torch.randn(b, *image_shape, device="cuda")
            with torch.inference_mode():
                timing = _time(partial(gpu, x), seconds, torch.cuda.synchronize)
            out.append(_entry("torch-eager", torch.cuda.get_device_name(), b, None, timing))
        model.to("cpu")
    return out


def measure_new_model(path: Path, folder: Path) -> None:
    """The first measurements of a model just made, saved with its files in `folder`."""
    save_latency(folder, onnx_latency(path, list(ON_CREATION_BATCHES), [1], ON_CREATION_SECONDS))


def save_latency(folder: Path, entries: list[dict[str, Any]]) -> None:
    """Add measurements to the latency.json in a run's folder, replacing older ones of the same setting and CPU."""
    path = folder / LATENCY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ("runtime", "device", "cpu", "batch", "threads")
    new = {tuple(e[k] for k in key) for e in entries}
    kept = [e for e in read_json(path, []) if tuple(e.get(k) for k in key) not in new]
    write_json(path, kept + entries)


def load_latency(root: Path, run_id: str) -> list[dict[str, Any]]:
    return read_json(artifact_dir(root, run_id) / LATENCY_FILE, [])


def format_latency(entries: list[dict[str, Any]]) -> str:
    """A plain-text table of measurements."""
    lines = [f"{'runtime':<12} {'device':<8} {'batch':>5} {'threads':>7} {'median ms':>10} {'p90 ms':>9} "
             f"{'images/s':>10}"]
    for e in entries:
        threads = "-" if e["threads"] is None else str(e["threads"])
        device = "cpu" if e["device"] == "cpu" else "gpu"
        lines.append(f"{e['runtime']:<12} {device:<8} {e['batch']:>5} {threads:>7} {e['median_ms']:>10.3f} "
                     f"{e['p90_ms']:>9.3f} {e['throughput']:>10.1f}")
    cpus = sorted({e["cpu"] for e in entries})
    gpus = sorted({e["device"] for e in entries if e["device"] != "cpu"})
    lines.append(f"CPU: {'; '.join(cpus)}" + (f"; GPU: {'; '.join(gpus)}" if gpus else ""))
    return "\n".join(lines)
