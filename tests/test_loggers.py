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
    folders = sorted(p.name for p in (tmp_path / "tb").iterdir())
    assert folders == sorted([teacher.run_id, rec.run_id])  # by label (here the id) under RUNS_DIR/tb
    events = EventAccumulator(str(tmp_path / "tb" / rec.run_id))
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


def test_mlflow_local_file_store(tmp_path, tiny, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    teacher = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, **TWO_EPOCHS})
    rec = kdlab.distill(teacher.run_id, "resnet18", preset="smoke", runs_dir=tmp_path, mlflow=str(store),
                        **{**tiny, **TWO_EPOCHS})
    assert rec.config["mlflow"] == str(store) and rec.run_id == kdlab.distill(
        teacher.run_id, "resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, **TWO_EPOCHS}).run_id
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks readers of a file store to opt in
    client = MlflowClient(store.resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("kdlab").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["kdlab.run_id"] == rec.run_id and run.data.tags["kdlab.teacher"] == teacher.run_id
    assert run.data.params["method"] == "kd" and run.data.params["temperature"] == str(rec.config["temperature"])
    history = client.get_metric_history(run.info.run_id, "test_acc")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([h["test_acc"] for h in rec.history])
    assert {"terms.ce", "terms.kd", "lr", "time_s", "final_acc"} <= set(run.data.metrics)
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artefacts == {f"{rec.run_id}.pt", f"{rec.run_id}.md"}  # the checkpoint and the run's report


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
