"""The runs store for Ray tasks, which must not open the SQLite database: its calls go to one writer.

On a cluster the database stays on one node (the driver's), written by one process (`StoreWriter`,
in a Ray actor), so it never sits on a network filesystem under concurrent writers. A `RayStore`
plays the writer role of `kdlab.store.protocol` (what the training loop and the scheduler use), and no more:
its database calls go to the writer, its checkpoints are read and written where it runs, in the
runs directory, which every node must see at the same path (a shared filesystem), so that a run
that lost its node resumes on another. A name it lacks fails at once (AttributeError).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdlab.schedule.work import Event
from kdlab.store import DB_NAME, RunRecord, Store

# The database calls the writer serves: the writer role's (kdlab.store.RunsWriter), nothing else.
WRITER_CALLS = ("get", "find", "runs", "ensure", "claim", "heartbeat", "release", "set_info", "record_epoch",
                "truncate_epochs", "finish", "fail")


class StoreWriter:
    """The one process that writes the database; serves the proxies' calls one at a time, and keeps
    the events the tasks tell the driver (claims, resumes) until it collects them.

    A run claimed through this writer and claimed again under another owner is a retry of a task
    whose worker or node died (Ray retries only then, and never runs one task twice at once): the
    dead attempt's claim is released first, even when its heartbeat is still fresh and its host is
    another machine (where the store cannot check the process).
    """

    def __init__(self, runs_dir: str | Path):
        self.store = Store(runs_dir)
        self._claims: dict[str, str] = {}  # run id -> owner of the claim taken through this writer
        self._events: list[Event] = []

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name not in WRITER_CALLS:
            raise AttributeError(f"the store writer does not serve {name!r}")
        if name == "claim":
            return self._claim(*args, **kwargs)
        return getattr(self.store, name)(*args, **kwargs)

    def _claim(self, run_id: str, owner: str) -> str:
        earlier = self._claims.get(run_id)
        if earlier is not None and earlier != owner:
            self.store.release(run_id, earlier)
        state = self.store.claim(run_id, owner)
        if state == "claimed":
            self._claims[run_id] = owner
            self._events.append(Event("claimed", run_id, retry=earlier is not None))
        return state

    def note(self, event: Event) -> None:
        """An event a task tells the driver (its claims the writer sees itself)."""
        if event.kind != "claimed":
            self._events.append(event)

    def events(self) -> list[Event]:
        """The events since the last call."""
        out, self._events = self._events, []
        return out

    def release_all(self) -> None:
        """Give back every claim still held through this writer (the grid ended or was interrupted):
        only runs still marked running under that claim change (to pending)."""
        for run_id, owner in self._claims.items():
            self.store.release(run_id, owner)

    def close(self) -> None:
        self.store.close()


class RayStore:
    """The store as a Ray task (or the driver) uses it: database calls go to the `StoreWriter` actor,
    checkpoint files are read and written here. `call(name, *args)` reaches the writer (the actor's
    `call` through Ray, or a `StoreWriter`'s own in a test)."""

    __slots__ = ("root", "path", "_writer", "_call")
    is_writer = True  # the one process of its run: it keeps the claim and writes the checkpoints

    def __init__(self, runs_dir: str | Path, writer: Any):
        self.root = Path(runs_dir).expanduser()
        self.path = self.root / DB_NAME
        self._writer = writer
        if isinstance(writer, StoreWriter):
            self._call = writer.call
        else:
            import ray

            self._call = lambda name, *args, **kwargs: ray.get(writer.call.remote(name, *args, **kwargs))

    def reopen(self) -> RayStore:
        """The same store for another thread (the heartbeat's)."""
        return RayStore(self.root, self._writer)

    def close(self) -> None:
        """Nothing to close: the writer keeps the database open."""

    def note(self, event: Event) -> None:
        """Tell the driver (through the writer) what happened in this task."""
        if isinstance(self._writer, StoreWriter):
            self._writer.note(event)
        else:
            import ray

            ray.get(self._writer.note.remote(event))

    # ---- the database, through the writer -------------------------------------------------------

    def get(self, run_id: str) -> RunRecord | None:
        return self._call("get", run_id)

    def find(self, prefix: str) -> RunRecord | None:
        return self._call("find", prefix)

    def runs(self, status: str | None = None) -> list[RunRecord]:
        return self._call("runs", status)

    def ensure(self, run_id: str, config: dict[str, Any], label: str | None = None, role: str | None = None) -> None:
        self._call("ensure", run_id, config, label, role)

    def claim(self, run_id: str, owner: str) -> str:
        return self._call("claim", run_id, owner)

    def heartbeat(self, run_id: str, owner: str) -> None:
        self._call("heartbeat", run_id, owner)

    def release(self, run_id: str, owner: str) -> None:
        self._call("release", run_id, owner)

    def set_info(self, run_id: str, **values: Any) -> None:
        self._call("set_info", run_id, **values)

    def record_epoch(self, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        self._call("record_epoch", run_id, epoch, metrics)

    def truncate_epochs(self, run_id: str, keep: int) -> None:
        self._call("truncate_epochs", run_id, keep)

    def finish(self, run_id: str, result: dict[str, Any]) -> None:
        self._call("finish", run_id, result)

    def fail(self, run_id: str, error: str) -> None:
        self._call("fail", run_id, error)

    # ---- checkpoints, here in the shared runs directory (Store's own code: it only uses `root`) ----

    def checkpoint_path(self, run_id: str, epoch: int | None = None) -> Path:
        return Store.checkpoint_path(self, run_id, epoch)  # type: ignore[arg-type]

    def save_checkpoint(self, run_id: str, state: dict[str, Any]) -> None:
        Store.save_checkpoint(self, run_id, state)  # type: ignore[arg-type]

    def save_snapshot(self, run_id: str, epoch: int) -> None:
        Store.save_snapshot(self, run_id, epoch)  # type: ignore[arg-type]

    def load_checkpoint(self, run_id: str) -> dict[str, Any] | None:
        return Store.load_checkpoint(self, run_id)  # type: ignore[arg-type]
