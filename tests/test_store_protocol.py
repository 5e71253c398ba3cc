"""The store's one interface (kdlab.store.protocol): every store plays a declared role with explicit
methods, has `is_writer`, and a name outside its role fails loudly."""

from __future__ import annotations

import pytest

from kdlab.configure import build_config
from kdlab.distributed import FollowerStore, LeaderStore
from kdlab.schedule.executors.ray_store import RayStore
from kdlab.store import RunsFollower, RunsReader, RunsWriter, Store, default_runs_dir, open_store
from kdlab.store.protocol import READING, WRITING

OWNER = "testhost:1:abc"


def _declared(cls: type, name: str) -> bool:
    return any(name in vars(klass) for klass in cls.__mro__ if klass is not object)


@pytest.mark.parametrize("cls", [Store, LeaderStore, FollowerStore, RayStore])
def test_every_store_declares_its_whole_role_and_forwards_nothing_by_name(cls):
    missing = [name for name in (*READING, *WRITING, "is_writer") if not _declared(cls, name)]
    assert not missing, f"{cls.__name__} lacks {missing}"
    assert not _declared(cls, "__getattr__")


def test_the_roles_and_unknown_names(tmp_path):
    store = Store(tmp_path)
    leader, follower = LeaderStore(store), FollowerStore(store)
    reader = open_store(tmp_path)  # read-only by default
    assert isinstance(store, RunsWriter) and isinstance(leader, RunsWriter) and isinstance(follower, RunsFollower)
    assert isinstance(reader, RunsReader)
    assert (store.is_writer, leader.is_writer, follower.is_writer, reader.is_writer) == (True, True, False, False)
    for s in (store, leader, follower, reader):
        with pytest.raises(AttributeError):
            s.record_epochs  # noqa: B018 (a typo of record_epoch: loud, never a silent no-op)


def test_a_follower_reads_what_the_writer_wrote_and_writes_nothing(tmp_path):
    cfg = build_config("smoke", "resnet18", overrides={"dataset": "synthetic"})
    run_id = cfg.run_hash()
    store = Store(tmp_path)
    follower = FollowerStore(store)
    follower.ensure(run_id, cfg.to_dict())
    assert store.get(run_id) is None
    leader = LeaderStore(store)
    leader.ensure(run_id, cfg.to_dict(), label="t")
    assert leader.claim(run_id, OWNER) == "claimed"  # one process: the claim is not broadcast anywhere
    follower.record_epoch(run_id, 1, {"test_acc": 1.0})
    follower.finish(run_id, {"final_acc": 1.0, "best_acc": 1.0, "best_epoch": 1, "wall_s": 1.0, "timing": {}})
    follower.save_checkpoint(run_id, {"epoch": 1})
    leader.record_epoch(run_id, 1, {"test_acc": 2.0})
    record = follower.get(run_id)
    assert record.status == "running" and [e["test_acc"] for e in record.history] == [2.0]
    assert not store.checkpoint_path(run_id).exists() and follower.find(run_id[:8]).run_id == run_id


def test_default_runs_dir_and_reading_live_in_the_store_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert default_runs_dir() == tmp_path / "elsewhere"
    from kdlab.errors import UserError

    with pytest.raises(UserError, match="no kdlab runs database"):
        open_store()
    assert not (tmp_path / "elsewhere").exists()  # reading creates nothing
    Store(tmp_path / "elsewhere").close()
    assert open_store().readonly
