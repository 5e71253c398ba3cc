"""Latency: how long one batch takes where the model will run, measured, never assumed.

Protocol: untimed calls first (allocations, ORT's first-run work, cuDNN's choice of kernels):
`WARMUP` of them, or fewer (at least one) once a quarter of `seconds` has gone; then timed calls
until at least `MIN_RUNS` calls and `seconds` of wall time. The median and the 90th percentile
of the per-call times are reported, and throughput = batch / median.
ONNX Runtime runs on the CPU with `threads` intra-op threads; PyTorch eager runs with
`torch.set_num_threads(threads)` on the CPU, and on the GPU where there is one (each call
synchronised). Every measurement names the CPU (its model name and how many cores it has).

One place for a model's figures, whatever name it was measured by: ONNX Runtime figures go to the
latency.json of the ONNX run whose file was timed (the one the deployment table reads), whether it
was named by that run's id, by the trained run it was exported from (whose export is made then if
it has none), or by a file path (a copy of a run's model, recognised by its sha256); PyTorch
figures of a trained run go to that run's own folder, `RUNS/deploy/<trained run>/latency.json`.
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

from kdlab.deploy.runs import (
    DEPLOY_DIR,
    INFO_FILE,
    LATENCY_FILE,
    MODEL_FILE,
    artifact_dir,
    read_json,
    save_latency,
)
from kdlab.deploy.runtime import session
from kdlab.digests import file_sha256
from kdlab.errors import UserError, warn

WARMUP = 10
MIN_RUNS = 10
SECONDS = 1.0
# Measured once when a model is made (ONNX Runtime, one thread), for the deployment table;
# `kdlab latency` measures more settings.
ON_CREATION_BATCHES = (1, 64)
ON_CREATION_SECONDS = 0.5
RUNTIMES = ("onnxruntime", "torch")


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


def parse_runtimes(text: str | None) -> set[str] | None:
    """--runtime: a set of runtimes, or None when not given (what suits the model measured)."""
    if text is None:
        return None
    runtimes = {t.strip() for t in text.split(",") if t.strip()}
    if not runtimes or not runtimes <= set(RUNTIMES):
        raise UserError(f"--runtime takes onnxruntime and/or torch, got {text!r}")
    return runtimes


def check_onnx_only(runtimes: set[str] | None, what: str, source: str) -> None:
    """PyTorch eager times the trained model, which an ONNX file is not: asked of one, it is refused."""
    if runtimes is not None and "torch" in runtimes:
        raise UserError(f"--runtime torch times a trained run in PyTorch, and {what} is an ONNX model: give {source} "
                        "for PyTorch, or --runtime onnxruntime")


def measure_file(path: Path, runs_dir: Path, batches: list[int], threads: list[int], runtimes: set[str] | None,
                 seconds: float) -> tuple[str, list[dict[str, Any]]]:
    """`kdlab latency FILE`: ONNX Runtime; kept with the run of `runs_dir` whose model the file is, if any."""
    check_onnx_only(runtimes, str(path), "the trained run it came from")
    entries = onnx_latency(path, batches, threads, seconds)
    home = run_of_file(path, runs_dir)
    if home is None:
        return str(path), entries
    try:
        save_latency(artifact_dir(runs_dir, home), entries)
    except OSError as e:
        warn(f"these figures are not kept with run {home} ({e.strerror}: {e.filename})")
    return f"{path} (the ONNX model of run {home})", entries


def run_of_file(path: Path, runs_dir: Path) -> str | None:
    """The deployment run of `runs_dir` whose model `path` is, by its content's sha256; None if none is."""
    folder = Path(runs_dir) / DEPLOY_DIR
    if not folder.is_dir():
        return None
    digest = None
    for run in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        recorded = (read_json(run / INFO_FILE, {}).get("files") or {}).get(MODEL_FILE)
        if recorded and recorded == (digest := digest or file_sha256(path)):
            return run.name
    return None


def measure_new_model(path: Path, folder: Path) -> None:
    """The first measurements of a model just made, saved with its files in `folder`."""
    save_latency(folder, onnx_latency(path, list(ON_CREATION_BATCHES), [1], ON_CREATION_SECONDS))


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
