"""One run on several processes (DistributedDataParallel over gloo on the CPU, 2 ranks).

- Each rank's slices of a batch, put together, are the batch one process makes (exactly).
- Without BatchNorm, 2 ranks train the model one process trains with the same global batch, to
  float rounding (1e-4 of the update). With BatchNorm they cannot be equal on CPUs: PyTorch's
  SyncBatchNorm exists for GPUs only, so each rank normalises with the statistics of its own half
  of the batch (on GPUs `sync_bn`, on by default, computes them over the global batch).
- A rank killed with SIGKILL stops the whole run, which then resumes from its checkpoint.
- A run on 2 processes is another run than the one-process run (its result differs): its own id.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from kdlab.cli import main
from kdlab.models import ModelSource, create_model, register_source
from kdlab.store import Store

SETTINGS = {"width": 0.125, "dataset": "synthetic", "train_limit": 512, "test_limit": 256, "batch_size": 128,
            "eval_batch_size": 128, "epochs": 1, "lr": 0.02}


def _strip_bn(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        setattr(model, name, nn.Identity()) if isinstance(child, nn.BatchNorm2d) else _strip_bn(child)
    return model


@register_source
class _WithoutBatchNorm(ModelSource):
    """A zoo model with its BatchNorm layers removed: what data parallelism must reproduce exactly."""

    prefix = "test-nobn"

    def create(self, name, width, num_classes, **model_args):
        return _strip_bn(create_model(name, width, num_classes))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, port: int, runs: str, data: str) -> None:
    from kdlab.configure import build_config
    from kdlab.loop import run
    from kdlab.store import Store

    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = build_config("smoke", "test-nobn:resnet18", overrides={**SETTINGS, "data_dir": data})
    run(cfg, Store(runs), silent=True)


def _command(rank: int, world: int, port: int, args: list[str]) -> None:
    """`kdlab ARGS` as rank `rank` of `world` processes (what torchrun starts)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert main(args) == 0


def _student(runs: Path) -> dict[str, torch.Tensor]:
    (path,) = (runs / "checkpoints").glob("*.pt")
    return torch.load(path, weights_only=True)["student"]


def test_shards_of_a_batch_are_the_batch_one_process_makes(synthetic_dir):
    from kdlab.configure import build_config
    from kdlab.data import load_dataset
    from kdlab.distributed import World
    from kdlab.loop import build_loaders

    cfg = build_config("smoke", "resnet18", overrides={**SETTINGS, "data_dir": str(synthetic_dir), "test_limit": 250})
    dataset = load_dataset("synthetic", synthetic_dir)
    one_train, one_test = build_loaders(cfg, dataset, torch.device("cpu"))
    for world in (2, 4):
        shards = [build_loaders(cfg, dataset, torch.device("cpu"), World(r, world, r)) for r in range(world)]
        for split, one in ((0, one_train), (1, one_test)):
            parts = [list(s[split].epoch(1)) for s in shards]
            for b, batch in enumerate(one.epoch(1)):
                got = [p[b] for p in parts]
                mask = torch.cat([g.mask for g in got])
                assert torch.equal(torch.cat([g.x for g in got])[mask], batch.x[batch.mask])
                assert torch.equal(torch.cat([g.y for g in got])[mask], batch.y[batch.mask])
            assert int(sum(g.mask.sum() for p in parts for g in p)) == one.n - (one.n % one.batch_size if split == 0
                                                                                else 0)


def test_two_ranks_train_what_one_process_trains(tmp_path, synthetic_dir):
    _train(0, 1, 0, str(tmp_path / "one"), str(synthetic_dir))
    mp.spawn(_train, args=(2, _free_port(), str(tmp_path / "two"), str(synthetic_dir)), nprocs=2)
    a, b = _student(tmp_path / "one"), _student(tmp_path / "two")
    torch.manual_seed(0)
    init = create_model("test-nobn:resnet18", SETTINGS["width"]).state_dict()
    keys = [k for k, v in a.items() if v.is_floating_point()]
    update_a = torch.cat([(a[k] - init[k]).flatten() for k in keys])
    update_b = torch.cat([(b[k] - init[k]).flatten() for k in keys])
    assert update_a.norm() > 0.1  # it trained
    assert (update_a - update_b).norm() / update_a.norm() < 1e-4


