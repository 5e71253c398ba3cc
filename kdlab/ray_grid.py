"""The grid on a Ray cluster: the same runs as `kdlab.grid_runs.run_grid`, placed by Ray.

The students of one teacher train together in one Ray task (they share its forward per batch);
every other run is a task of its own. Ray does the rest, with its own features, not a scheduler
of ours:

- placement: each task asks for `gpus_per_run` of a GPU per run (fractions pack small students
  several to a card) and one CPU;
- order: a task is given the object refs of the tasks that train its teachers, so it starts only
  after them (teachers before students, TAKD chains teacher -> assistant -> student);
- faults: a task whose worker process or node dies is run again (`max_retries`), as is one that
  raised an error of `RETRY_EXCEPTIONS`; the training loop resumes it from its last checkpoint.

One actor on this node (the driver's) writes the SQLite store, so the database is never written
from two machines; the tasks reach it through `StoreProxy` and write their checkpoints themselves
into the runs directory, which every node must see at the same path. The data set is loaded once,
here, and handed to the tasks through Ray's object store.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdlab.errors import UserError
from kdlab.grid_runs import POLL_S, PlannedRun, _teacher
from kdlab.loop import loader_key
from kdlab.store import Store
from kdlab.store_proxy import StoreProxy, StoreWriter

INSTALL_HINT = "--ray needs Ray, which is not installed: pip install 'kdlab[ray]'"
RETRIES = 3
# Errors worth a second try: a shared filesystem's hiccup. A bug, or a NaN loss, would fail again.
RETRY_EXCEPTIONS = (OSError,)


def check_ray() -> None:
    """Say in one line how to install Ray when it is missing."""
    if importlib.util.find_spec("ray") is None:
        raise UserError(INSTALL_HINT)


def connect(address: str) -> Any:
    """Join the Ray cluster at `address` ('auto': the one this node belongs to; 'local': start
    one on this machine), unless this process is connected already. Returns the ray module."""
    check_ray()
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False)
        except ConnectionError as e:
            raise UserError(f"no Ray cluster at {address!r} ({_one_line(e)}): start one with `ray start "
                            "--head` on this node, or use --ray local for this machine alone") from None
    return ray


def run_grid_ray(runs: list[PlannedRun], runs_dir: str | Path, address: str = "auto", *,
                 gpus_per_run: float | None = None, retries: int = RETRIES, log: Callable[[str], Any] = print,
                 dataset: Any = None) -> dict[str, int]:
    """Run every planned run not yet done as Ray tasks; returns counts as `run_grid` does.

    `gpus_per_run` defaults to 1 on a cluster with GPUs and 0 without. Runs already done are
    skipped and failed ones are not run again, as in the local grid.
    """
    from kdlab.data import dataset_for

    if retries < 0:
        raise UserError(f"--retries must be >= 0, got {retries}")
    if not runs:
        return {}
    ray = connect(address)
    gpus = _gpus_per_run(ray, gpus_per_run)
    dataset = dataset or dataset_for(runs[0].cfg)
    runs_dir = Path(runs_dir).expanduser().resolve()  # the path every node must see
    Store(runs_dir).close()  # a bad runs dir fails here, in one line, as in the local grid
    writer = _start_writer(ray, runs_dir)
    store = StoreProxy(runs_dir, _forward_to(ray, writer))
    for r in runs:  # the plan and each run's role, recorded as the local grid does (the report reads them)
        store.ensure(r.run_id, r.cfg.to_dict(), r.label, r.role)
    counts = {"trained": 0, "skipped": 0, "failed": 0}
    tasks: dict[Any, list[PlannedRun]] = {}
    try:
        todo = _unfinished(runs, store, counts, log)
        tasks = _submit(ray, todo, writer, str(runs_dir), ray.put(dataset), gpus, retries)
        log(f"{len(todo)} runs in {len(tasks)} Ray tasks ({gpus:g} GPU per run), checkpoints in {runs_dir}")
        _collect(ray, tasks, store, counts, log)
    except BaseException:
        for ref in tasks:  # interrupted: stop the tasks
            ray.cancel(ref, force=True)
        raise
    finally:
        # Claims of tasks that died for good (or were stopped) go back, so the runs resume at once.
        ray.get(writer.release_all.remote())
        ray.kill(writer)
    return counts


def _gpus_per_run(ray: Any, gpus_per_run: float | None) -> float:
    available = ray.cluster_resources().get("GPU", 0)
    if gpus_per_run is None:
        return 1.0 if available else 0.0
    if not 0 <= gpus_per_run <= 1:
        raise UserError(f"--gpus-per-run takes a share of one GPU, 0 to 1, got {gpus_per_run:g}")
    if gpus_per_run > 0 and not available:
        raise UserError("--gpus-per-run: the Ray cluster has no GPUs (use 0, or add GPU nodes)")
    return gpus_per_run


def _start_writer(ray: Any, runs_dir: Path) -> Any:
    """The store's writer, as an actor on this node (where the runs dir's database is), taking no CPU."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(StoreWriter).options(num_cpus=0, scheduling_strategy=here, max_restarts=2,
                                            max_task_retries=2)
    return actor.remote(str(runs_dir))


