"""The files the deploy layer makes and the paths it writes: a damaged or missing file is named, with the
command that rebuilds it, and rebuilt by that command; a model's latency has one home whatever it was
measured by; output paths that cannot be written are one line; `grid --compress --dry-run` shows every
setting and what is done. Works on copies of the shared tiny `study` (conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdlab.cli import main
from kdlab.deploy import latency
from kdlab.deploy.compress import parse_compress, plan_lines
from kdlab.deploy.runs import artifact_dir, deploy_info
from kdlab.errors import UserError
from kdlab.store import RunRecord, Store

QUICK = ["--batch", "1", "--threads", "1", "--seconds", "0.01"]


@pytest.fixture
def runs(study, tmp_path, monkeypatch) -> Path:
    """A copy of the study's runs dir, and model creation that measures its latency in no time."""
    monkeypatch.setattr(latency, "ON_CREATION_SECONDS", 0.0)
    monkeypatch.setattr(latency, "WARMUP", 1)
    copy = tmp_path / "runs"
    shutil.copytree(study.runs, copy)
    return copy


def _served(runs: Path, source_id: str, quantized: bool = False) -> RunRecord:
    store = Store(runs, readonly=True)
    try:
        return next(r for r in store.runs() if r.config.get("deploy", {}).get("source") == source_id
                    and bool(r.config["deploy"].get("quantize")) == quantized)
    finally:
        store.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(capsys, *args: str) -> str:
    """Run a command that must fail as a user error: exit 2, one line on stderr; returns that line."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_damaged_onnx_file_is_named_by_its_readers_and_rebuilt_by_export(study, runs, tmp_path, capsys):
    fp32 = _served(runs, study.student.run_id)
    path = artifact_dir(runs, fp32.run_id) / "model.onnx"
    recorded = deploy_info(runs, fp32.run_id)["files"]["model.onnx"]
    assert recorded == _sha(path)  # the digest of every file a run makes is kept beside it
    rundir = ["--runs-dir", str(runs)]
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # cut short, as by a copy that stopped
    err = _one_line(capsys, "latency", fp32.run_id, *QUICK, *rundir)
    assert str(path) in err and "damaged" in err and f"kdlab export {study.student.run_id[:8]}" in err
    # The report still lists the run's measured results, marks the file and says so once on stderr.
    assert main(["report", *rundir, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    row = next(r for r in json.loads(out)["deployment"]["synthetic / smoke"] if r["run_id"] == fp32.run_id)
    assert row["file"].startswith("damaged") and err.count(str(path)) == 1
    # `kdlab export` rebuilds it (saying so) and copies a whole file to --out.
    out_file = tmp_path / "student.onnx"
    assert main(["export", study.student.run_id, "--out", str(out_file), *rundir]) == 0
    err = capsys.readouterr().err
    assert "rebuilt" in err and str(path) in err
    assert _sha(path) == deploy_info(runs, fp32.run_id)["files"]["model.onnx"] == _sha(out_file)
    # One byte changed, the size unchanged: the digest sees it. A missing file is named likewise.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "damaged" in _one_line(capsys, "latency", fp32.run_id, *QUICK, *rundir)
    path.unlink()
    assert "missing" in _one_line(capsys, "latency", study.student.run_id, "--runtime", "onnxruntime", *QUICK,
                                  *rundir)


def test_merge_names_a_damaged_file_it_copies(study, runs, tmp_path, capsys):
    fp32 = _served(runs, study.student.run_id)
    path = artifact_dir(runs, fp32.run_id) / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    assert main(["merge", str(runs), "--into", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    moved = artifact_dir(tmp_path / "merged", fp32.run_id) / "model.onnx"
    assert f"warning: {moved} is damaged" in out and f"kdlab export {study.student.run_id[:8]}" in out


def test_compress_rebuilds_a_missing_int8_file_and_lists_its_real_size(study, runs, capsys):
    int8 = _served(runs, study.student.run_id, quantized=True)
    path = artifact_dir(runs, int8.run_id) / "model.onnx"
    size = path.stat().st_size
    path.write_bytes(b"\0" * 100)
    err = _one_line(capsys, "latency", int8.run_id, *QUICK, "--runs-dir", str(runs))
    assert "damaged" in err and f"kdlab compress {study.student.run_id[:8]}" in err and "--quantize int8" in err
    assert main(["compress", study.student.run_id, "--quantize", "int8", "--calibration", "64", "--qat", "never",
                 "--runs-dir", str(runs), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "rebuilt" in err and path.stat().st_size == size
    line = next(ln for ln in out.splitlines() if ln.startswith("student int8"))
    assert f"{size / 1e6:.3f}" in line


def test_damaged_pruned_weights_and_checkpoints_are_one_line(study, runs, capsys):
    pruned = next(r for r in study.made.values() if r.config["model"] == "pruned:resnet18")
    weights = runs / "pruned" / f"{pruned.config['model_args']['sha256'][:16]}.pt"
    good = weights.read_bytes()
    weights.write_bytes(good[:200])
    rundir = ["--runs-dir", str(runs)]
    err = _one_line(capsys, "latency", pruned.run_id, "--runtime", "torch", *QUICK, *rundir)
    assert str(weights) in err and "damaged" in err and "kdlab compress" in err
    # The command it names writes them again.
    assert main(["compress", study.student.run_id, "--prune", "0.5", "--epochs", "1", "--runs-dir", str(runs),
                 "--quiet"]) == 0
    assert main(["latency", pruned.run_id, "--runtime", "torch", *QUICK, *rundir]) == 0
    capsys.readouterr()
    # A trained run's checkpoint with one value changed (torch.load alone does not notice).
    ckpt = runs / "checkpoints" / f"{study.student.run_id}.pt"
    state = torch.load(ckpt, weights_only=True)
    assert "sha256" in state
    state["student"][next(iter(state["student"]))].view(-1)[0] += 1.0
    torch.save(state, ckpt)
    err = _one_line(capsys, "latency", study.student.run_id, "--runtime", "torch", *QUICK, *rundir)
    assert str(ckpt) in err and "damaged" in err
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # and cut short
    assert "damaged" in _one_line(capsys, "latency", study.student.run_id, "--runtime", "torch", *QUICK, *rundir)
    store = Store(runs, create=False)
    with pytest.raises(UserError, match="damaged"):  # what resuming a run reads
        store.load_checkpoint(study.student.run_id)
    store.close()


def test_a_models_latency_has_one_home_whatever_it_was_measured_by(study, runs, tmp_path, capsys):
    fp32 = _served(runs, study.student.run_id)
    home = artifact_dir(runs, fp32.run_id) / "latency.json"
    stale = [{**e, "median_ms": 999.0} for e in json.loads(home.read_text())]
    home.write_text(json.dumps(stale))
    rundir = ["--runs-dir", str(runs)]

    def b1() -> float:
        assert main(["report", *rundir, "--format", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)["deployment"]["synthetic / smoke"]
        return next(r["b1_ms"] for r in rows if r["run_id"] == fp32.run_id)

    # Measured by the trained run's id: the ONNX Runtime figures are its export's, and the table shows them.
    assert main(["latency", study.student.run_id, *QUICK, *rundir]) == 0
    capsys.readouterr()
    assert b1() < 999.0
    # Measured by a file that is a copy of a run's model (by content): they go to that run too.
    home.write_text(json.dumps(stale))
    copy = tmp_path / "elsewhere.onnx"
    shutil.copyfile(artifact_dir(runs, fp32.run_id) / "model.onnx", copy)
    assert main(["latency", str(copy), *QUICK, *rundir]) == 0
    assert f"run {fp32.run_id}" in capsys.readouterr().out
    assert b1() < 999.0
    # PyTorch eager needs the trained model: asked of an ONNX model it is refused, not quietly skipped.
    err = _one_line(capsys, "latency", fp32.run_id, "--runtime", "torch", *QUICK, *rundir)
    assert "--runtime torch" in err and study.student.run_id in err
    assert "--runtime torch" in _one_line(capsys, "latency", str(copy), "--runtime", "torch", *QUICK, *rundir)
    # A file that is not there is named as such, not looked up as a run id.
    err = _one_line(capsys, "latency", str(tmp_path / "missing.onnx"), *rundir)
    assert "does not exist" in err and "give a run id" not in err


def _locked(monkeypatch, *folders: Path) -> None:
    """Folders an ordinary user could not write in (root, who runs these tests here, ignores permission bits)."""
    real = os.access
    locked = {str(f) for f in folders}
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK and str(p) in locked
                        else real(p, mode, *a, **k))


def _tree(*roots: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_size) for root in roots for p in root.rglob("*")
                  if p.is_file() and "kdlab.db" not in p.name)


@pytest.mark.parametrize(("args", "message"), [
    (["export", "STUDENT", "--out", "DIR"], "is a folder"),
    (["export", "STUDENT", "--out", "LOCKED/student.onnx"], "cannot write in"),
    (["export", "STUDENT", "--out", "FILE/student.onnx"], "is not a folder"),
    (["report", "--out", "FILE"], "is not a folder"),
    (["report", "--out", "LOCKED/report"], "cannot write in"),
    (["merge", "RUNS", "--into", "FILE"], "is not a folder"),
    (["merge", "RUNS", "--into", "LOCKED/merged"], "cannot write in"),
    (["bench", "--out", "FILE", "--models", "resnet18", "--preset", "smoke", "--what", "throughput", "--warmup", "0",
      "--steps", "1"], "is not a folder"),
    (["demo", "--runs-dir", "LOCKED/demo"], "cannot write in"),
])
def test_paths_that_cannot_be_written_are_one_line_and_nothing_is_written(study, runs, tmp_path, capsys,
                                                                         monkeypatch, args, message):
    out = tmp_path / "out"
    (out / "DIR").mkdir(parents=True)
    (out / "LOCKED").mkdir()
    (out / "FILE").write_text("a file, not a folder")
    _locked(monkeypatch, out / "LOCKED")
    names = {"STUDENT": study.student.run_id, "RUNS": str(runs)}
    argv = [names.get(a) or (str(out / a) if a.split("/")[0] in ("DIR", "LOCKED", "FILE") else a) for a in args]
    if args[0] in ("export", "report"):
        argv += ["--runs-dir", str(runs)]
    before = _tree(runs, out)
    err = _one_line(capsys, *argv)
    assert message in err
    assert _tree(runs, out) == before


def test_grid_compress_plan_shows_every_setting_and_what_is_done(study, capsys, synthetic_dir):
    store = Store(study.runs, readonly=True)
    planned = [SimpleNamespace(role="distill", run_id=study.student.run_id, label="student")]
    try:
        (done,) = plan_lines(planned, parse_compress("prune=0.5,int8,epochs=1,calibration=64,qat=never"), store)
        (todo,) = plan_lines(planned, parse_compress("prune=0.3,epochs=1"), store)
    finally:
        store.close()
    for setting in ("prune=0.5", "criterion=l1", "epochs=1", "int8", "calibration=64", "qat=never", "opset=20"):
        assert setting in done
    assert "done" in done and "6 of 6" in done
    assert "prune=0.3" in todo and "2 of 4" in todo  # the two exports exist; the 0.3 recovery and its export not
    grid = ["grid", "--teachers", "resnet18", "--students", "resnet18", "--preset", "smoke", "--dataset",
            "synthetic", "--data-dir", str(synthetic_dir), "--runs-dir", str(study.runs), "--dry-run"]
    assert main([*grid, "--compress", "prune=0.5,epochs=2,lr=0.01"]) == 0
    assert "epochs=2" in capsys.readouterr().out
    # Settings that would be dropped are refused, and a bad value names --compress, not another option.
    for spec, words in (("prune=0.5,calibration=64", ("calibration", "int8")),
                        ("prune=0.5,qat=always", ("qat", "int8")), ("int8,criterion=bn", ("criterion", "prune")),
                        ("int8,qat=never,epochs=2", ("epochs",)),
                        ("prune=0.5,epochs=0", ("--compress epochs=0", ">= 1"))):
        err = _one_line(capsys, *grid, "--compress", spec)
        assert all(w in err for w in words) and "--epochs" not in err, err


def test_the_rebuild_command_names_every_option_the_fine_tuning_runs_were_made_with(study, runs):
    import dataclasses

    from kdlab.deploy.files import rebuild_command

    store = Store(runs, readonly=True)
    try:
        by_id = {r.run_id: r for r in store.runs()}
    finally:
        store.close()
    pruned = next(r for r in by_id.values() if r.config["model"] == "pruned:resnet18")
    int8 = _served(runs, pruned.run_id, quantized=True)
    made = rebuild_command(int8, by_id)  # compress at its defaults: nothing but the steps
    assert made.startswith(f"kdlab compress {study.student.run_id[:8]} --prune 0.5 --criterion l1 --epochs 1")
    assert "--lr" not in made and "--set" not in made and "--teacher" not in made
    # The same pruned run as made with --lr, --teacher and --set: the command says so (else it would
    # train other fine-tuning runs instead of finding these).
    config = {**pruned.config, "lr": pruned.config["lr"] * 3, "label_smoothing": 0.1,
              "teacher": study.student.run_id}  # the unpruned student as its teacher, not the student's own
    by_id[pruned.run_id] = dataclasses.replace(pruned, config=config)
    made = rebuild_command(int8, by_id)
    assert f"--lr {pruned.config['lr'] * 3:.10g}" in made and "--set label_smoothing=0.1" in made
    assert f"--teacher {study.student.run_id[:8]}" in made
