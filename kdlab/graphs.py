"""CUDA graphs: a step run eagerly a few times, then captured once and replayed with one launch.

The small CIFAR models are bound by kernel launches, not by the GPU: a ResNet18 step at half width
is a few hundred small kernels, and the host spends longer launching them than the GPU spends
running them. A captured graph replays all of them with one call. Capturing eager kernels costs
about one step's time (torch.compile's own CUDA graphs cost minutes of compilation first).

What a captured step needs, and how the engine provides it:
- fixed shapes and addresses: batches are copied into fixed buffers (`StaticBatch`), the last
  partial training batch is dropped and the last evaluation batch padded;
- no host work inside the step: the learning rate is a device tensor read by fused SGD, running
  sums are updated in place on the device, autocast runs without its weight cache;
- no host-side state that changes between replays: a method whose Python code depends on the
  epoch (ESKD's stop, DKD's warm-up) says so through `Method.graph_key`, and the step is captured
  again when the key changes.
Where capture fails anyway (an op that waits for the host, an unsupported kernel), the step falls
back to eager execution with one warning: slower, never wrong.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch

WARMUP_CALLS = 2  # eager calls before capture: lazy initialisation, cuDNN autotuning, optimiser state
DDP_WARMUP_CALLS = 11  # DistributedDataParallel builds its buckets over its first steps (PyTorch's CUDA-graph notes)


class Captured:
    """Calls `fn` (which takes no arguments and reads and writes only fixed tensors): eagerly on a
    CPU or with graphs off; on CUDA eagerly for the first `warmup` calls, then captured into a
    CUDA graph on `stream` and replayed. `before` runs ahead of every eager call and of the capture,
    never ahead of a replay (e.g. dropping gradients, which the captured backward then allocates in
    the graph's own memory, as in PyTorch's whole-network capture example).

    `setup_s` is the wall time spent in warm-up calls and captures (compilation included).
    """

    def __init__(self, fn: Callable[[], Any], device: torch.device, *, enabled: bool, name: str,
                 stream: Any = None, before: Callable[[], None] | None = None, warmup: int = WARMUP_CALLS):
        self.fn, self.name, self.stream, self.before, self.warmup = fn, name, stream, before, warmup
        self.enabled = enabled and device.type == "cuda"
        self.graph: Any = None
        self.out: Any = None
        self.key: Hashable = None
        self.calls = 0
        self.setup_s = 0.0
        self.captures = 0
        self.fallback: str | None = None  # why this step runs eagerly although graphs were asked for

    def __call__(self, key: Hashable = None) -> Any:
        if key != self.key:
            # The step's Python code takes another path now: capture it afresh (one eager call first).
            self.key, self.graph, self.out = key, None, None
            self.calls = min(self.calls, self.warmup - 1)
        if not self.enabled:
            return self._eager()
        if self.graph is not None:
            self.graph.replay()
            return self.out
        t0 = time.perf_counter()
        out = self._eager() if self.calls < self.warmup else self._capture()
        torch.cuda.synchronize()
        self.setup_s += time.perf_counter() - t0
        return out

    def _eager(self) -> Any:
        if self.before is not None:
            self.before()
        self.calls += 1
        return self.fn()

    def _capture(self) -> Any:
        graph = torch.cuda.CUDAGraph()
        try:
            if self.before is not None:
                self.before()
            # thread_local: the checkpoint writer thread may run while a step is captured.
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                out = self.fn()
        except Exception as e:  # noqa: BLE001 - any failure to capture means: run this step eagerly
            torch.cuda.synchronize()
            self.enabled = False
            self.fallback = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"kdlab: warning: could not capture {self.name} in a CUDA graph ({self.fallback}); "
                  "it runs without graphs (slower, same results)", file=sys.stderr)
            return self._eager()  # nothing ran during the failed capture: do this call's work now
        self.graph, self.out = graph, out
        self.captures += 1
        graph.replay()  # capturing records the kernels without running them
        return out
