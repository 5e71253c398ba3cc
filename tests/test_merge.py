"""Runs from several machines: `kdlab merge` and `kdlab report --runs-dir A --runs-dir B` (fake runs, no training,
except one real run that resumes after being merged)."""

from __future__ import annotations

import json

import torch

from kdlab.cli import main
from kdlab.configure import build_config
from kdlab.store import Store

OWNER = "testhost:1:abc"


def _cfg(model: str, seed: int, width: float = 0.125, **extra):
    return build_config("smoke", model, overrides={"width": width, "seed": seed, "dataset": "synthetic", **extra})


def _add(store: Store, cfg, acc: float, status: str = "done", wall: float = 10.0) -> str:
    """A run as the training loop leaves it, with a checkpoint file and a snapshot after epoch 1."""
    run_id = cfg.run_hash()
    store.ensure(run_id, cfg.to_dict(), label=f"{cfg.model} {cfg.method} s{cfg.seed}")
    assert store.claim(run_id, OWNER) == "claimed"
    for epoch in (1, 2):
        store.record_epoch(run_id, epoch, {"test_acc": acc - 2 + epoch, "train_loss": 1.0 / epoch})
    store.checkpoint_path(run_id).write_bytes(f"weights of {run_id} at {acc}".encode())
    store.checkpoint_path(run_id, 1).write_bytes(b"snapshot")
    if status == "done":
        store.finish(run_id, {"final_acc": acc, "best_acc": acc, "best_epoch": 2, "wall_s": wall,
                              "timing": {"wall_s": wall}})
    return run_id


def _study(store: Store, seed: int, shift: float = 0.0) -> dict[str, str]:
    """A teacher, its student alone and the student distilled from it, for one seed."""
    teacher = _add(store, _cfg("resnet18", seed), 80.0 + seed + shift)
    alone = _add(store, _cfg("vgg16", seed, 0.0625), 70.0 + seed + shift)
    kd = _add(store, _cfg("vgg16", seed, 0.0625, method="kd", teacher=teacher), 72.0 + seed + shift)
    return {"teacher": teacher, "alone": alone, "kd": kd}


def test_merge_copies_runs_and_checkpoints_and_never_overwrites_a_conflict(tmp_path, capsys):
    a, b, dst = (tmp_path / n for n in ("a", "b", "dst"))
    store_a, store_b = Store(a), Store(b)
    seed0 = _study(store_a, 0)
    assert _study(store_b, 0) == seed0  # the same runs, with the same results, on both machines
    only_b = _study(store_b, 1)
    clash = _add(store_a, _cfg("densenet121", 0), 60.0)
    assert _add(Store(b), _cfg("densenet121", 0), 61.5) == clash  # trained twice, different results
    unfinished = _add(store_a, _cfg("resnet18", 0, 0.0625), 50.0, status="running")
    _add(store_b, _cfg("resnet18", 0, 0.0625), 55.0)  # finished on b: taken from b, no conflict

    assert main(["merge", str(a), str(b), "--into", str(dst)]) == 1  # 1: there is a conflict
    out = capsys.readouterr().out
    assert f"into {dst}: 8 runs copied, 4 found in several, 1 conflicts" in out
    assert f"Conflict: run {clash} (densenet121 ce s0) finished with different results: kept 60.00% from {a}; " \
           f"differs: 61.50% in {b}" in out
    assert f"Only in {b} (3 runs): " in out and f"{only_b['kd'][:8]} vgg16 kd s1" in out
    assert f"Only in {a}" not in out

    merged = Store(dst, create=False)
    assert {r.run_id for r in merged.runs()} == {r.run_id for r in store_a.runs()} | {r.run_id for r in store_b.runs()}
    assert merged.get(clash).final_acc == 60.0  # the first source's, as said
    assert merged.get(unfinished).status == "done" and merged.get(unfinished).final_acc == 55.0
    for run_id in (*seed0.values(), *only_b.values()):
        src = store_b if run_id in only_b.values() else store_a
        assert merged.checkpoint_path(run_id).read_bytes() == src.checkpoint_path(run_id).read_bytes()
        assert merged.checkpoint_path(run_id, 1).read_bytes() == b"snapshot"
        assert merged.get(run_id).history == src.get(run_id).history
    # Merging b again: everything is there; the conflict stays as it is in the destination.
    assert main(["merge", str(b), "--into", str(dst)]) == 1
    out = capsys.readouterr().out
    assert "0 runs copied" in out and f"kept 60.00% from {dst}; differs: 61.50% in {b}" in out
    assert Store(dst, create=False).get(clash).final_acc == 60.0


