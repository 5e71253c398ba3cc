"""CUDA graphs: a step run eagerly a few times, then captured once and replayed with one launch.

The small CIFAR models are bound by kernel launches, not by the GPU: a ResNet18 step at half width
is a few hundred small kernels, and the host spends longer launching them than the GPU spends
running them. A captured graph replays all of them with one call. Capturing eager kernels costs
about one step's time (torch.compile's own CUDA graphs cost minutes of compilation first).

What a captured step needs, and how the engine provides it:
- fixed shapes and addresses: batches are copied into fixed buffers (`StaticBatch`), the last
  partial training batch is dropped and the last evaluation batch padded, and a teacher writes its
  outputs into buffers of its own that outlive any one of its graphs (`kdlab.teacher`);
- no host work inside the step: the learning rate is a device tensor read by fused SGD, running
  sums are updated in place on the device, autocast runs without its weight cache, and no op reads
  a device value on the host or has a data-dependent shape (`nonzero`, boolean-mask indexing,
  `.item()`: `tests/graph_standin.py` refuses them on a CPU, as a real capture does on a GPU);
- no host-side state that changes between replays: a method whose Python code depends on the
  epoch (ESKD's stop) says so through `Method.graph_key`, and the step is captured again when the
  key changes; a value that changes (DKD's warm-up, the lr) lives in a device tensor.
Where capture fails anyway (an unsupported kernel), the step falls back to eager execution with
one warning: slower, never wrong.

Every call into CUDA's graph and stream API goes through the small functions below, so that a test
can stand in for them on a CPU (`tests/graph_standin.py` records and replays the ops of a "captured"
step, reading and writing the same tensors as a real graph would).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

WARMUP_CALLS = 2  # eager calls before capture: lazy initialisation, cuDNN autotuning, optimiser state
DDP_WARMUP_CALLS = 11  # DistributedDataParallel builds its buckets over its first steps (PyTorch's CUDA-graph notes)


# ---- the CUDA graph and stream API, in one place --------------------------------------------------


def supported(device: torch.device) -> bool:
    """Whether steps on `device` can be captured as graphs (CUDA only)."""
    return device.type == "cuda"


_FREE_STREAMS: dict[str, list[Any]] = {}


def new_stream(device: torch.device) -> Any:
    """A CUDA stream for one engine's use until it gives it back (`return_stream`). Streams are reused
    by the groups that follow, not created anew for each: the cuBLAS workspace PyTorch keeps for
    every stream that runs a matmul then serves them all, instead of one more per stream per group."""
    free = _FREE_STREAMS.setdefault(str(device), [])
    return free.pop() if free else torch.cuda.Stream(device)


def return_stream(device: torch.device, stream: Any) -> None:
    """Give back a stream of `new_stream` once nothing will run on it (its graphs released)."""
    if stream is not None:
        _FREE_STREAMS.setdefault(str(device), []).append(stream)


def new_graph() -> Any:
    return torch.cuda.CUDAGraph()


def capture(graph: Any, stream: Any) -> AbstractContextManager:
    # thread_local: the checkpoint writer thread may run while a step is captured.
    return torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local")


def capturing() -> bool:
    """Whether this thread is capturing a graph now."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def synchronize() -> None:
    torch.cuda.synchronize()


