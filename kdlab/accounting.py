"""Which run used which seconds, when runs train side by side: the one place that apportions time.

Each job's own clock (`Job.timer`) measures its steps and evaluations on the device; a teacher's
forward passes, shared by its students, are split evenly among them (`Engine.teacher_seconds`);
the group's data time and each epoch's wall time are charged to the runs in proportion to the
device time each used in it (`EpochClock`). A resumed run carries on from the times its checkpoint
recorded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kdlab.engine import Engine
from kdlab.job import Job
from kdlab.timing import SegmentTimer


def teacher_share(job: Job, engine: Engine) -> float:
    """A run's share of its teacher's forward time: its share in this engine, plus the share recorded
    before a resume."""
    return job.timer.totals.get("teacher", 0.0) + engine.teacher_seconds(job)


def own_time(job: Job, engine: Engine) -> float:
    """Device seconds a run has used: its steps, its evaluations and its share of its teacher."""
    totals = job.timer.collect()
    return totals.get("step", 0.0) + totals.get("eval", 0.0) + teacher_share(job, engine)


def totals(job: Job, engine: Engine) -> dict[str, float]:
    """The run's time per segment so far (what its checkpoint records, so that a resume carries on)."""
    return {**job.timer.collect(), "teacher": teacher_share(job, engine)}


class EpochClock:
    """Times the group's batches (`data`) and charges each epoch's wall time and data time to the
    runs that trained in it, in proportion to the device time each used (`start`, then `charge`)."""

    def __init__(self, engine: Engine, device: torch.device):
        self.engine = engine
        self._data = SegmentTimer(device)
        self._t0 = 0.0
        self._data_before = 0.0
        self._before: dict[str, float] = {}

    @contextmanager
    def data(self) -> Iterator[None]:
        """Time making one batch (shared by every run of the group)."""
        with self._data("data"):
            yield

    def start(self, jobs: list[Job]) -> None:
        self._t0 = time.perf_counter()
        self._before = {j.run_id: own_time(j, self.engine) for j in jobs}
        self._data_before = self._data.collect().get("data", 0.0)

    def charge(self, jobs: list[Job]) -> dict[str, float]:
        """Each run's share of the epoch's wall seconds since `start`; its share of the data time is
        added to its clock."""
        wall = time.perf_counter() - self._t0
        data = self._data.collect().get("data", 0.0) - self._data_before
        own = {j.run_id: own_time(j, self.engine) - self._before[j.run_id] for j in jobs}
        total = sum(own.values()) or 1.0
        for job in jobs:
            job.timer.totals["data"] += data * own[job.run_id] / total
        return {j.run_id: wall * own[j.run_id] / total for j in jobs}


def timing_summary(job: Job, engine: Engine, group_size: int) -> dict[str, float]:
    """Split the run's wall time: data, teacher forward, student step, evaluation, and the one-off cost
    of warming up and capturing the steps (compilation included) as compile_s."""
    spent, wall = job.timer.collect(), job.elapsed
    parts = {"data_s": spent.get("data", 0.0), "teacher_s": teacher_share(job, engine),
             "student_s": spent.get("step", 0.0), "eval_s": spent.get("eval", 0.0)}
    parts["other_s"] = max(0.0, wall - sum(parts.values()))
    parts["wall_s"] = wall
    parts["compile_s"] = engine.state(job).setup_s()
    parts["processes"] = engine.world.size if engine.world is not None else 1
    parts["group_size"] = group_size
    return parts
