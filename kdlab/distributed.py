"""One run on many GPUs: PyTorch's DistributedDataParallel, one process per GPU, started by torchrun.

    torchrun --nproc-per-node 4 -m kdlab train resnet18 --preset fast     # or: kdlab train ... --nproc 4

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; when WORLD_SIZE > 1 a run trains data-parallel:
- every rank holds the whole split on its device (CIFAR is 150 MB) and makes its slice of every
  global batch: the batch one process would make, with the same crops and flips, cut in WORLD_SIZE
  equal parts. The global batch size and the schedule mean what they mean in one process;
- each rank runs the teacher on its slice, DDP all-reduces (averages) the gradients of the student
  and of the method's own parts, and BatchNorm statistics are synchronised over the global batch
  (SyncBatchNorm; `--set sync_bn=false` keeps them per rank; on CPUs, where PyTorch has no
  SyncBatchNorm, they are always per rank);
- losses, accuracies and evaluation are summed over the ranks when they are read;
- only rank 0 writes the runs database and the checkpoints; every rank reads them (the runs
  directory must be one that every node sees). A rank that dies stops the whole run (torchrun ends
  the others); the run resumes from its last checkpoint when the same command is run again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kdlab.errors import UserError

if TYPE_CHECKING:
    from kdlab.store import RunRecord, RunsWriter


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> World | None:
    """The world torchrun started this process in, or None for a run in one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device, graphs: bool = True) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs); returns this rank's device. `graphs`: the
    run's steps will be captured as CUDA graphs."""
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
        if graphs:
            graph_safe_nccl()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def graph_safe_nccl() -> None:
    """Collectives captured in CUDA graphs must not be watched by NCCL's asynchronous error handler
    (PyTorch's CUDA-graph notes, "Usage with DistributedDataParallel"). Assigned, not defaulted:
    torchrun sets its own value, which would otherwise win. Read when the process group starts."""
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) `tensor` over the ranks in place; a no-op in one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a no-op in one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class _RankStore:
    """What both roles of a run on several processes do alike: read the one store."""

    def __init__(self, store: RunsWriter):
        self._store = store
        self.root = store.root

    def get(self, run_id: str) -> RunRecord | None:
        return self._store.get(run_id)

    def find(self, prefix: str) -> RunRecord | None:
        return self._store.find(prefix)

    def runs(self, status: str | None = None) -> list[RunRecord]:
        return self._store.runs(status)

    def checkpoint_path(self, run_id: str, epoch: int | None = None) -> Path:
        return self._store.checkpoint_path(run_id, epoch)

    def load_checkpoint(self, run_id: str) -> dict[str, Any] | None:
        return self._store.load_checkpoint(run_id)

    def close(self) -> None:
        self._store.close()


class LeaderStore(_RankStore):
    """The runs store on rank 0 (the writer role of kdlab.store.protocol): the real one, whose claims
    every rank is told. Each method is the store's own, named here."""

    is_writer = True

    def claim(self, run_id: str, owner: str) -> str:
        return broadcast(self._store.claim(run_id, owner))

    def reopen(self) -> RunsWriter:
        return self._store.reopen()  # the heartbeat's own connection: plain, it claims nothing

    def ensure(self, run_id: str, config: dict[str, Any], label: str | None = None, role: str | None = None) -> None:
        self._store.ensure(run_id, config, label, role)

    def heartbeat(self, run_id: str, owner: str) -> None:
        self._store.heartbeat(run_id, owner)

    def release(self, run_id: str, owner: str) -> None:
        self._store.release(run_id, owner)

    def set_info(self, run_id: str, **values: Any) -> None:
        self._store.set_info(run_id, **values)

    def record_epoch(self, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        self._store.record_epoch(run_id, epoch, metrics)

    def truncate_epochs(self, run_id: str, keep: int) -> None:
        self._store.truncate_epochs(run_id, keep)

    def finish(self, run_id: str, result: dict[str, Any]) -> None:
        self._store.finish(run_id, result)

    def fail(self, run_id: str, error: str) -> None:
        self._store.fail(run_id, error)

    def save_checkpoint(self, run_id: str, state: dict[str, Any]) -> None:
        self._store.save_checkpoint(run_id, state)

    def save_snapshot(self, run_id: str, epoch: int) -> None:
        self._store.save_snapshot(run_id, epoch)


class FollowerStore(_RankStore):
    """The runs store as ranks other than 0 see it (the follower role of kdlab.store.protocol): they
    read what rank 0 writes, and write nothing. Claims are rank 0's, told to every rank; each
    writing method is declared here and does nothing (rank 0 does it)."""

    is_writer = False

    def claim(self, run_id: str, owner: str) -> str:
        return broadcast(None)

    def reopen(self) -> RunsWriter:
        return self  # a follower keeps no claim alive: the loop starts no heartbeat on it

    def ensure(self, run_id: str, config: dict[str, Any], label: str | None = None, role: str | None = None) -> None:
        pass

    def heartbeat(self, run_id: str, owner: str) -> None:
        pass

    def release(self, run_id: str, owner: str) -> None:
        pass

    def set_info(self, run_id: str, **values: Any) -> None:
        pass

    def record_epoch(self, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        pass

    def truncate_epochs(self, run_id: str, keep: int) -> None:
        pass

    def finish(self, run_id: str, result: dict[str, Any]) -> None:
        pass

    def fail(self, run_id: str, error: str) -> None:
        pass

    def save_checkpoint(self, run_id: str, state: dict[str, Any]) -> None:
        pass

    def save_snapshot(self, run_id: str, epoch: int) -> None:
        pass


def for_rank(store: RunsWriter, world: World | None) -> RunsWriter:
    """The store as this rank uses it."""
    if world is None:
        return store
    return LeaderStore(store) if world.main else FollowerStore(store)


def launch(nproc: int, argv: list[str]) -> int:
    """`kdlab ... --nproc N`: run the same command under torchrun on N local processes."""
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "kdlab.cli", *argv]
    code = subprocess.call(command)
    if code != 0:
        print(f"kdlab: a process of the {nproc}-process run failed (exit code {code}); the run resumes from its "
              "last checkpoint when you run the same command again", file=sys.stderr)
    return code