def release_memory() -> None:
    """Free what released graphs and models held: a cyclic collection first (a step's closures refer
    to their own job), then the allocator's cached blocks, so the next group starts from the baseline."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@contextmanager
def side_stream(stream: Any) -> Iterator[None]:
    """Run on `stream` (a no-op for None), ordered after the work queued so far on the current stream,
    with the current stream waiting for it afterwards."""
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


@contextmanager
def fan_out(streams: list[Any]) -> Iterator[list[AbstractContextManager]]:
    """One stream context per entry: each stream first waits for the work queued so far (the batch,
    the teachers), and the current stream waits for every one of them before the buffers are reused.
    Entries that are None (no graphs) get a plain context: they run in turn on the current stream."""
    if all(s is None for s in streams):
        yield [nullcontext() for _ in streams]
        return
    main = torch.cuda.current_stream()
    ready = main.record_event()
    for s in streams:
        s.wait_event(ready)
    yield [torch.cuda.stream(s) for s in streams]
    for s in streams:
        main.wait_stream(s)


# ---- a step that is captured once and replayed -----------------------------------------------------


class Captured:
    """Calls `fn` (which takes no arguments and reads and writes only fixed tensors): eagerly on a
    CPU or with graphs off; on CUDA eagerly for the first `warmup` calls, then captured into a
    CUDA graph on `stream` and replayed. The warm-up calls run on `stream` too (PyTorch's notes:
    warm up on the side stream the capture uses, so that lazily created per-stream state, such as a
    cuBLAS workspace, belongs to it). `before` runs ahead of every eager call and of the capture,
    never ahead of a replay (e.g. dropping gradients, which the captured backward then allocates in
    the graph's own memory, as in PyTorch's whole-network capture example).

    A graph replaced because `key` changed is kept (`retired`) until `release()`: the outputs it
    allocated may still be read by a graph captured before the change.

    `setup_s` is the wall time spent in warm-up calls and captures (compilation included).
    """

    def __init__(self, fn: Callable[[], Any], device: torch.device, *, enabled: bool, name: str,
                 stream: Any = None, before: Callable[[], None] | None = None, warmup: int = WARMUP_CALLS):
        self.fn, self.name, self.stream, self.before, self.warmup = fn, name, stream, before, warmup
        self.enabled = enabled and supported(device)
        self.graph: Any = None
        self.out: Any = None
        self.retired: list[tuple[Any, Any]] = []
        self.key: Hashable = None
        self.calls = 0
        self.setup_s = 0.0
        self.captures = 0
        self.fallback: str | None = None  # why this step runs eagerly although graphs were asked for

    def __call__(self, key: Hashable = None) -> Any:
        if key != self.key:
            # The step's Python code takes another path now: capture it afresh (one eager call first).
            if self.graph is not None:
                self.retired.append((self.graph, self.out))
            self.key, self.graph, self.out = key, None, None
            self.calls = min(self.calls, self.warmup - 1)
        if not self.enabled:
            return self._eager()
        if self.graph is not None:
            self.graph.replay()
            return self.out
        t0 = time.perf_counter()
        if self.calls < self.warmup:
            with side_stream(self.stream):
                out = self._eager()
        else:
            out = self._capture()
        synchronize()
        self.setup_s += time.perf_counter() - t0
        return out

    def release(self) -> None:
        """Drop the graphs (current and retired), their outputs and the step itself (the end of a group:
        its closures refer to the job's models and optimiser); the step cannot be called again."""
        for graph, _ in [(self.graph, self.out), *self.retired]:
            if graph is not None and hasattr(graph, "reset"):
                graph.reset()
        self.graph = self.out = None
        self.retired.clear()
        self.enabled = False
        self.fn = self.before = None

    def _eager(self) -> Any:
        if self.before is not None:
            self.before()
        self.calls += 1
        return self.fn()

    def _capture(self) -> Any:
        graph = new_graph()
        try:
            if self.before is not None:
                self.before()
            with capture(graph, self.stream):
                out = self.fn()
        except Exception as e:  # noqa: BLE001 - any failure to capture means: run this step eagerly
            synchronize()
            self.enabled = False
            self.fallback = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"kdlab: warning: could not capture {self.name} in a CUDA graph ({self.fallback}); "
                  "it runs without graphs (slower, same results)", file=sys.stderr)
            return self._eager()  # nothing ran during the failed capture: do this call's work now
        self.graph, self.out = graph, out
        self.captures += 1
        graph.replay()  # capturing records the kernels without running them
        return out
