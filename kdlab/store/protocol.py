"""The store's interface, in three roles, and the classes that play them.

Everything that reads or writes runs goes through one of these protocols, so that the training
loop, the grid and the reports run unchanged on any store:

- `RunsReader`: reading a runs directory (reports, dry runs, finding a teacher, merging). Played
  by `Store(runs_dir, readonly=True)` (see `open_store`), and by every writer.
- `RunsWriter`: what the training loop and the grid call; the one that writes (`is_writer` True):
  `Store`, `kdlab.distributed.LeaderStore` (rank 0 of a run on several processes, whose claims
  every rank is told) and `kdlab.schedule.executors.ray_store.RayStore` (a Ray task's, whose database
  calls go to the one writer process).
- `RunsFollower`: the writer's interface on a process that must not write: the ranks other than 0
  of a run on several processes (`kdlab.distributed.FollowerStore`). It reads what the writer
  wrote, its `claim` is the writer's answer, and each writing method is declared, doing nothing;
  `is_writer` is False, so the loop leaves heartbeats, checkpoints and loggers to the writer.

Every implementation is an explicit class: a name that is not part of its role raises
AttributeError like any other attribute error (nothing is forwarded by `__getattr__`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kdlab.store.records import RunRecord


@runtime_checkable
class RunsReader(Protocol):
    """Reads the runs of one runs directory."""

    root: Path

    @property
    def is_writer(self) -> bool:
        """Whether this store writes the database and the checkpoints (a reader or follower does not)."""
        ...

    def get(self, run_id: str) -> RunRecord | None:
        """The run of that id, or None."""
        ...

    def find(self, prefix: str) -> RunRecord | None:
        """A run by its id or an unambiguous prefix of it (an ambiguous one is a UserError)."""
        ...

    def runs(self, status: str | None = None) -> list[RunRecord]:
        """Every run (of that status), oldest first."""
        ...

    def checkpoint_path(self, run_id: str, epoch: int | None = None) -> Path:
        """Where the run's latest checkpoint, or its snapshot after `epoch`, is."""
        ...

    def load_checkpoint(self, run_id: str) -> dict[str, Any] | None:
        """The run's latest checkpoint, None if it has none; a damaged one is a UserError."""
        ...

    def close(self) -> None:
        """Release the database connection."""
        ...


@runtime_checkable
class RunsWriter(RunsReader, Protocol):
    """Records runs: claims, progress, results and checkpoints (what the training loop calls)."""

    def reopen(self) -> RunsWriter:
        """The same store on a connection of its own, for another thread (the heartbeat's)."""
        ...

    def ensure(self, run_id: str, config: dict[str, Any], label: str | None = None,
               role: str | None = None) -> None:
        """Record a run as pending unless it is already known."""
        ...

    def claim(self, run_id: str, owner: str) -> str:
        """Try to take a run: 'claimed', 'done' (nothing to do) or 'busy' (someone alive has it)."""
        ...

    def heartbeat(self, run_id: str, owner: str) -> None:
        """Refresh `owner`'s claim."""
        ...

    def release(self, run_id: str, owner: str) -> None:
        """Give back a claim without finishing: the run can be resumed later."""
        ...

    def set_info(self, run_id: str, **values: Any) -> None:
        """Static facts about a run known when it starts: device, versions, params."""
        ...

    def record_epoch(self, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        """Store one finished epoch (1-based) and advance the run's progress."""
        ...

    def truncate_epochs(self, run_id: str, keep: int) -> None:
        """Forget epochs after `keep`."""
        ...

    def finish(self, run_id: str, result: dict[str, Any]) -> None:
        """Mark the run done with its result."""
        ...

    def fail(self, run_id: str, error: str) -> None:
        """Mark the run failed, with why."""
        ...

    def save_checkpoint(self, run_id: str, state: dict[str, Any]) -> None:
        """Write the run's latest checkpoint, whole."""
        ...

    def save_snapshot(self, run_id: str, epoch: int) -> None:
        """Keep a copy of the checkpoint just written, as it stands after `epoch`."""
        ...


@runtime_checkable
class RunsFollower(RunsWriter, Protocol):
    """The writer's interface where another process writes: reads see the writer's rows and files,
    `claim` returns the writer's answer, every other writing method does nothing, `is_writer` is False."""


WRITING = ("ensure", "claim", "heartbeat", "release", "set_info", "record_epoch", "truncate_epochs", "finish", "fail",
           "save_checkpoint", "save_snapshot", "reopen")  # RunsWriter's own methods
READING = ("get", "find", "runs", "checkpoint_path", "load_checkpoint", "close")  # RunsReader's
