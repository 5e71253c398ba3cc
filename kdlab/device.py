"""Which device runs the work, what it is called, and the library versions behind a result."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
import torch

import kdlab
from kdlab.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; anything else must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this machine has no usable CUDA GPU: use --device cpu")
    return device


def device_name(device: torch.device) -> str:
    """A human name for the hardware, stored with every result (e.g. 'NVIDIA H100 80GB HBM3')."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    """Library versions that can change a result."""
    info = {"kdlab": kdlab.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}
    if torch.version.cuda:
        info["cuda"] = torch.version.cuda
    return info


_ANNOUNCED: set[tuple[str, str]] = set()


def auto_precision(device: torch.device, announce: bool = True) -> str:
    """What `precision=auto` means on `device`: bf16 where the hardware has bf16 units (CUDA compute
    capability 8.0 and later: A100, H100...; and the CPU, whose autocast supports it everywhere);
    fp16 with loss scaling on CUDA 7.x (V100, T4: Google Colab's free GPUs), whose tensor cores
    have no bf16; fp32 on older GPUs. Said once per process and device (on stderr)."""
    if device.type != "cuda":
        choice, why = "bf16", "the CPU's autocast"
    else:
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            choice, why = "bf16", f"{name}, compute capability {major}.{minor}"
        elif major == 7:
            choice, why = "fp16", f"{name}, compute capability {major}.{minor}: no bf16 units; losses are scaled"
        else:
            choice, why = "fp32", f"{name}, compute capability {major}.{minor}: no tensor cores"
    if announce and (str(device), choice) not in _ANNOUNCED:
        _ANNOUNCED.add((str(device), choice))
        print(f"kdlab: precision auto: {choice} ({why})", file=sys.stderr)
    return choice
