"""Training, distillation, the store and resume: behaviour on tiny models and synthetic data."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kdlab
from kdlab.configure import build_config
from kdlab.data.loader import CENTER_VIEW, NUM_VIEWS, DeviceLoader, augment_views
from kdlab.loop import lr_factor
from kdlab.store import Store


def test_train_records_everything(tmp_path, tiny):
    rec = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **tiny)
    assert rec.status == "done" and rec.epochs_done == 2
    assert [h["epoch"] for h in rec.history] == [1, 2]
    assert rec.final_acc == rec.history[-1]["test_acc"]  # the last epoch's, never the best's
    assert rec.best_acc == max(h["test_acc"] for h in rec.history)
    assert rec.params > rec.paper_params > 0
    assert rec.device and rec.versions["torch"] == torch.__version__
    assert set(rec.timing) >= {"data_s", "teacher_s", "student_s", "eval_s", "wall_s"}
    assert rec.config["model"] == "resnet18" and rec.config["width"] == 0.0625
    assert Path(rec.checkpoint).exists()


def test_learns_on_synthetic_data(tmp_path, tiny):
    rec = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, "epochs": 3, "train_limit": 2000,
                                                                         "test_limit": 500, "width": 0.125})
    assert rec.final_acc > 40.0  # 10 classes: chance is 10%


def test_finished_run_returns_at_once(tmp_path, tiny, monkeypatch):
    first = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **tiny)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr("kdlab.training.dataset_for", no_training)
    again = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **tiny)
    assert again.run_id == first.run_id and again.final_acc == first.final_acc


def test_distill_from_run_id_and_from_checkpoint(tmp_path, tiny):
    teacher = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, "width": 0.125})
    student = kdlab.distill(teacher.run_id[:6], "vgg16", preset="smoke", runs_dir=tmp_path, **tiny)
    assert student.status == "done"
    assert student.config["teacher"] == teacher.run_id and student.config["method"] == "kd"
    assert student.config["temperature"] == 4.0 or student.config["temperature"] > 0
    assert student.history[-1]["terms"].keys() == {"ce", "kd"}
    assert student.timing["teacher_s"] > 0
    from_file = kdlab.distill(teacher.checkpoint, "vgg16", preset="smoke", runs_dir=tmp_path, **tiny)
    assert from_file.config["teacher"].startswith("file:")


def test_distill_from_bare_state_dict(tmp_path, tiny):
    from kdlab.models import create_model

    path = tmp_path / "teacher.pt"
    torch.save(create_model("resnet18", 0.125).state_dict(), path)
    with pytest.raises(kdlab.UserError, match="--teacher-model"):
        kdlab.distill(path, "resnet18", preset="smoke", runs_dir=tmp_path, **tiny)
    with pytest.raises(kdlab.UserError, match="does not fit"):
        kdlab.distill(path, "resnet18", teacher_model="vgg16", teacher_width=0.125, preset="smoke",
                      runs_dir=tmp_path, **tiny)
    rec = kdlab.distill(path, "resnet18", teacher_model="resnet18", teacher_width=0.125, preset="smoke",
                        runs_dir=tmp_path, **{**tiny, "epochs": 1})
    assert rec.status == "done"


def test_online_distillation_needs_no_teacher(tmp_path, tiny):
    rec = kdlab.distill(None, "resnet18", method="dml", preset="smoke", runs_dir=tmp_path, **{**tiny, "epochs": 1})
    assert rec.status == "done" and rec.config["teacher"] is None and "peer1_ce" in rec.history[0]["terms"]


def test_teacher_gets_no_gradients_and_stays_in_eval(tiny):
    from kdlab.data import load_dataset
    from kdlab.job import build
    from kdlab.loop import build_loaders
    from kdlab.models import create_model
    from kdlab.teacher import Teacher

    cfg = build_config("smoke", "resnet18", overrides={**tiny, "method": "kd", "teacher": "x"})
    teacher_model = create_model("resnet18", 0.125)
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    teacher = Teacher(teacher_model)
    dataset = load_dataset("synthetic", tiny["data_dir"])
    s = build(cfg, dataset, teacher_model)
    batch = next(build_loaders(cfg, dataset, s.device)[0].epoch(0))
    logits, terms = s.method(s.student, batch, teacher)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher_model.parameters())
    assert not teacher_model.training
    after = teacher_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched too
    assert not any(p is q for p in s.optimizer.param_groups[0]["params"] for q in teacher_model.parameters())


def test_nan_loss_fails_run_with_epoch_and_step(tmp_path, tiny):
    rec = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, "lr": 1e12})
    assert rec.status == "failed"
    assert "epoch 1, step" in rec.error


def test_lr_schedules():
    paper_vgg = build_config("paper", "vgg16")
    assert paper_vgg.scheduler == "multistep" and paper_vgg.momentum == 0.9
    assert [lr_factor(paper_vgg, e, 0, 10) for e in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    paper_resnet = build_config("paper", "resnet18")
    assert paper_resnet.scheduler == "cosine" and paper_resnet.momentum == 0.95
    assert lr_factor(paper_resnet, 0, 5, 10) == 1.0 and lr_factor(paper_resnet, 50, 0, 10) == pytest.approx(0.5)
    fast = build_config("fast", "resnet18")
    peak = round(fast.warmup * fast.epochs * 10)
    assert lr_factor(fast, 0, 0, 10) < 0.01 and lr_factor(fast, peak // 10, peak % 10, 10) == pytest.approx(1.0)
    assert lr_factor(fast, fast.epochs - 1, 9, 10) < 0.01


def test_augmentation_views_are_exact_crops_and_flips():
    padded = torch.arange(2 * 3 * 10 * 10, dtype=torch.int64).view(2, 3, 10, 10)
    index = torch.tensor([0, 1, 1])
    size = 2
    # view 0: top-left crop; CENTER_VIEW: the unshifted image; +81: flipped.
    views = torch.tensor([0, CENTER_VIEW, CENTER_VIEW + 81])
    out = augment_views(padded, index, views, size)
    assert torch.equal(out[0], padded[0, :, 0:2, 0:2])
    assert torch.equal(out[1], padded[1, :, 4:6, 4:6])
    assert torch.equal(out[2], padded[1, :, 4:6, 4:6].flip(2))
    assert NUM_VIEWS == 162


def test_loader_epochs_are_reproducible(synthetic_dir):
    from kdlab.data import load_dataset

    ds = load_dataset("synthetic", synthetic_dir)
    def make() -> DeviceLoader:
        return DeviceLoader(ds.train, 32, torch.device("cpu"), train=True, mean=[0.5] * 3, std=[0.25] * 3, seed=3,
                            limit=100)

    a, b = list(make().epoch(2)), list(make().epoch(2))
    assert len(a) == 3  # the partial last batch is dropped: static shapes for compiled graphs
    assert all(torch.equal(x.x, y.x) and torch.equal(x.view, y.view) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].index, next(make().epoch(3)).index)


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdlab.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _train_args(tiny: dict, runs: Path, epochs: int) -> list[str]:
    return ["train", "resnet18", "--preset", "smoke", "--dataset", "synthetic", "--data-dir", tiny["data_dir"],
            "--runs-dir", str(runs), "--epochs", str(epochs), "--width", "0.0625", "--quiet",
            "--set", "train_limit=1024", "--set", "test_limit=128", "--batch-size", "32"]


def _epochs_done(runs: Path) -> int:
    try:
        with sqlite3.connect(runs / "kdlab.db") as c:
            row = c.execute("SELECT max(epochs_done) FROM runs").fetchone()
    except sqlite3.Error:
        return 0
    return row[0] or 0


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, tiny):
    epochs = 4
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _cli(*_train_args(tiny, killed, epochs))
    deadline = time.time() + 120
    while _epochs_done(killed) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    time.sleep(0.3)  # kill somewhere inside epoch 2, mid-step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(killed / "kdlab.db") as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        status, done = c.execute("SELECT status, epochs_done FROM runs").fetchone()
    assert status == "running" and 1 <= done < epochs
    resumed = _cli(*_train_args(tiny, killed, epochs))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"epoch 1/{epochs}" not in err  # it continued, it did not start over
    full = _cli(*_train_args(tiny, clean, epochs))
    out_full, err_full = full.communicate(timeout=300)
    assert full.returncode == 0, err_full
    a, b = Store(killed).runs()[0], Store(clean).runs()[0]
    assert [h["epoch"] for h in a.history] == list(range(1, epochs + 1))
    assert all(h["time_s"] is not None for h in a.history)  # epochs replayed from the checkpoint keep their time
    assert a.run_id == b.run_id
    # Same data order, same weights, same optimiser state: the resumed run is the same run.
    assert [h["test_acc"] for h in a.history] == [h["test_acc"] for h in b.history]
    assert [h["train_loss"] for h in a.history] == pytest.approx([h["train_loss"] for h in b.history], rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["train", "nosuchnet"], "unknown model"),
    (["train", "resnet18", "--width", "0"], "width must be > 0"),
    (["train", "resnet18", "--dataset", "imagenet"], "dataset"),
    (["train", "resnet18", "--epochs", "0"], "epochs must be >= 1"),
    (["train", "resnet18", "--preset", "slow"], "unknown preset"),
    (["train", "resnet18", "--set", "colour=red"], "unknown setting 'colour'"),
    (["train", "resnet18", "--set", "lr=fast"], "setting 'lr'"),
    (["distill", "--teacher", "nope", "--student", "resnet18"], "neither a checkpoint file nor a run"),
    (["distill", "--teacher", "T", "--student", "resnet18", "--temperature", "0"], "temperature must be > 0"),
    (["distill", "--teacher", "T", "--student", "resnet18", "--alpha", "1.5"], "alpha must be in [0, 1]"),
    (["distill", "--teacher", "T", "--student", "resnet18", "--method", "magic"], "unknown method"),
    (["distill", "--student", "resnet18"], "method 'kd' needs a teacher"),
])
def test_bad_input_is_one_line_exit_2_and_db_untouched(tmp_path, tiny, capsys, monkeypatch, args, message):
    from kdlab.cli import main

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    kdlab.train("resnet18", preset="smoke", runs_dir=runs, **{**tiny, "epochs": 1})
    (tmp_path / "T").write_bytes(_checkpoint_bytes(runs))
    before = _db_dump(runs)
    capsys.readouterr()  # what training the teacher said; the command's own output is what is checked
    preset = [] if "--preset" in args else ["--preset", "smoke"]
    code = main([*args, *preset, "--runs-dir", str(runs), "--data-dir", tiny["data_dir"]])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert _db_dump(runs) == before


def _checkpoint_bytes(runs: Path) -> bytes:
    return next((runs / "checkpoints").glob("*.pt")).read_bytes()


def _db_dump(runs: Path) -> list[str]:
    with sqlite3.connect(runs / "kdlab.db") as c:
        return list(c.iterdump())


def test_bad_files_are_one_line_errors(tmp_path, tiny, capsys, monkeypatch):
    from kdlab.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_a_ckpt.pt").write_text("hello")
    (tmp_path / "bad.yaml").write_text("epochs: 3\nmystery: 1\n")
    (tmp_path / "type.yaml").write_text("epochs: three\n")
    (tmp_path / "empty_data").mkdir()
    cases = [
        (["distill", "--teacher", "not_a_ckpt.pt", "--student", "resnet18"], "not a PyTorch checkpoint"),
        (["train", "resnet18", "--config", "bad.yaml"], "unknown setting 'mystery' in config file"),
        (["train", "resnet18", "--config", "type.yaml"], "setting 'epochs' in config file must be int"),
        (["train", "resnet18", "--config", "missing.yaml"], "cannot read config file"),
        (["train", "resnet18", "--dataset", str(tmp_path / "empty_data")], "train"),
    ]
    for args, message in cases:
        code = main([*args, "--runs-dir", "runs", "--preset", "smoke"])
        err = capsys.readouterr().err
        assert code == 2, args
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs" / "kdlab.db").exists()


def test_console_script_prints_no_traceback(tmp_path):
    proc = _cli("train", "resnet18", "--width", "-1", "--runs-dir", str(tmp_path / "r"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.startswith("kdlab: error: width must be > 0") and "Traceback" not in err


def test_models_command_json(capsys):
    import json

    from kdlab.cli import main

    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    counts = {(r["name"], r["width"]): r["paper_params"] for r in rows}
    assert counts[("vgg16", 1.0)] == 15239872 and counts[("densenet121", 0.5)] == 1725024
    assert {"name", "width", "params", "paper_params"} <= rows[0].keys()
    assert ("densenet121_cifar", 1.0) in counts


def test_prepared_teacher_uses_its_compiled_forward():
    from kdlab.loop import prepare_teacher
    from kdlab.models import create_model

    cfg = build_config("smoke", "resnet18", overrides={"compile": "default"})
    teacher = prepare_teacher(create_model("resnet18", 0.0625), cfg)
    # A compiled module has no truth value: the teacher must not test it with `or` (a bug once).
    assert teacher._forward is not teacher.model and not teacher.model.training


def test_early_stopped_teacher_snapshot(tmp_path, tiny):
    from kdlab.reporting import build_report, render
    from kdlab.store import Store

    teacher = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, "width": 0.125, "snapshots": [1]})
    assert (tmp_path / "checkpoints" / f"{teacher.run_id}@1.pt").exists()
    student = kdlab.distill(f"{teacher.run_id[:8]}@1", "resnet18", method="eskd", preset="smoke", runs_dir=tmp_path,
                            **{**tiny, "epochs": 2})
    assert student.status == "done" and student.config["teacher"] == f"{teacher.run_id}@1"
    with pytest.raises(kdlab.UserError, match="no snapshot after epoch 2"):
        kdlab.distill(f"{teacher.run_id}@2", "resnet18", preset="smoke", runs_dir=tmp_path, **tiny)
    assert "resnet18@ep1" in render(build_report(Store(tmp_path)), "md")


def test_train_on_a_folder_of_images(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        for label, name in enumerate(("cat", "dog")):
            folder = tmp_path / "pets" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8) + np.uint8(120 * label)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    rec = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path / "runs", dataset=str(tmp_path / "pets"),
                      width=0.0625, epochs=2, batch_size=16)
    assert rec.status == "done" and rec.final_acc > 50.0  # two classes a brightness apart
