"""What a training process does with a group of runs the scheduler hands it, whatever the executor.

`train_group` resolves each run's teacher and trains the group with the unchanged loop
(`kdlab.loop.run_group`), which claims the runs in the store. What happens on the way is told
back to the scheduler as `Event`s: a run claimed (this grid trains it), a run resumed from its
checkpoint, a group ended. An in-process executor hands them over directly; worker processes
through a queue; Ray tasks through the store-writer actor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdlab.errors import UserError
from kdlab.loop import prepare_teacher, run_group
from kdlab.schedule.plan import PlannedRun


@dataclass(frozen=True)
class Event:
    """Something the scheduler is told: `claimed` (run_id; `retry`: claimed again after its Ray
    task was lost), `resumed` (run_id, at `epoch`), or `ended` (the group submitted under `key`;
    `error`: why its process or task failed, if it did)."""

    kind: str
    run_id: str | None = None
    epoch: int = 0
    key: int | None = None
    error: str | None = None
    retry: bool = False


Notify = Callable[[Event], Any]


def train_group(group: list[PlannedRun], store: Any, dataset: Any, teachers: dict[str, Any], notify: Notify, *,
                quiet: bool = True, silent: bool = False) -> None:
    """Train `group` (one loader) in this process, telling `notify` of claims and resumes. Runs
    another live process holds are left to it (the scheduler offers them again later)."""
    specs = [(r.cfg, teacher_for(r, store, teachers), r.label) for r in group]
    run_group(specs, store, dataset=dataset, quiet=quiet, silent=silent,
              on_claim=lambda run_id, _label: notify(Event("claimed", run_id)),
              on_resume=lambda run_id, epoch: notify(Event("resumed", run_id, epoch=epoch)))


def teacher_for(r: PlannedRun, store: Any, cache: dict[str, Any]) -> Any:
    """The run's teacher, loaded once per process from its checkpoint and moved to the run's device.

    Only `store`'s `get` and `root` are used (no second connection to the database), so that a
    Ray task can pass its store proxy."""
    from kdlab.teacher_lookup import load_teacher

    if not r.depends_on:
        return None
    r.cfg.teacher_path = store.get(r.depends_on).checkpoint
    if r.cfg.teacher_path is None:
        raise UserError(f"teacher run {r.depends_on} has no checkpoint in {store.root}: train it again")
    if r.depends_on not in cache:
        cache[r.depends_on] = prepare_teacher(load_teacher(r.cfg.teacher_path, store.root).model, r.cfg,
                                              r.depends_on)
    return cache[r.depends_on]


def one_line(e: BaseException) -> str:
    """The error's type and the last line of its message (Ray's messages end with the cause)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"