def _forward_to(ray: Any, writer: Any) -> Callable[..., Any]:
    def forward(name: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(writer.call.remote(name, *args, **kwargs))

    return forward


def _unfinished(runs: list[PlannedRun], store: StoreProxy, counts: dict[str, int],
                log: Callable[[str], Any]) -> list[PlannedRun]:
    """The runs to train; finished and failed ones are counted, as the local grid does."""
    todo = []
    for r in runs:
        rec = store.get(r.run_id)
        if rec is not None and rec.status == "done":
            counts["skipped"] += 1
        elif rec is not None and rec.status == "failed":
            counts["failed"] += 1
            log(f"failed {r.label}: {rec.error} (failed runs are not run again)")
        else:
            todo.append(r)
    return todo


def _submit(ray: Any, todo: list[PlannedRun], writer: Any, runs_dir: str, dataset_ref: Any, gpus: float,
            retries: int) -> dict[Any, list[PlannedRun]]:
    """One task per group, each after the tasks of its teachers; returns the tasks' refs."""
    train = ray.remote(_train_task)
    trained_by: dict[str, Any] = {}  # run id -> ref of the task that trains it
    tasks: dict[Any, list[PlannedRun]] = {}
    for group in _task_groups(todo):  # `todo` is in dependency order, so teachers' tasks come first
        after = list(dict.fromkeys(trained_by[r.depends_on] for r in group if r.depends_on in trained_by))
        ref = train.options(num_gpus=min(1.0, gpus * len(group)), max_retries=retries,
                            retry_exceptions=list(RETRY_EXCEPTIONS)).remote(group, writer, runs_dir, dataset_ref,
                                                                            *after)
        tasks[ref] = group
        trained_by.update((r.run_id, ref) for r in group)
    return tasks


def _task_groups(todo: list[PlannedRun]) -> list[list[PlannedRun]]:
    """The runs of one task: the students of one teacher on the same batches together (they share
    its forward), every other run alone. Not the local grid's grouping on a GPU (every run on the
    same batches in one process, to keep one card busy): here Ray spreads the tasks over the
    cluster's GPUs and packs small ones on a card. A teacher is never in its students' task."""
    groups: dict[Any, list[PlannedRun]] = {}
    for r in todo:
        groups.setdefault((loader_key(r.cfg), r.depends_on) if r.depends_on else r.run_id, []).append(r)
    return list(groups.values())


def _train_task(group: list[PlannedRun], writer: Any, runs_dir: str, dataset: Any, *teachers_done: Any) -> None:
    """A Ray task: train one group with the unchanged loop; the store is the writer's proxy."""
    import warnings

    import ray

    from kdlab.loop import run_group

    # The data set's arrays come read-only from Ray's object store; the loader only reads them
    # (it copies them into tensors), so torch's warning about non-writable arrays says nothing here.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    store = StoreProxy(runs_dir, _forward_to(ray, writer))
    # A run whose teacher failed is not run: the driver reports it. (Its teacher's task ended.)
    todo = [r for r in group if not r.depends_on or _status(store, r.depends_on) == "done"]
    cache: dict[str, Any] = {}
    while todo:
        specs = [(r.cfg, _teacher(r, store, cache), r.label) for r in todo]
        records = run_group(specs, store, dataset=dataset, quiet=True, silent=True)
        todo = [r for r in todo if records[r.run_id] is None]
        if todo:
            time.sleep(POLL_S)  # another live process (a local `kdlab grid`) holds them: wait for it


def _status(store: StoreProxy, run_id: str) -> str | None:
    rec = store.get(run_id)
    return rec.status if rec is not None else None


def _collect(ray: Any, tasks: dict[Any, list[PlannedRun]], store: StoreProxy, counts: dict[str, int],
             log: Callable[[str], Any]) -> None:
    """As each task ends, read what became of its runs from the store, count and say it."""
    pending = list(tasks)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        error = None
        try:
            ray.get(done[0])
        except Exception as e:  # noqa: BLE001 (a task's failure is reported per run, not raised)
            error = _one_line(getattr(e, "cause", None) or e)
        for r in tasks[done[0]]:
            rec = store.get(r.run_id)
            if rec is not None and rec.status == "done":
                counts["trained"] += 1
                note = f", {rec.health}" if rec.diverged else ""
                log(f"done {r.run_id[:8]} {r.label}: {rec.final_acc:.2f}%{note}")
            elif r.depends_on and _status(store, r.depends_on) != "done":
                counts["failed"] += 1
                log(f"skip {r.label}: its teacher run {r.depends_on} failed, so it was not run")
            else:
                counts["failed"] += 1
                log(f"failed {r.label}: {rec.error if rec is not None and rec.error else error}")


def _one_line(e: BaseException) -> str:
    """The error's type and the last line of its message (Ray's messages end with the cause)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"
