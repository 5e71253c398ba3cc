"""Ray (`kdlab grid --ray ADDRESS`): each group the scheduler hands over is one Ray task.

Ray places the tasks (`gpus_per_run` of a GPU per run packs small students several to a card) and
runs again one whose worker or node died, or that raised an OSError; the loop resumes it from its
last checkpoint. One actor on this node writes the SQLite store (`ray_store.StoreWriter`); the
tasks reach it through a `RayStore`. The data set goes to the tasks through Ray's object store.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from kdlab.errors import UserError
from kdlab.schedule.executors.ray_store import RayStore, StoreWriter
from kdlab.schedule.plan import PlannedRun
from kdlab.schedule.work import Event, Notify, one_line, train_group
from kdlab.store import Store


def connect(address: str, timeout: float) -> Any:
    """Join the Ray cluster at `address` ('auto': the one this node is in; 'local': start one here;
    HOST:PORT: that head node, which must answer within `timeout` s). Returns the ray module."""
    import ray

    if not ray.is_initialized():
        host, _, port = address.rpartition(":")
        if host and port.isdigit() and not _answers(host, int(port), timeout):  # Ray would retry for minutes
            raise UserError(f"no Ray cluster answered at {address} within {timeout:g} s: start one with `ray start "
                            "--head`, check the address, or wait longer with --ray-timeout")
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False)
        except ConnectionError as e:
            raise UserError(f"no Ray cluster at {address!r} ({one_line(e)}): start one with `ray start "
                            "--head` on this node, or use --ray local for this machine alone") from None
    return ray


def _answers(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())).close()
            return True
        except OSError:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    return False


class RayTasks:
    """Groups as Ray tasks, no more at once than the cluster has CPUs (a task waiting in `ray.get` on
    the writer gives its CPU back to Ray, which would start another). Students of one teacher per
    task (`together` false): Ray spreads the tasks over the cluster's GPUs."""

    together = False

    def __init__(self, runs_dir: str | Path, dataset: Any, *, address: str, gpus_per_run: float | None,
                 retries: int, timeout: float):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._ray = ray = connect(address, timeout)
        resources = ray.cluster_resources()
        if gpus_per_run and not resources.get("GPU"):
            raise UserError("--gpus-per-run: the Ray cluster has no GPUs (use 0, or add GPU nodes)")
        self.gpus = (1.0 if resources.get("GPU") else 0.0) if gpus_per_run is None else gpus_per_run
        self.slots = max(1, int(resources.get("CPU", 1)))
        self.runs_dir = str(Path(runs_dir).expanduser().resolve())  # the path every node must see
        Store(self.runs_dir).close()  # a bad runs dir fails here, in one line, as in the local grid
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._writer = ray.remote(StoreWriter).options(num_cpus=0, scheduling_strategy=here, max_restarts=2,
                                                       max_task_retries=2).remote(self.runs_dir)
        self.store = RayStore(self.runs_dir, self._writer)
        self._train, self._retries = ray.remote(_train_task), retries
        self._data, self._tasks = ray.put(dataset), {}  # task ref -> key of its group

    def submit(self, key: int, group: list[PlannedRun]) -> None:
        task = self._train.options(num_gpus=min(1.0, self.gpus * len(group)), max_retries=self._retries,
                                   retry_exceptions=[OSError])
        self._tasks[task.remote(group, self._writer, self.runs_dir, self._data)] = key

    def poll(self, notify: Notify, timeout: float) -> None:
        ended, _ = self._ray.wait(list(self._tasks), num_returns=1, timeout=timeout)
        for event in self._ray.get(self._writer.events.remote()):  # the claims before the ends
            notify(event)
        for ref in ended:
            error = None
            try:
                self._ray.get(ref)
            except Exception as e:  # noqa: BLE001 (a task's failure is reported per run, not raised)
                error = one_line(getattr(e, "cause", None) or e)
            notify(Event("ended", key=self._tasks.pop(ref), error=error))

    def close(self) -> None:
        for ref in self._tasks:  # interrupted: stop the tasks
            self._ray.cancel(ref, force=True)
        # Claims of tasks that died for good (or were stopped) go back, so the runs resume at once.
        self._ray.get(self._writer.release_all.remote())
        self._ray.kill(self._writer)


def _train_task(group: list[PlannedRun], writer: Any, runs_dir: str, dataset: Any) -> None:
    import warnings

    # The data's arrays come read-only from Ray's object store; the loader only copies them into tensors.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    store = RayStore(runs_dir, writer)
    train_group(group, store, dataset, {}, store.note, quiet=True, silent=True)
