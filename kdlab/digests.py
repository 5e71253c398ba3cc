"""sha256 digests of what kdlab writes, so that a file damaged after it was written is caught when read.

A file that was cut short usually fails to load, but one with a changed byte often loads as if
nothing happened (torch.load does not check its zip's CRCs; an ONNX file with one weight changed
is still a valid model). So every file a run produces carries a digest recorded when it was
written: a deployment run's files in its `deploy.json`, a checkpoint inside itself (a digest of
its content, the one place that is written atomically with it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks (ONNX files and checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(obj: Any) -> str:
    """sha256 of a nested state (dicts, lists, tuples, tensors, plain values): the same content gives
    the same digest before torch.save and after torch.load, whatever the file's byte layout."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"V{obj!r}".encode())
