"""Executors: where the scheduler's groups of runs train. Each only submits and collects.

    inprocess.py  this process, one group at a time (`kdlab grid`)
    workers.py    N local worker processes (`kdlab grid --workers N`)
    ray.py        tasks on a Ray cluster (`kdlab grid --ray ADDRESS`), the store written by one actor

An executor has `store` (the runs store the scheduler reads and records the plan in), `slots`
(how many groups may train at once), `together` (group every run that sees the same batches,
as one process on a GPU should, rather than only the students of one teacher), and:

    submit(key, group)     start training `group` (a list of PlannedRun)
    poll(notify, timeout)  wait up to `timeout` s and pass on what happened, as `work.Event`s:
                           claims and resumes as they come, then `ended` for each group that ended
    close()                stop what still runs and let go of the processes
"""

from __future__ import annotations

from typing import Any, Protocol

from kdlab.schedule.plan import PlannedRun
from kdlab.schedule.work import Notify


class Executor(Protocol):
    """What the scheduler needs of an executor (see the module's docstring)."""

    store: Any
    slots: int
    together: bool

    def submit(self, key: int, group: list[PlannedRun]) -> None: ...

    def poll(self, notify: Notify, timeout: float) -> None: ...

    def close(self) -> None: ...
