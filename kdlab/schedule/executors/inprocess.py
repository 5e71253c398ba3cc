"""The in-process executor: this process trains one group at a time (`kdlab grid`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdlab.device import resolve_device
from kdlab.schedule.plan import PlannedRun
from kdlab.schedule.work import Event, Notify, train_group
from kdlab.store import Store


class InProcess:
    """Trains each submitted group here, when polled; claims and resumes are told as they happen."""

    slots = 1

    def __init__(self, runs_dir: str | Path, dataset: Any, *, quiet: bool, silent: bool, device: str):
        self.store = Store(runs_dir)
        self.dataset, self.quiet, self.silent = dataset, quiet, silent
        # On a GPU one process trains every run on the same batches at once, so that their steps
        # overlap on the card; on a CPU, where runs side by side only take turns, it need not.
        self.together = resolve_device(device).type == "cuda"
        self._teachers: dict[str, Any] = {}
        self._queue: list[tuple[int, list[PlannedRun]]] = []

    def submit(self, key: int, group: list[PlannedRun]) -> None:
        self._queue.append((key, group))

    def poll(self, notify: Notify, timeout: float) -> None:
        while self._queue:
            key, group = self._queue.pop(0)
            train_group(group, self.store, self.dataset, self._teachers, notify, quiet=self.quiet,
                        silent=self.silent)
            notify(Event("ended", key=key))

    def close(self) -> None:
        self.store.close()
