"""The grid on Ray: a local 2-CPU cluster gives the local grid's runs, survives a killed worker, and skips
the students of a failed teacher; the store proxy keeps Store's interface."""

from __future__ import annotations

import inspect
import os
import signal
import sqlite3
import threading
import time

import pytest
import torch

from kdlab.cli import main
from kdlab.grid_runs import GridSpec, plan
from kdlab.loop import run_group
from kdlab.store import Store
from kdlab.store_proxy import FORWARDED, StoreProxy, StoreWriter

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
    from kdlab.ray_grid import run_grid_ray

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
    counts = run_grid_ray([teacher], runs_dir, "auto", log=lambda m: None)
    killer.join()
    assert "pid" in seen and seen["at"] < 12  # it was killed mid-run
    assert counts == {"trained": 1, "skipped": 0, "failed": 0}
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
    from kdlab.ray_grid import run_grid_ray

    runs = plan(GridSpec(teachers=["resnet18"], students=["vgg16"], preset="smoke", dataset="synthetic",
                         data_dir=str(synthetic_dir), overrides={"epochs": 1, "train_limit": 128, "test_limit": 64}))
    teacher, alone, distilled = runs
    runs_dir = tmp_path / "runs"
    # A directory where the teacher's checkpoint goes: loading it fails (an OSError, retried once).
    (runs_dir / "checkpoints" / f"{teacher.run_id}.pt").mkdir(parents=True)
    logs: list[str] = []
    counts = run_grid_ray(runs, runs_dir, "auto", retries=1, log=logs.append)
    assert counts == {"trained": 1, "skipped": 0, "failed": 2}
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


def test_store_proxy_has_the_interface_of_store():
    def public(cls: type) -> set[str]:
        return {n for n, v in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}

    assert public(StoreProxy) == public(Store)
    # What is not forwarded to the writer runs where the proxy is: the checkpoint files. A new
    # database method on Store must be added to FORWARDED (or it would fail on a remote node).
    local = public(Store) - set(FORWARDED) - {"reopen", "close", "transaction"}
    assert local == {"checkpoint_path", "save_checkpoint", "load_checkpoint", "save_snapshot"}
    assert all(getattr(StoreProxy, n) is not getattr(Store, n) for n in FORWARDED)


def test_the_loop_trains_through_the_proxy_and_a_retry_takes_over_its_claim(tmp_path, tiny):
    from kdlab.config import build_config

    writer = StoreWriter(tmp_path)
    proxy = StoreProxy(tmp_path, writer.call)
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
    with pytest.raises(AttributeError):
        writer.call("transaction")
    writer.release_all()
    assert proxy.get(other.run_hash()).status == "pending" and proxy.get(cfg.run_hash()).status == "done"
