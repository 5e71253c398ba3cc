"""The grid on Ray: a local 2-CPU cluster gives the local grid's runs, survives a killed worker (and says
so), skips the students of a failed teacher, counts only what its own tasks trained, runs no more tasks
at once than the node has CPUs, and gives up on an unreachable head node in one line; the store proxy
has what the loop needs and nothing else."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import sqlite3
import threading
import time

import pytest
import torch

from kdlab.cli import main
from kdlab.loop import run_group
from kdlab.schedule.executors.ray_store import WRITER_CALLS, RayStore, StoreWriter
from kdlab.schedule.plan import GridSpec, plan
from kdlab.schedule.scheduler import run_grid
from kdlab.store import RunsWriter, Store

TINY_GRID = ["--preset", "smoke", "--dataset", "synthetic", "--epochs", "1", "--set", "train_limit=128",
             "--set", "test_limit=64", "--batch-size", "64", "--quiet"]
# A TAKD chain (teacher -> assistant -> student) beside plain KD: dependency order two deep.
GRID = ["grid", "--teachers", "resnet18", "--students", "vgg16", "--assistants", "resnet18@0.75", *TINY_GRID]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs, no GPU) for every test here: it takes seconds to start."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _results(runs_dir) -> dict:
    store = Store(runs_dir, create=False)
    out = {r.run_id: (r.status, r.final_acc, [(e["train_loss"], e["test_acc"]) for e in r.history])
           for r in store.runs()}
    store.close()
    return out


def test_ray_grid_gives_the_local_grids_plan_runs_and_accuracies(tmp_path, synthetic_dir, ray_cluster, capsys):
    from kdlab.reporting import build_report

    def grid(runs_dir: str, *extra: str) -> int:
        return main([*GRID, "--data-dir", str(synthetic_dir), "--runs-dir", str(tmp_path / runs_dir), *extra])

    assert grid("ray", "--dry-run") == 0
    local_plan = capsys.readouterr().out
    assert grid("ray", "--dry-run", "--ray", "auto") == 0
    assert capsys.readouterr().out == local_plan and local_plan.count(" new ") == 5
    assert grid("local") == 0
    capsys.readouterr()
    assert grid("ray", "--ray", "auto") == 0
    assert "5 trained, 0 skipped, 0 failed" in capsys.readouterr().out
    ray_runs = _results(tmp_path / "ray")
    assert len(ray_runs) == 5 and all(status == "done" for status, _, _ in ray_runs.values())
    assert ray_runs == _results(tmp_path / "local")  # bit for bit: same ids, losses and accuracies
    assert len(list((tmp_path / "ray" / "checkpoints").glob("*.pt"))) == 5
    reports = [build_report(Store(tmp_path / d, create=False)) for d in ("local", "ray")]
    cells = [[(c.pair, c.method, c.acc.mean) for s in r.studies for c in s.cells] for r in reports]
    assert cells[0] == cells[1] and len(cells[0]) == 3
    # Done is done: a second run of the same grid trains nothing.
    assert grid("ray", "--ray", "auto") == 0
    assert "0 trained, 5 skipped, 0 failed" in capsys.readouterr().out


def test_a_killed_worker_is_retried_and_the_run_resumes_from_its_checkpoint(tmp_path, synthetic_dir, ray_cluster):
    teacher = plan(GridSpec(teachers=["resnet18"], students=["vgg16"], preset="smoke", dataset="synthetic",
                            data_dir=str(synthetic_dir),
                            overrides={"epochs": 12, "train_limit": 256, "test_limit": 64, "batch_size": 64}))[0]
    runs_dir = tmp_path / "runs"
    seen: dict = {}

    def kill_the_worker_after_epoch_2() -> None:
        db, ckpt = runs_dir / "kdlab.db", runs_dir / "checkpoints" / f"{teacher.run_id}.pt"
        deadline = time.time() + 120
        while time.time() < deadline and "pid" not in seen:
            time.sleep(0.02)
            # Checkpoints are written off the training thread: wait for one that holds epoch 2.
            if not ckpt.exists() or torch.load(ckpt, weights_only=True)["epoch"] < 2:
                continue
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                row = c.execute("SELECT status, owner, epochs_done FROM runs WHERE run_id=?",
                                (teacher.run_id,)).fetchone()
                if row and row[0] == "running":
                    seen["epoch_1"] = c.execute("SELECT * FROM epochs WHERE run_id=? AND epoch=1",
                                                (teacher.run_id,)).fetchone()
                    seen["at"], seen["pid"] = row[2], int(row[1].split(":")[1])  # owner is host:pid:random
                    os.kill(seen["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker_after_epoch_2)
    killer.start()
    logs: list[str] = []
    counts = run_grid([teacher], runs_dir, ray="auto", log=logs.append)
    killer.join()
    assert "pid" in seen and seen["at"] < 12  # it was killed mid-run
    assert counts == {"trained": 1, "skipped": 0, "failed": 0, "diverged": 0}
    # Said by the grid, naming the run and where it resumes (at least the epoch the kill found).
    retry = [line for line in logs if line.startswith(f"retrying {teacher.label} {teacher.run_id[:8]} ")]
    assert len(retry) == 1 and int(retry[0].split("at epoch ")[1].split()[0]) >= 2, logs
    assert retry[0].endswith(" of 12")
    with pytest.raises(ProcessLookupError):
        os.kill(seen["pid"], 0)
    store = Store(runs_dir, create=False)
    rec = store.get(teacher.run_id)
    assert rec.status == "done" and rec.epochs_done == 12 and len(rec.history) == 12
    with sqlite3.connect(runs_dir / "kdlab.db") as c:
        epoch_1 = c.execute("SELECT * FROM epochs WHERE run_id=? AND epoch=1", (teacher.run_id,)).fetchone()
    # Resumed, not started over: epoch 1 (its measured time included) is the one trained before the kill.
    assert epoch_1 == seen["epoch_1"]


def test_a_failed_teacher_leaves_its_students_not_run_with_the_reason(tmp_path, synthetic_dir, ray_cluster):
    runs = plan(GridSpec(teachers=["resnet18"], students=["vgg16"], preset="smoke", dataset="synthetic",
                         data_dir=str(synthetic_dir), overrides={"epochs": 1, "train_limit": 128, "test_limit": 64}))
    teacher, alone, distilled = runs
    runs_dir = tmp_path / "runs"
    # A directory where the teacher's checkpoint goes: loading it fails (an OSError, retried once).
    (runs_dir / "checkpoints" / f"{teacher.run_id}.pt").mkdir(parents=True)
    logs: list[str] = []
    counts = run_grid(runs, runs_dir, ray="auto", retries=1, log=logs.append)
    assert counts == {"trained": 1, "skipped": 0, "failed": 2, "diverged": 0}
    store = Store(runs_dir, create=False)
    assert store.get(teacher.run_id).status == "failed" and "IsADirectoryError" in store.get(teacher.run_id).error
    assert store.get(alone.run_id).status == "done"
    assert store.get(distilled.run_id).status == "pending"  # planned (recorded with its role), never started
    assert f"skip {distilled.label}: its teacher run {teacher.run_id} failed, so it was not run" in logs


def test_ray_options_are_checked_before_anything_is_written(tmp_path, synthetic_dir, ray_cluster, capsys):
    runs_dir = tmp_path / "runs"
    base = [*GRID, "--data-dir", str(synthetic_dir), "--runs-dir", str(runs_dir), "--ray", "auto"]
    for extra, message in ((["--gpus-per-run", "0.5"], "the Ray cluster has no GPUs"),
                           (["--gpus-per-run", "2"], "share of one GPU, 0 to 1"),
                           (["--workers", "2"], "--workers and --ray do not mix")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not runs_dir.exists()


def test_without_ray_the_grid_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert main([*GRID, "--runs-dir", str(tmp_path / "runs"), "--ray", "auto"]) == 2
    assert capsys.readouterr().err == "kdlab: error: --ray needs Ray, which is not installed: pip install " \
                                      "'kdlab[ray]'\n"
    assert not (tmp_path / "runs").exists()


def test_a_run_another_grid_trained_is_not_counted_as_ours(tmp_path, synthetic_dir, ray_cluster):
    """Two grids on one runs dir: what the other one's process held and finished is skipped here."""
    runs = plan(GridSpec(teachers=["resnet18"], students=["vgg16"], preset="smoke", dataset="synthetic",
                         data_dir=str(synthetic_dir), overrides={"epochs": 1, "train_limit": 128, "test_limit": 64}))
    teacher, alone = runs[0], runs[1]
    runs_dir = tmp_path / "runs"
    other = Store(runs_dir)
    other.ensure(alone.run_id, alone.cfg.to_dict(), alone.label, alone.role)
    owner = f"{socket.gethostname()}:{os.getpid()}:othergrid"  # a live process: its claim holds
    assert other.claim(alone.run_id, owner) == "claimed"

    def the_other_grid_finishes_it() -> None:
        time.sleep(3)
        other.finish(alone.run_id, {"final_acc": 50.0, "best_acc": 50.0, "best_epoch": 1, "wall_s": 1.0,
                                    "timing": {}})

    finisher = threading.Thread(target=the_other_grid_finishes_it)
    finisher.start()
    counts = run_grid([teacher, alone], runs_dir, ray="auto", log=lambda m: None)
    finisher.join()
    assert counts == {"trained": 1, "skipped": 1, "failed": 0, "diverged": 0}


