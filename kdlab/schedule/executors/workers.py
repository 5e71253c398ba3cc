"""Local worker processes (`kdlab grid --workers N`): N processes train the groups the scheduler hands
them, one group each at a time; this process only schedules, numbers and counts.

On a CPU each worker uses a core; on a GPU several small models train at once (one process leaves
the GPU mostly idle). The workers load the data from its cache (this process prepared it before
starting them), claim their runs in the store as any process does, and tell this process what
happens through a queue; their own progress lines go to the same terminal.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from pathlib import Path
from typing import Any

from kdlab.device import resolve_device
from kdlab.schedule.plan import PlannedRun
from kdlab.schedule.work import Event, Notify, one_line, train_group
from kdlab.store import Store


class Workers:
    """`n` worker processes fed through a queue."""

    def __init__(self, runs_dir: str | Path, n: int, *, quiet: bool, silent: bool, device: str):
        self.store = Store(runs_dir)
        self.slots = n
        self.together = resolve_device(device).type == "cuda"
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or threads inherited
        self._tasks, self._events = ctx.Queue(), ctx.Queue()
        self._procs = [ctx.Process(target=_work, args=(str(runs_dir), self._tasks, self._events, quiet, silent),
                                   name=f"kdlab-worker-{i}") for i in range(n)]
        for p in self._procs:
            p.start()
        self._holding: dict[int, int] = {}  # worker pid -> key of the group it trains

    def submit(self, key: int, group: list[PlannedRun]) -> None:
        self._tasks.put((key, group))

    def poll(self, notify: Notify, timeout: float) -> None:
        try:
            pid, event = self._events.get(timeout=timeout)
        except queue.Empty:
            self._check_alive(notify)
            return
        while True:
            if event.kind == "taken":
                self._holding[pid] = event.key
            else:
                if event.kind == "ended":
                    self._holding.pop(pid, None)
                notify(event)
            try:
                pid, event = self._events.get_nowait()
            except queue.Empty:
                return

    def _check_alive(self, notify: Notify) -> None:
        """A worker that died (killed, out of memory) ends its group with the reason."""
        for p in self._procs:
            if not p.is_alive() and p.pid in self._holding:
                notify(Event("ended", key=self._holding.pop(p.pid),
                             error=f"worker process {p.pid} died (exit code {p.exitcode})"))
        if not any(p.is_alive() for p in self._procs):
            raise RuntimeError("every worker process has died")

    def close(self) -> None:
        for _ in self._procs:
            self._tasks.put(None)
        for p in self._procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
                p.join()
        self.store.close()


def _work(runs_dir: str, tasks: Any, events: Any, quiet: bool, silent: bool) -> None:
    """A worker process: train groups until told to stop (None)."""
    import os

    from kdlab.data import dataset_for

    pid = os.getpid()
    store, teachers, dataset = Store(runs_dir), {}, None
    try:
        while (task := tasks.get()) is not None:
            key, group = task
            events.put((pid, Event("taken", key=key)))
            error = None
            try:
                dataset = dataset or dataset_for(group[0].cfg)
                train_group(group, store, dataset, teachers, lambda e: events.put((pid, e)), quiet=quiet,
                            silent=silent)
            except Exception as e:  # noqa: BLE001 (told to the scheduler, which reports it per run)
                error = one_line(e)
            events.put((pid, Event("ended", key=key, error=error)))
    except KeyboardInterrupt:
        pass  # the loop has released the claims; the scheduler stops too
    finally:
        store.close()
