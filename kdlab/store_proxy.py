"""A store for processes that must not open the SQLite database: its calls go to the one writer.

On a cluster the database stays on one node (the driver's), written by one process, so it never
sits on a network filesystem under concurrent writers. A `StoreProxy` has the interface of
`kdlab.store.Store`, so the unchanged training loop (`kdlab.loop.run_group`) runs on any node:
its database calls are forwarded to a `StoreWriter` (in a Ray actor, see kdlab/ray_grid.py), and
its checkpoints are read and written directly in the runs directory, which every node must see at
the same path (a shared filesystem), so a run that lost its node resumes on another.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdlab.store import DB_NAME, Store

# Store's methods that touch the database. Everything else a Store does (the checkpoint methods)
# the proxy inherits and runs where it is, in the shared runs directory.
FORWARDED = ("get", "find", "runs", "ensure", "claim", "heartbeat", "release", "set_info", "record_epoch",
             "truncate_epochs", "finish", "fail", "export_run", "import_run")

Forward = Callable[..., Any]  # forward(method_name, *args, **kwargs) -> the writer's answer


class StoreWriter:
    """The one process that writes the database; serves the proxies' calls one at a time.

    A run claimed through this writer and claimed again under another owner is a retry of a task
    whose worker or node died (the scheduler retries only then, and never runs one task twice at
    once): the dead attempt's claim is released first, even when its heartbeat is still fresh
    and its host is another machine (where the store cannot check the process).
    """

    def __init__(self, runs_dir: str | Path):
        self.store = Store(runs_dir)
        self._claims: dict[str, str] = {}  # run id -> owner of the claim taken through this writer

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name not in FORWARDED:
            raise AttributeError(f"the store writer does not forward {name!r}")
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
        return state

    def release_all(self) -> None:
        """Give back every claim still held through this writer (the grid ended or was interrupted):
        only runs still marked running under that claim change (to pending)."""
        for run_id, owner in self._claims.items():
            self.store.release(run_id, owner)

    def close(self) -> None:
        self.store.close()


class StoreProxy(Store):
    """A Store whose database calls go to a StoreWriter; checkpoints stay local to the caller."""

    def __init__(self, runs_dir: str | Path, forward: Forward):
        # Store.__init__ is not called on purpose: it would open the database here.
        self.root = Path(runs_dir).expanduser()
        self.path = self.root / DB_NAME
        self._forward = forward

    def reopen(self) -> StoreProxy:
        return StoreProxy(self.root, self._forward)

    def close(self) -> None:
        """Nothing to close: the writer keeps the database open."""

    def transaction(self) -> Any:
        raise TypeError("a StoreProxy has no database connection: call the Store methods")


def _forwarding(name: str) -> Callable[..., Any]:
    def method(self: StoreProxy, *args: Any, **kwargs: Any) -> Any:
        return self._forward(name, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = getattr(Store, name).__doc__
    return method


for _name in FORWARDED:
    setattr(StoreProxy, _name, _forwarding(_name))
