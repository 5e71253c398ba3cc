"""What a new user hits at the command line: pipes, read-only runs dirs, seeds, grid widths and counts,
small images."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kdlab
from kdlab.cli import main
from kdlab.grid_runs import GridSpec, plan, run_grid
from kdlab.store import Store

SMALL = {"epochs": 1, "train_limit": 128, "test_limit": 64, "batch_size": 64}


def _spec(synthetic_dir, **extra) -> GridSpec:
    return GridSpec(**{"teachers": ["resnet18"], "students": ["vgg16"], "preset": "smoke", "dataset": "synthetic",
                       "data_dir": str(synthetic_dir), "overrides": dict(SMALL), **extra})


def test_closed_pipe_ends_quietly(tmp_path, synthetic_dir):
    read, write = os.pipe()
    os.close(read)  # `| head` that has already gone: every write fails
    proc = subprocess.run([sys.executable, "-m", "kdlab.cli", "grid", "--dry-run", "--preset", "smoke", "--dataset",
                           "synthetic", "--data-dir", str(synthetic_dir), "--runs-dir", str(tmp_path / "runs")],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


def test_report_reads_a_read_only_runs_dir(tmp_path, tiny, monkeypatch, capsys):
    runs = tmp_path / "runs"
    kdlab.train("resnet18", preset="smoke", runs_dir=runs, **{**tiny, "epochs": 1})
    before = sorted(p.name for p in runs.iterdir())
    runs.chmod(0o555)
    (runs / "kdlab.db").chmod(0o444)
    real_access = os.access
    # Root ignores permission bits; make the check see what an ordinary user would.
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode & os.W_OK and str(p) == str(runs)
                        else real_access(p, mode))
    try:
        assert main(["report", "--runs-dir", str(runs)]) == 0
        assert "resnet18" in capsys.readouterr().out
        assert sorted(p.name for p in runs.iterdir()) == before  # not even a -wal or -shm file
    finally:
        runs.chmod(0o755)


def test_seed_is_the_first_of_the_seeds(synthetic_dir, tmp_path, capsys):
    runs = plan(_spec(synthetic_dir, seeds=2, overrides={**SMALL, "seed": 5}))
    assert sorted({r.cfg.seed for r in runs}) == [5, 6]
    code = main(["grid", "--dry-run", "--preset", "smoke", "--dataset", "synthetic", "--data-dir", str(synthetic_dir),
                 "--runs-dir", str(tmp_path / "runs"), "--seed", "5", "--seeds", "2", "--teachers", "resnet18",
                 "--students", "vgg16"])
    out = capsys.readouterr().out
    assert code == 0 and " s5" in out and " s6" in out and " s0" not in out


def test_grid_takes_the_widths_of_your_study(synthetic_dir, tmp_path, capsys):
    runs = plan(_spec(synthetic_dir, teachers=["resnet18", "vgg16@0.5"], teacher_width=0.25, student_width=0.03125))
    widths = {(r.role, r.cfg.model, r.cfg.width) for r in runs if r.cfg.method == "ce"}
    assert widths == {("teacher", "resnet18", 0.25), ("teacher", "vgg16", 0.5), ("student", "vgg16", 0.03125)}
    assert all(r.cfg.width == 0.03125 for r in runs if r.role == "distill")
    base = ["grid", "--dry-run", "--preset", "smoke", "--dataset", "synthetic", "--data-dir", str(synthetic_dir),
            "--runs-dir", str(tmp_path / "runs")]
    for setting, hint in (("width=0.5", "--teacher-width"), ("model=vgg16", "--teachers"),
                          ("method=kd", "--methods")):
        assert main([*base, "--set", setting]) == 2
        err = capsys.readouterr().err
        assert hint in err and err.count("\n") == 1
    assert main([*base, "--teachers", "resnet18@0"]) == 2 and "width > 0" in capsys.readouterr().err


def test_grid_counts_what_this_process_trained(tmp_path, synthetic_dir, monkeypatch):
    from kdlab import grid_runs as grid

    runs = plan(_spec(synthetic_dir))
    real = grid.run_group

    def another_process_finishes_it_first(specs, store, **kwargs):
        cfg = specs[0][0]
        if (cfg.model, cfg.method) == ("vgg16", "ce"):
            other = Store(tmp_path / "runs")
            assert other.claim(cfg.run_hash(), "elsewhere:1:x") == "claimed"
            other.finish(cfg.run_hash(), {"final_acc": 50.0, "best_acc": 50.0, "best_epoch": 1, "wall_s": 1.0,
                                          "timing": {}})
            other.close()
        return real(specs, store, **kwargs)

    monkeypatch.setattr(grid, "run_group", another_process_finishes_it_first)
    counts = run_grid(runs, tmp_path / "runs", silent=True, log=lambda m: None)
    assert (counts["trained"], counts["skipped"], counts["failed"]) == (2, 1, 0)
    store = Store(tmp_path / "runs")
    assert {r.role for r in store.runs()} == {"teacher", "student", "distill"}  # the plan, recorded


@pytest.mark.parametrize("size", [8, 12, 16])
def test_every_model_runs_on_small_images(size):
    from kdlab.models import create_model, input_size_note, list_models

    for name in list_models():
        model = create_model(name, 0.0625).eval()
        with torch.no_grad():
            feats, logits = model.forward_with_features(torch.randn(2, 3, size, size))
        assert logits.shape == (2, 10) and all(min(f.shape[-2:]) >= 1 for f in feats)
        assert f"designed for 32x32 images and these are {size}x{size}" in input_size_note(name, (size, size))
    assert input_size_note("vgg16", (32, 32)) is None


def test_small_images_train_with_a_warning(tmp_path, image_folder, capsys):
    folder = image_folder(size=8)
    for model in ("vgg16", "densenet121"):
        code = main(["train", model, "--preset", "smoke", "--dataset", str(folder), "--runs-dir", str(tmp_path / "r"),
                     "--epochs", "1", "--batch-size", "8", "--width", "0.0625", "--quiet"])
        err = capsys.readouterr().err
        assert code == 0 and "Traceback" not in err
        assert f"kdlab: warning: {model} was designed for 32x32 images and these are 8x8" in err
