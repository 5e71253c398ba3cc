"""The study grid: planning, skip/resume, two processes on one runs dir, bad input, the demo's report."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from kdlab.cli import main
from kdlab.schedule.plan import GridSpec, plan
from kdlab.schedule.scheduler import run_grid
from kdlab.store import Store

TINY_GRID = ["--preset", "smoke", "--dataset", "synthetic", "--epochs", "1", "--set", "train_limit=128",
             "--set", "test_limit=64", "--batch-size", "64"]


def test_plan_is_the_paper_grid_in_dependency_order(synthetic_dir):
    runs = plan(GridSpec(seeds=2, preset="smoke", dataset="synthetic", data_dir=str(synthetic_dir)))
    assert len(runs) == 30
    roles = [r.role for r in runs]
    assert roles == sorted(roles, key=["teacher", "student", "assistant", "distill"].index)
    by_id = {r.run_id: r for r in runs}
    distill = [r for r in runs if r.role == "distill"]
    assert len(distill) == 18
    for r in distill:
        teacher = by_id[r.depends_on]
        assert teacher.role == "teacher" and teacher.cfg.seed == r.cfg.seed  # KD uses the same seed's teacher
        assert r.cfg.teacher == teacher.run_id and r.cfg.width == 0.0625 and teacher.cfg.width == 0.125
    assert len(by_id) == 30  # every run distinct


def test_plan_methods_without_teacher_and_takd_chains(synthetic_dir):
    runs = plan(GridSpec(teachers=["resnet18"], students=["vgg16"], preset="smoke", methods=["kd", "dml"],
                         assistants=["resnet18@0.75"], dataset="synthetic", data_dir=str(synthetic_dir)))
    labels = [r.label for r in runs]
    assert "vgg16_half dml s0" in labels and [r for r in runs if r.cfg.method == "dml"][0].cfg.teacher is None
    assistant = next(r for r in runs if r.role == "assistant")
    chained = [r for r in runs if r.depends_on == assistant.run_id]
    assert len(chained) == 1 and chained[0].cfg.teacher == assistant.run_id
    assert assistant.cfg.width == pytest.approx(0.75 * 0.125)


@pytest.mark.parametrize("args, message", [
    (["--teachers", "resnet18,alexnet"], "unknown model 'alexnet'"),
    (["--students", "mobilenet"], "unknown model 'mobilenet'"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--methods", "kd,telepathy"], "unknown distillation method 'telepathy'"),
    (["--method-arg", "dkd.beta=2"], "not in --methods"),
])
def test_bad_grid_input(tmp_path, capsys, args, message):
    code = main(["grid", *args, "--runs-dir", str(tmp_path / "runs"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_runs_dir_problems_are_clear(tmp_path, capsys, synthetic_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["grid", *TINY_GRID, "--data-dir", str(synthetic_dir), "--runs-dir", str(blocker)]) == 2
    assert "cannot create runs directory" in capsys.readouterr().err
    old = tmp_path / "old"
    old.mkdir()
    with sqlite3.connect(old / "kdlab.db") as c:
        c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        c.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    before = (old / "kdlab.db").read_bytes()
    assert main(["grid", *TINY_GRID, "--data-dir", str(synthetic_dir), "--runs-dir", str(old)]) == 2
    assert "incompatible" in capsys.readouterr().err
    assert (old / "kdlab.db").read_bytes() == before
    assert main(["report", "--runs-dir", str(tmp_path / "nothing")]) == 2
    assert "no kdlab runs database" in capsys.readouterr().err


def _grid_args(synthetic_dir, runs_dir) -> list[str]:
    return ["grid", "--teachers", "resnet18,vgg16", "--students", "vgg16", *TINY_GRID, "--data-dir",
            str(synthetic_dir), "--runs-dir", str(runs_dir), "--quiet"]


def test_grid_runs_skips_and_resumes(tmp_path, synthetic_dir, capsys):
    runs_dir = tmp_path / "runs"
    assert main(_grid_args(synthetic_dir, runs_dir)) == 0
    assert "5 trained" in capsys.readouterr().out
    store = Store(runs_dir)
    assert len(store.runs("done")) == 5
    # A run interrupted mid-way (its claim left by a dead process) is taken over and finished.
    victim = store.runs()[-1]
    store.truncate_epochs(victim.run_id, 0)
    with store.transaction() as c:
        c.execute("UPDATE runs SET status='running', owner=?, heartbeat=? WHERE run_id=?",
                  (f"{socket.gethostname()}:999999:dead", time.time(), victim.run_id))
    assert main(_grid_args(synthetic_dir, runs_dir)) == 0
    out, err = capsys.readouterr()
    assert "1 trained" in out and "4 skipped" in out
    # Said once: the run, its id and where it resumes (its checkpoint holds its one epoch).
    assert err.count("resuming ") == 1 and f"resuming {victim.label} {victim.run_id[:8]} at epoch 1 of 1" in err
    assert store.get(victim.run_id).status == "done"
    code = main([*_grid_args(synthetic_dir, runs_dir), "--dry-run"])
    assert code == 0 and capsys.readouterr().out.count(" done ") == 5


def test_two_processes_never_run_the_same_run(tmp_path, synthetic_dir):
    runs_dir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "kdlab.cli", *_grid_args(synthetic_dir, runs_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    started = [set(re.findall(r"^run \d+ of \d+: (\w+)", err, re.MULTILINE)) for _, err in outputs]
    assert not started[0] & started[1]  # no run was trained by both
    assert len(started[0] | started[1]) == 5
    for (out, _), mine in zip(outputs, started, strict=True):  # each counts what it trained, and only that
        assert f"{len(mine)} trained, {5 - len(mine)} skipped, 0 failed" in out
    store = Store(runs_dir)
    assert all(r.status == "done" and len(r.history) == 1 for r in store.runs())


def test_report_formats_over_a_partial_grid(tmp_path, synthetic_dir, capsys):
    runs_dir = tmp_path / "runs"
    runs = plan(GridSpec(teachers=["resnet18"], students=["resnet18", "vgg16"], preset="smoke",
                         dataset="synthetic", data_dir=str(synthetic_dir),
                         overrides={"epochs": 1, "train_limit": 128, "test_limit": 64}))
    last = runs[-1]  # planned (a grid records its whole plan) but never trained, as if interrupted
    Store(runs_dir).ensure(last.run_id, last.cfg.to_dict(), last.label, last.role)
    run_grid(runs[:-1], runs_dir, silent=True, log=lambda m: None)
    for fmt in ("md", "csv", "latex"):
        assert main(["report", "--runs-dir", str(runs_dir), "--format", fmt]) == 0
        assert capsys.readouterr().out.strip()
    assert main(["report", "--runs-dir", str(runs_dir), "--format", "json", "--compare-paper",
                 "--out", str(tmp_path / "out")]) == 0
    data = json.loads(capsys.readouterr().out)
    cells = data["studies"][0]["cells"]
    assert len(cells) == 1
    assert {"teacher", "student", "acc", "acc_gain", "time_s", "compression"} <= cells[0].keys()
    assert data["studies"][0]["missing"]
    assert any(p.suffix == ".png" for p in (tmp_path / "out").iterdir())


def test_students_of_one_teacher_share_its_forward(tmp_path, tiny):
    from kdlab.configure import build_config
    from kdlab.loop import run_group
    from kdlab.models import create_model
    from kdlab.teacher import Teacher

    def make_teacher() -> Teacher:
        torch.manual_seed(7)
        return Teacher(create_model("resnet18", 0.125))

    teacher = make_teacher()
    cfgs = [build_config("smoke", s, overrides={**tiny, "method": m, "teacher": "t", "epochs": 1})
            for s, m in (("resnet18", "kd"), ("vgg16", "kd"), ("vgg16", "dkd"))]
    store = Store(tmp_path)
    records = run_group([(c, teacher, None) for c in cfgs], store)
    assert all(r.status == "done" and r.timing["group_size"] == 3 for r in records.values())
    steps = tiny["train_limit"] // tiny["batch_size"]
    assert teacher.forwards == steps  # once per batch, not once per student
    # Side by side changes nothing about a run: alone it reaches the same numbers.
    alone = run_group([(cfgs[1], make_teacher(), None)], Store(tmp_path / "alone"))
    assert alone[cfgs[1].run_hash()].history[0]["test_acc"] == records[cfgs[1].run_hash()].history[0]["test_acc"]


def test_grid_workers_share_one_grid(tmp_path, synthetic_dir, capfd):
    runs_dir = tmp_path / "runs"
    # Runs long enough that the second worker, started with the first, takes its share.
    longer = ["--epochs", "3", "--set", "train_limit=512"]
    assert main([*_grid_args(synthetic_dir, runs_dir), *longer, "--workers", "2"]) == 0
    assert all(r.status == "done" for r in Store(runs_dir).runs()) and len(Store(runs_dir).runs()) == 5
    out, err = capfd.readouterr()  # this process's and its workers' lines
    # The grid's counts, not one worker's; each run numbered once, across the whole grid.
    assert "5 trained, 0 skipped, 0 failed" in out
    # Not anchored at a line's start: the workers write to the same stderr, and a line of theirs may be
    # cut by ours (seen once in about ten runs under load).
    assert sorted(int(k) for k in re.findall(r"\brun (\d+) of 5: ", err)) == [1, 2, 3, 4, 5], err


def _start_on_two_processes(rank: int, port: int, runs_dir: str, cfg) -> None:
    from kdlab.loop import run

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(dataclasses.replace(cfg, processes=2), Store(runs_dir), silent=True)  # as torchrun's build_config makes it


def test_a_start_that_fails_on_input_leaves_no_failed_run(tmp_path, synthetic_dir):
    import torch.multiprocessing as mp

    runs = plan(GridSpec(teachers=["resnet18"], students=["vgg16"], preset="smoke", dataset="synthetic",
                         data_dir=str(synthetic_dir),
                         overrides={"epochs": 1, "train_limit": 128, "test_limit": 64, "batch_size": 33}))
    teacher, runs_dir = runs[0], tmp_path / "runs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # torchrun on 2 processes with a batch of 33: refused (not a multiple of 2), and not the run's failure.
    with pytest.raises(Exception, match="multiple of the number of processes"):
        mp.spawn(_start_on_two_processes, args=(port, str(runs_dir), teacher.cfg), nprocs=2)
    for run_id in (teacher.run_id, dataclasses.replace(teacher.cfg, processes=2).run_hash()):
        rec = Store(runs_dir).get(run_id)
        assert rec is None or rec.status == "pending"
    # So a grid later trains that teacher and its students, in one process, where 33 is fine.
    assert run_grid(runs, runs_dir, silent=True, log=lambda m: None)["trained"] == 3
