"""A run's identity covers its data: fingerprints, folders as locations, stores from before, teachers' data."""

from __future__ import annotations

import json
import sqlite3

import pytest

import kdlab
from kdlab.config import Config
from kdlab.configure import bind_dataset, build_config
from kdlab.data import identify_dataset
from kdlab.reporting.naming import recipe
from kdlab.store import SCHEMA_VERSION, Store

RUN = {"epochs": 1, "batch_size": 8, "width": 0.0625}


def _train(folder, runs, **extra):
    return kdlab.train("resnet18", preset="smoke", runs_dir=runs, dataset=str(folder), **{**RUN, **extra})


def test_same_name_other_data_is_another_run(tmp_path, image_folder, monkeypatch):
    runs = tmp_path / "runs"
    first = image_folder("digits", classes=2, where=tmp_path / "a")
    monkeypatch.chdir(tmp_path / "a")
    old = _train("digits", runs)  # a relative name, as a user types it
    # Another folder that happens to have the same relative name, with other classes: a new run.
    image_folder("digits", classes=3, where=tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    other = _train("digits", runs)
    assert other.run_id != old.run_id and other.config["data_info"]["classes"] == 3
    # The first folder by its absolute path is the first run, found at once (not a duplicate).
    assert _train(first, runs).run_id == old.run_id
    # The same images copied elsewhere are the same data; one image more is other data.
    copy = image_folder("elsewhere", classes=2, where=tmp_path / "c")
    assert identify_dataset(str(copy)).fingerprint == old.config["data_fingerprint"]
    image_folder("digits", classes=2, per_class=13, where=tmp_path / "a")
    assert identify_dataset(str(first)).fingerprint != old.config["data_fingerprint"]
    assert len(Store(runs).runs()) == 2


def test_fingerprint_is_cached_beside_the_arrays(tmp_path, image_folder, monkeypatch):
    folder = image_folder()
    first = identify_dataset(str(folder))
    assert first.location == str(folder.resolve()) and first.info["image_size"] == [8, 8]

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached fingerprint must not decode the images again")

    monkeypatch.setattr("kdlab.data.cache.build", no_decoding)
    assert identify_dataset(str(folder)) == first


def test_data_is_hashed_by_content_not_by_name():
    a = build_config("smoke", "resnet18", overrides={"dataset": "/x/digits"})
    b = build_config("smoke", "resnet18", overrides={"dataset": "/y/other"})
    assert a.run_hash() != b.run_hash()  # unbound: the names are all there is
    a.data_fingerprint = b.data_fingerprint = "0123456789abcdef"
    assert a.run_hash() == b.run_hash()
    with pytest.raises(kdlab.UserError, match="computed by kdlab"):
        build_config("smoke", "resnet18", overrides={"data_fingerprint": "x"})


_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (run_id TEXT PRIMARY KEY, config_json TEXT NOT NULL, model TEXT NOT NULL, width REAL NOT NULL,
    method TEXT NOT NULL, teacher TEXT, dataset TEXT NOT NULL, seed INTEGER NOT NULL, label TEXT, status TEXT NOT NULL,
    owner TEXT, heartbeat REAL, created REAL NOT NULL, started REAL, finished REAL,
    epochs_done INTEGER NOT NULL DEFAULT 0, final_acc REAL, best_acc REAL, best_epoch INTEGER, wall_s REAL,
    timing_json TEXT, device TEXT, versions_json TEXT, params INTEGER, paper_params INTEGER, peak_mem_bytes INTEGER,
    error TEXT);
CREATE TABLE epochs (run_id TEXT NOT NULL REFERENCES runs(run_id), epoch INTEGER NOT NULL, train_loss REAL,
    train_acc REAL, test_loss REAL, test_acc REAL, lr REAL, time_s REAL, terms_json TEXT, PRIMARY KEY (run_id, epoch));
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_store_from_before_fingerprints_keeps_working(tmp_path, tiny):
    runs = tmp_path / "runs"
    runs.mkdir()
    old_cfg = build_config("smoke", "resnet18", overrides={**tiny, "epochs": 1})
    with sqlite3.connect(runs / "kdlab.db") as c:
        c.executescript(_SCHEMA_1)
        c.execute("INSERT INTO runs (run_id, config_json, model, width, method, dataset, seed, status, created, "
                  "final_acc, epochs_done) VALUES (?, ?, 'resnet18', ?, 'ce', 'synthetic', 0, 'done', 0, 55.0, 1)",
                  (old_cfg.run_hash(), json.dumps(old_cfg.to_dict()), old_cfg.width))
    # Read-only (a report) reads schema 1 as it is; opening to write migrates it.
    assert Store(runs, readonly=True).get(old_cfg.run_hash()).final_acc == 55.0
    store = Store(runs)
    assert store._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION)
    old = store.get(old_cfg.run_hash())
    assert old.final_acc == 55.0 and old.health is None and old.role is None
    # The same command now identifies the data: a new run, never the old one for data it cannot vouch for.
    new = kdlab.train("resnet18", preset="smoke", runs_dir=runs, **{**tiny, "epochs": 1})
    assert new.run_id != old.run_id and new.config["data_fingerprint"]
    assert old_cfg.run_hash() == old.run_id  # old ids are unchanged, so teachers named by id still resolve