def test_report_over_several_runs_dirs_is_the_report_of_their_merge(tmp_path, capsys):
    a, b, dst = (tmp_path / n for n in ("a", "b", "dst"))
    _study(Store(a), 0)
    _study(Store(b), 1)  # seeds split across two machines
    _study(Store(b), 2, shift=0.5)
    assert main(["merge", str(a), str(b), "--into", str(dst)]) == 0
    capsys.readouterr()

    def report(*dirs) -> dict:
        assert main(["report", "--format", "json", *[x for d in dirs for x in ("--runs-dir", str(d))]]) == 0
        return json.loads(capsys.readouterr().out)

    merged, combined = report(dst), report(a, b)
    assert combined["studies"] == merged["studies"]
    assert combined["studies"][0]["seeds"] == [0, 1, 2]
    notes = "\n".join(combined["notes"])
    assert f"Runs combined from 2 runs dirs: {a} (3 runs kept), {b} (6 runs kept)" in notes
    assert "0 conflicts" in notes and f"Only in {b} (6 runs)" in notes
    # A conflict is said in the report too; the first runs dir's copy is the one in the tables.
    _add(Store(tmp_path / "c"), _cfg("resnet18", 0), 99.0)
    data = report(a, tmp_path / "c")
    assert "Conflict: run" in "\n".join(data["notes"])
    teacher = next(row for row in data["studies"][0]["table1"] if row["model"] == "resnet18")
    assert teacher["acc"] == 80.0


def test_merge_and_report_check_their_runs_dirs_before_writing(tmp_path, capsys):
    a, dst = tmp_path / "a", tmp_path / "dst"
    _add(Store(a), _cfg("resnet18", 0), 80.0)
    for argv, message in ((["merge", str(a), str(tmp_path / "nothing"), "--into", str(dst)], "no kdlab runs database"),
                          (["merge", str(a), str(a), "--into", str(dst)], "the same runs dir is given twice"),
                          (["merge", str(a), "--into", str(a)], "is both a source and the destination"),
                          (["report", "--runs-dir", str(a), "--runs-dir", str(tmp_path / "nothing")],
                           "no kdlab runs database")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not dst.exists()


def test_an_unfinished_run_merged_from_another_machine_resumes_from_its_checkpoint(tmp_path, tiny):
    from kdlab.api import execute

    cfg = build_config("smoke", "resnet18", overrides={**tiny, "epochs": 2})
    a, dst = tmp_path / "a", tmp_path / "dst"
    trained = execute(cfg, a)
    # As if the machine had died after the last checkpoint, before the run was marked finished.
    with Store(a).transaction() as c:
        c.execute("UPDATE runs SET status='running', owner='deadnode:1:x', heartbeat=0, final_acc=NULL "
                  "WHERE run_id=?", (trained.run_id,))
    assert main(["merge", str(a), "--into", str(dst)]) == 0
    assert Store(dst).get(trained.run_id).status == "pending"  # nobody holds it here
    resumed = execute(cfg, dst)
    assert resumed.status == "done" and resumed.final_acc == trained.final_acc
    # Nothing retrained: the time is the copied checkpoint's, not a new measurement.
    assert resumed.wall_s == torch.load(resumed.checkpoint, weights_only=True)["elapsed_s"]
