"""Checkpoints written off the training thread.

A checkpoint of a ResNet18 with its optimiser state is about 90 MB: written, flushed and renamed
at every epoch end by the training thread, it would leave the GPU idle for as long. The training
thread only copies the state to host memory (the state of that moment, whatever the next steps
do); a background thread writes it through the store, atomically as before. A run is marked
finished only after its last checkpoint is on disk (`flush`). After a `kill -9`, the run resumes
from the newest checkpoint whose write had completed: at most the epoch being written, plus the
`checkpoint_every - 1` epochs before it, are trained again.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kdlab.config import Config
    from kdlab.job import Setup
    from kdlab.store import Store

# What a kdlab checkpoint file says it is (its "format" key): weights readers tell it from a plain state dict.
CHECKPOINT_FORMAT = "kdlab-checkpoint"


def to_host(obj: Any) -> Any:
    """A copy of a nested state (dicts, lists, tuples of tensors and plain values) in host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def checkpoint_state(run_id: str, cfg: Config, s: Setup, epoch: int, history: list[dict[str, Any]], elapsed: float,
                     timing: dict[str, float]) -> dict[str, Any]:
    """A run's whole state after `epoch` as a checkpoint, copied to host memory (the writer thread saves it)."""
    return to_host({
        "format": CHECKPOINT_FORMAT, "version": 1, "run_id": run_id, "config": cfg.to_dict(), "epoch": epoch,
        "model": {"name": cfg.model, "width": cfg.width, "num_classes": s.student.num_classes},
        "student": s.student.state_dict(), "method": s.method.state_dict(), "optimizer": s.optimizer.state_dict(),
        "history": list(history), "elapsed_s": elapsed, "timing": timing,
        "scaler": s.scaler.state_dict() if s.scaler is not None else None,
    })


def restore(s: Setup, ckpt: dict[str, Any]) -> None:
    """Load a checkpoint's weights, method state, optimiser and loss scale into a run's setup."""
    s.student.load_state_dict(ckpt["student"])
    s.method.load_state_dict(ckpt["method"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.optimizer.param_groups[0]["lr"] = s.lr  # the loaded state holds a host copy of the lr tensor
    if s.scaler is not None and ckpt.get("scaler"):
        s.scaler.load_state_dict(ckpt["scaler"])  # fp16's loss scale where it had got to


class CheckpointWriter:
    """Writes checkpoints (and snapshots) through `store` on one background thread, in order."""

    def __init__(self, store: Store):
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdlab-checkpoints")
        self._pending: list[Future] = []

    def submit(self, run_id: str, state: dict[str, Any], snapshot_epoch: int | None = None) -> None:
        """Queue `state` (already in host memory: see `to_host`) as the run's latest checkpoint, and
        keep a copy as its snapshot after `snapshot_epoch` if given."""
        self._raise_failures()
        self._pending.append(self._pool.submit(self._write, run_id, state, snapshot_epoch))

    def _write(self, run_id: str, state: dict[str, Any], snapshot_epoch: int | None) -> None:
        self.store.save_checkpoint(run_id, state)
        if snapshot_epoch is not None:
            self.store.save_snapshot(run_id, snapshot_epoch)

    def flush(self) -> None:
        """Wait until every queued checkpoint is on disk; raise the first failure."""
        for future in self._pending:
            future.result()
        self._pending.clear()

    def _raise_failures(self) -> None:
        done = [f for f in self._pending if f.done()]
        for future in done:
            future.result()  # raises if the write failed (a full disk must stop the run)
        self._pending = [f for f in self._pending if not f.done()]

    def close(self) -> None:
        """Finish what is queued (errors are not raised here: close runs on the way out of a failure)."""
        self._pool.shutdown(wait=True)