def test_teacher_on_other_data_is_refused(tmp_path, image_folder, capsys):
    from kdlab.cli import main

    runs = tmp_path / "runs"
    small = image_folder("small", size=8)
    large = image_folder("large", size=16)
    teacher = _train(large, runs, width=0.125)
    capsys.readouterr()
    args = ["distill", "--teacher", teacher.run_id, "--student", "resnet18", "--preset", "smoke", "--dataset",
            str(small), "--runs-dir", str(runs), "--epochs", "1", "--batch-size", "8", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "images of another size" in err and "16x16" in err and "8x8" in err and "--allow-other-data" in err
    assert err.count("\n") == 1 and len(Store(runs).runs()) == 1
    assert main([*args, "--allow-other-data"]) == 0
    assert len(Store(runs).runs()) == 2


def test_bound_config_hash_ignores_where_the_data_is(synthetic_dir):
    cfg = build_config("smoke", "resnet18", overrides={"dataset": "synthetic", "data_dir": str(synthetic_dir)})
    bound = bind_dataset(cfg)
    moved = bind_dataset(cfg)
    moved.data_dir = "/elsewhere"
    assert bound.run_hash() == moved.run_hash() and bound.data_info["name"] == "synthetic"


def test_a_one_process_run_keeps_its_id_and_a_run_on_several_is_another(monkeypatch):
    # Ids from before the number of processes entered the identity (issue 18, item 6): unchanged.
    assert Config().run_hash() == "bf1dfd7e2e923a2b"
    overrides = {"width": 0.125, "method": "dkd", "teacher": "abc"}
    one = build_config("smoke", "resnet18", overrides=overrides)
    assert one.processes == 1 and one.run_hash() == "c8e1e7f6bd16e710"
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun
    monkeypatch.setenv("RANK", "0")
    two = build_config("smoke", "resnet18", overrides=overrides)
    assert two.processes == 2 and two.run_hash() != one.run_hash()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(kdlab.UserError, match="'processes'.*computed by kdlab"):
        build_config("smoke", "resnet18", overrides={"processes": 2})
    # The report reads a run stored before the field existed as one process: no recipe of its own.
    stored = one.to_dict()
    del stored["processes"]
    assert recipe(stored) == "" and recipe(two.to_dict()) == "processes=2"


def test_a_whole_number_for_a_float_method_argument_is_the_same_run():
    # `--method-arg dkd.beta=4` reads as the integer 4; from Python or YAML it may be 4.0. One setting, one run.
    ids = {build_config("smoke", "vgg16", overrides={"method": "dkd", "teacher": "t", "method_args": {"beta": b}})
           .run_hash() for b in (4, 4.0)}
    assert len(ids) == 1
    cfg = build_config("smoke", "vgg16", overrides={"method": "dkd", "teacher": "t", "method_args": {"beta": 4}})
    assert cfg.method_args == {"beta": 4.0} and type(cfg.method_args["beta"]) is float