def test_no_more_tasks_at_once_than_the_node_has_cpus(tmp_path, synthetic_dir, ray_cluster):
    models = ["resnet18", "vgg16", "densenet121"]
    runs = [r for r in plan(GridSpec(teachers=models, students=models, preset="smoke", dataset="synthetic",
                                     data_dir=str(synthetic_dir),
                                     overrides={"epochs": 3, "train_limit": 256, "test_limit": 64}))
            if not r.depends_on]  # six runs that need no other
    runs_dir = tmp_path / "runs"
    most, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            if (runs_dir / "kdlab.db").exists():
                with sqlite3.connect(f"file:{runs_dir / 'kdlab.db'}?mode=ro", uri=True) as c:
                    owners = {o.split(":")[1] for (o,) in c.execute("SELECT owner FROM runs WHERE status='running'")}
                most[0] = max(most[0], len(owners))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        counts = run_grid(runs, runs_dir, ray="auto", log=lambda m: None)
    finally:
        stop.set()
        watcher.join()
    assert counts["trained"] == 6 and 1 <= most[0] <= 2  # processes training at once, on 2 CPUs


def test_an_unreachable_head_node_times_out_in_one_line(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever an earlier test left running
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init on an address that never answered"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    code = main([*GRID, "--runs-dir", str(tmp_path / "runs"), "--ray", f"127.0.0.1:{port}", "--ray-timeout", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and time.monotonic() - t0 < 30
    assert f"no Ray cluster answered at 127.0.0.1:{port} within 1 s" in err and "--ray-timeout" in err
    assert not (tmp_path / "runs").exists()


def test_gpus_per_run_without_ray_is_refused(tmp_path, capsys):
    assert main([*GRID, "--runs-dir", str(tmp_path / "runs"), "--gpus-per-run", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--gpus-per-run" in err and "--ray" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_the_store_proxy_plays_the_writer_role_and_fails_on_anything_else(tmp_path):
    def public(cls: type) -> set[str]:
        return {n for n, v in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}

    checkpoints = {"checkpoint_path", "save_checkpoint", "load_checkpoint", "save_snapshot"}
    assert public(RayStore) == {*WRITER_CALLS, *checkpoints, "reopen", "close", "note"}
    assert public(RayStore) - {"note"} <= public(Store)
    proxy = RayStore(tmp_path, StoreWriter(tmp_path))
    assert proxy.is_writer and isinstance(proxy, RunsWriter)
    for name in ("transaction", "import_run", "hearbeat"):
        with pytest.raises(AttributeError):
            getattr(proxy, name)
    with pytest.raises(AttributeError):
        proxy.anything = 1


def test_the_loop_trains_through_the_proxy_and_a_retry_takes_over_its_claim(tmp_path, tiny):
    from kdlab.configure import build_config

    writer = StoreWriter(tmp_path)
    proxy = RayStore(tmp_path, writer)
    cfg = build_config("smoke", "resnet18", overrides={**tiny, "epochs": 1})
    record = run_group([(cfg, None, "t")], proxy)[cfg.run_hash()]
    assert record.status == "done" and record.checkpoint == str(tmp_path / "checkpoints" / f"{cfg.run_hash()}.pt")
    # A task's claim on a node that died (another host, fresh heartbeat) blocks a plain claim,
    # but the writer knows it was its own task's, which Ray retries only once the first is dead.
    other = build_config("smoke", "vgg16", overrides={**tiny, "epochs": 1})
    proxy.ensure(other.run_hash(), other.to_dict())
    assert proxy.claim(other.run_hash(), "deadnode:123:aaaa") == "claimed"
    assert Store(tmp_path).claim(other.run_hash(), "elsewhere:1:bbbb") == "busy"
    assert proxy.claim(other.run_hash(), "newnode:456:cccc") == "claimed"
    assert [(e.run_id, e.retry) for e in writer.events() if e.kind == "claimed"][-2:] == [
        (other.run_hash(), False), (other.run_hash(), True)]
    with pytest.raises(AttributeError):
        writer.call("transaction")
    writer.release_all()
    assert proxy.get(other.run_hash()).status == "pending" and proxy.get(cfg.run_hash()).status == "done"
