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
