"""Loggers: TensorBoard event files read back with TensorBoard's own reader, MLflow on a local file
store, an unreachable MLflow server, and a logger that fails mid-run (the run goes on)."""

from __future__ import annotations

import os

import pytest

import kdlab
from kdlab.errors import UserError
from kdlab.loggers import LOGGERS, Logger

TWO_EPOCHS = {"epochs": 2, "train_limit": 128, "test_limit": 64}


def test_tensorboard_event_files_hold_every_scalar(tmp_path, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    teacher = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, **TWO_EPOCHS})
    rec = kdlab.distill(teacher.run_id, "resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, **TWO_EPOCHS})
    # <label>.<run id> under RUNS_DIR/tb, as the README says; a run started without a label gets one
    # that says what it is (in the grid's style), so that TensorBoard's run list reads by model and method.
    student_folder = f"resnet18@0.0625_-_{teacher.run_id[:8]}_kd_s0.{rec.run_id}"
    assert {p.name for p in (tmp_path / "tb").iterdir()} == {f"resnet18@0.0625_ce_s0.{teacher.run_id}", student_folder}
    events = EventAccumulator(str(tmp_path / "tb" / student_folder))
    events.Reload()
    scalars = events.Tags()["scalars"]
    expected = {"train/loss", "train/acc", "test/loss", "test/acc", "lr", "time/epoch_s", "terms/ce", "terms/kd"}
    assert expected <= set(scalars)
    for tag in expected:
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    test_acc = [e.value for e in events.Scalars("test/acc")]
    assert test_acc == pytest.approx([h["test_acc"] for h in rec.history])
    assert {"config/text_summary", "report/text_summary"} <= set(events.Tags()["tensors"])
    # Off with a setting.
    kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path / "off", **{**tiny, **TWO_EPOCHS, "tensorboard": False})
    assert not (tmp_path / "off" / "tb").exists()


def _mlflow_runs(store, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks readers of a file store to opt in
    client = MlflowClient(store.resolve().as_uri())
    return client, client.search_runs([client.get_experiment_by_name("kdlab").experiment_id])


def test_mlflow_local_file_store(tmp_path, tiny, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = tmp_path / "mlruns"
    teacher = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, **TWO_EPOCHS})
    rec = kdlab.distill(teacher.run_id, "resnet18", preset="smoke", runs_dir=tmp_path, mlflow=str(store),
                        **{**tiny, **TWO_EPOCHS})
    assert rec.config["mlflow"] == str(store) and rec.run_id == kdlab.distill(
        teacher.run_id, "resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, **TWO_EPOCHS}).run_id
    client, (run,) = _mlflow_runs(store, monkeypatch)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kdlab.run_id"] == rec.run_id and run.data.tags["kdlab.teacher"] == teacher.run_id
    assert run.data.params["method"] == "kd" and run.data.params["temperature"] == str(rec.config["temperature"])
    history = client.get_metric_history(run.info.run_id, "test/acc")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([h["test_acc"] for h in rec.history])
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artefacts == {f"{rec.run_id}.pt", f"{rec.run_id}.md"}  # the checkpoint and the run's report
    # One naming scheme: what MLflow holds is what TensorBoard shows.
    (folder,) = (tmp_path / "tb").glob(f"*.{rec.run_id}")
    events = EventAccumulator(str(folder))
    events.Reload()
    assert set(run.data.metrics) == set(events.Tags()["scalars"]) == {
        "train/loss", "train/acc", "test/loss", "test/acc", "lr", "time/epoch_s", "terms/ce", "terms/kd",
        "final/acc", "final/best_acc", "final/wall_s"}


def test_mlflow_on_a_finished_run_logs_its_stored_record(tmp_path, tiny, monkeypatch, capsys):
    from kdlab.cli import main
    from kdlab.config import Config

    store = tmp_path / "mlruns"
    rec = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, **TWO_EPOCHS})
    capsys.readouterr()
    args = ["train", "resnet18", "--preset", "smoke", "--runs-dir", str(tmp_path), "--mlflow", str(store),
            "--epochs", "2", "--set", "train_limit=128", "--set", "test_limit=64", "--dataset", "synthetic",
            "--data-dir", tiny["data_dir"], *[a for k in ("width", "batch_size", "eval_batch_size")
                                               for a in ("--set", f"{k}={tiny[k]}")]]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert rec.run_id in out and f"run {rec.run_id} finished before: its 2 stored epochs and result are now " \
                                 "logged to mlflow" in err
    client, (run,) = _mlflow_runs(store, monkeypatch)
    assert run.info.status == "FINISHED" and run.data.tags["kdlab.run_id"] == rec.run_id
    assert [m.value for m in client.get_metric_history(run.info.run_id, "test/acc")] == pytest.approx(
        [h["test_acc"] for h in rec.history])
    assert run.data.metrics["final/acc"] == pytest.approx(rec.final_acc)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {f"{rec.run_id}.pt", f"{rec.run_id}.md"}
    # Asked again: said, not logged twice. The grid does the same for the runs it finds finished.
    assert main(args) == 0
    assert "is in mlflow already (MLflow run" in capsys.readouterr().err
    from kdlab.grid_runs import PlannedRun, log_finished_runs

    cfg = Config(**{**rec.config, "mlflow": str(store)})
    log_finished_runs([PlannedRun("teacher", cfg, label="resnet18 s0")], tmp_path)
    assert "is in mlflow already" in capsys.readouterr().err
    assert len(_mlflow_runs(store, monkeypatch)[1]) == 1


def test_an_unreachable_mlflow_server_never_fails_the_run(tmp_path, tiny, capsys):
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused at once.
    rec = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, mlflow="http://127.0.0.1:9",
                      **{**tiny, **TWO_EPOCHS})
    assert rec.status == "done" and rec.epochs_done == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if "logging failed" in line]
    assert len(warnings) == 1 and warnings[0].startswith("kdlab: warning: mlflow logging failed")
    assert not any(k.startswith("MLFLOW_HTTP") for k in os.environ)  # kdlab's fast-fail settings are undone


class _Breaks(Logger):
    """Fails at its second epoch, as a full disk would."""

    name = "breaks"
    calls: list[str] = []

    @classmethod
    def wanted(cls, cfg):
        return True

    def epoch(self, epoch, metrics):
        _Breaks.calls.append(f"epoch {epoch}")
        if epoch == 2:
            raise OSError(28, "No space left on device")

    def close(self):
        _Breaks.calls.append("close")


def test_a_failing_logger_warns_once_and_training_goes_on(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setitem(LOGGERS, "breaks", _Breaks)
    rec = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, **TWO_EPOCHS, "epochs": 3})
    assert rec.status == "done" and rec.epochs_done == 3
    assert _Breaks.calls == ["epoch 1", "epoch 2", "close"]  # dropped after its failure, closed once
    err = capsys.readouterr().err
    assert err.count("breaks logging failed (OSError") == 1


def test_mlflow_without_its_package_is_one_line(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr("kdlab.loggers.base.available", lambda package: package != "mlflow")
    with pytest.raises(UserError, match=r"needs the mlflow package: pip install 'kdlab\[mlflow\]'"):
        kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, mlflow="mlruns", **tiny)
    assert not (tmp_path / "kdlab.db").exists()