def _descendant_with_rank(parent: int, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            pid, ppid = int(proc.name), int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            while ppid > 1:
                if ppid == parent:
                    return pid
                try:
                    ppid = int(Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    break
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_the_run_which_then_resumes(tmp_path, synthetic_dir, capfd):
    runs = tmp_path / "runs"
    args = ["train", "resnet18", "--preset", "smoke", "--dataset", "synthetic", "--data-dir", str(synthetic_dir),
            "--runs-dir", str(runs), "--set", "width=0.125", "--set", "train_limit=1024", "--set", "test_limit=128",
            "--batch-size", "64", "--set", "eval_batch_size=128", "--epochs", "3", "--quiet", "--nproc", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "kdlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # Once the first epoch's checkpoint is there, rank 1 is killed during the epochs after it (the
        # search goes on while the run lives: on a loaded machine one pass over /proc can take a while).
        deadline, victim = time.time() + 120, None
        while victim is None and time.time() < deadline and proc.poll() is None:
            if (runs / "checkpoints").exists() and list((runs / "checkpoints").glob("*.pt")):
                victim = _descendant_with_rank(proc.pid, 1)
            else:
                time.sleep(0.05)
        assert victim is not None, f"rank 1 not found (the run {'ended' if proc.poll() is not None else 'lives'})"
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "resumes from its last checkpoint" in out
    db = sqlite3.connect(runs / "kdlab.db")
    assert db.execute("SELECT status FROM runs").fetchone()[0] != "done"
    db.close()
    assert main(args) == 0  # the same command again: resumes on 2 processes
    out = capfd.readouterr()
    assert "epoch 1/3" not in out.out + out.err and "epoch 3/3" in out.out + out.err
    db = sqlite3.connect(runs / "kdlab.db")
    assert db.execute("SELECT status, epochs_done FROM runs").fetchone() == ("done", 3)


def test_one_run_only_under_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["grid", "--preset", "smoke", "--dataset", "synthetic", "--runs-dir", str(tmp_path)]) == 2
    assert "torchrun" in capsys.readouterr().err and not (tmp_path / "kdlab.db").exists()


def test_batch_not_divisible_by_the_processes_is_one_line(tmp_path, synthetic_dir, capsys):
    from kdlab.configure import build_config
    from kdlab.data import load_dataset
    from kdlab.distributed import World
    from kdlab.errors import UserError
    from kdlab.loop import build_loaders

    cfg = build_config("smoke", "resnet18", overrides={**SETTINGS, "batch_size": 30})
    with pytest.raises(UserError, match="multiple of the number of processes"):
        build_loaders(cfg, load_dataset("synthetic", synthetic_dir), torch.device("cpu"), World(0, 4, 0))
    assert main(["train", "resnet18", "--nproc", "0", "--runs-dir", str(tmp_path)]) == 2
    assert "--nproc" in capsys.readouterr().err


def test_a_run_on_two_processes_is_not_the_one_process_run(tmp_path, synthetic_dir, capfd):
    # With BatchNorm, 2 processes on CPUs train another model than one process (each normalises with its
    # half of the batch): the same command under torchrun is another run, with an id of its own, even on
    # a runs dir that holds the one-process run; and the two merge without a conflict.
    runs = tmp_path / "runs"
    args = ["train", "resnet18", "--preset", "smoke", "--dataset", "synthetic", "--data-dir", str(synthetic_dir),
            "--runs-dir", str(runs), "--set", "width=0.125", "--set", "train_limit=512", "--set", "test_limit=256",
            "--batch-size", "128", "--set", "eval_batch_size=128", "--epochs", "1", "--quiet"]
    assert main(args) == 0
    (one,) = Store(runs).runs()
    capfd.readouterr()
    mp.spawn(_command, args=(2, _free_port(), args), nprocs=2)
    out = capfd.readouterr().out
    records = {r.run_id: r for r in Store(runs).runs()}
    assert len(records) == 2, "the two-process command returned the stored one-process run"
    (two,) = (r for r in records.values() if r.run_id != one.run_id)
    assert f"run {two.run_id}:" in out and f"run {one.run_id}:" not in out
    assert (one.config["processes"], two.config["processes"]) == (1, 2)
    assert two.status == "done" and two.timing["processes"] == 2
    weights = [torch.load(Store(runs).checkpoint_path(r.run_id), weights_only=True)["student"] for r in (one, two)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # they are not the same run
    # The two runs, trained on two machines, merge side by side.
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    a.import_run(Store(runs).export_run(one.run_id))
    b.import_run(Store(runs).export_run(two.run_id))
    a.close()
    b.close()
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--into", str(tmp_path / "both")]) == 0
    assert "0 found in several, 0 conflicts" in capfd.readouterr().out
