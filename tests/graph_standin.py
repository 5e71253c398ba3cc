"""A CPU stand-in for CUDA graphs, so that what a capture and its replays do can be tested without a GPU.

A real capture records kernels without running them and refuses any op that waits for the device;
a replay runs the recorded kernels again on the same memory, whatever the Python code would do
now. The stand-in does the same with aten ops:

- capture records every op (under a `TorchDispatchMode`) with the tensors it read and wrote. Ops
  that write run on copies of what they write, so that nothing changes (as nothing runs in a real
  capture); ops that read a device value on the host or have a data-dependent shape raise, as they
  do when a CUDA stream is capturing;
- replay runs the recorded ops again on the recorded tensors, and copies each result into the
  tensor the capture produced (a graph's output memory is fixed). A Python number baked in at
  capture time, or a tensor replaced since (a new teacher output), is replayed stale, as on a GPU.

`install(monkeypatch)` puts it behind `kdlab.graphs` (streams become plain in-order execution).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from kdlab import graphs

aten = torch.ops.aten
_SHAPE_OK_WITH_INTEGER_INDICES = (aten.index.Tensor,)  # x[idx] with integer indices: a gather, static shape


def why_not_capturable(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why a CUDA capture would refuse this op (None: it would not): it reads a device value on the
    host, or its output's shape depends on values."""
    name = str(func)
    if "fake_quantize" in name:
        return f"{name} reads its zero point on the host"
    if torch.Tag.data_dependent_output in func.tags:
        return f"{name} reads a device value on the host"
    bool_index = any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                     for t in tree_flatten((args[1:], kwargs))[0]) if func in (
        aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default) else False
    if bool_index:
        return f"{name} with a boolean mask selects through nonzero (a data-dependent shape)"
    if torch.Tag.dynamic_output_shape in func.tags and func not in _SHAPE_OK_WITH_INTEGER_INDICES:
        return f"{name} has a data-dependent output shape"
    if func in (aten.is_nonzero.default, aten.item.default):
        return f"{name} reads a device value on the host"
    return None


class CaptureSpy(TorchDispatchMode):
    """Fails on any op a CUDA capture would refuse; with `tape`, also records the ops (see the module)."""

    def __init__(self, tape: list | None = None):
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = why_not_capturable(func, args, kwargs)
        if reason:
            raise RuntimeError(f"operation not permitted when stream is capturing: {reason}")
        if self.tape is None:
            return func(*args, **kwargs)
        written = _written(func, args, kwargs)
        if not written:
            out = func(*args, **kwargs)
        else:  # run on copies of what the op writes: capturing changes nothing
            copies = {id(t): t.clone() for t in written}
            swap = lambda v: copies.get(id(v), v) if isinstance(v, torch.Tensor) else v  # noqa: E731
            out = func(*tree_map(swap, args), **tree_map(swap, kwargs))
            back = {id(copies[id(t)]): t for t in written}
            out = tree_map(lambda v: back.get(id(v), v) if isinstance(v, torch.Tensor) else v, out)
        self.tape.append((func, args, kwargs, out))
        return out


# Ops that write to inputs their schema does not mark as written: batch norm's running statistics.
_UNMARKED_WRITES = {aten.native_batch_norm.default: (3, 4)}


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an op writes to, by its schema (in-place, out=, and functional ops with mutated inputs)."""
    out = [args[i] for i in _UNMARKED_WRITES.get(func, ()) if i < len(args) and isinstance(args[i], torch.Tensor)]
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class TapeGraph:
    """Stands in for `torch.cuda.CUDAGraph`."""

    live: list[TapeGraph] = []  # every graph not yet reset, for tests of the engine's teardown

    def __init__(self) -> None:
        self.tape: list[tuple[Any, tuple, dict, Any]] = []
        self.replays = 0
        TapeGraph.live.append(self)

    def replay(self) -> None:
        self.replays += 1
        with torch.no_grad():
            for func, args, kwargs, out in self.tape:
                fresh = func(*args, **kwargs)
                for kept, new in zip(tree_flatten(out)[0], tree_flatten(fresh)[0], strict=True):
                    if isinstance(kept, torch.Tensor) and kept is not new and not _same_memory(kept, new):
                        kept.copy_(new)

    def reset(self) -> None:
        self.tape.clear()
        if self in TapeGraph.live:
            TapeGraph.live.remove(self)


_capturing = [False]


@contextmanager
def _capture(graph: TapeGraph, stream: Any):
    _capturing[0] = True
    try:
        with CaptureSpy(graph.tape):
            yield
    finally:
        _capturing[0] = False


def install(monkeypatch) -> None:
    """Make `kdlab.graphs` capture and replay on the CPU with the stand-in."""
    TapeGraph.live.clear()
    monkeypatch.setattr(graphs, "supported", lambda device: True)
    monkeypatch.setattr(graphs, "new_stream", lambda device: None)
    monkeypatch.setattr(graphs, "new_graph", TapeGraph)
    monkeypatch.setattr(graphs, "capture", _capture)
    monkeypatch.setattr(graphs, "capturing", lambda: _capturing[0])
    monkeypatch.setattr(graphs, "synchronize", lambda: None)
    monkeypatch.setattr(graphs, "release_memory", gc.collect)
