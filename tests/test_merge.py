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


def test_a_conflict_names_the_field_that_differs_and_both_values(tmp_path, capsys):
    """Two copies with the same accuracies whose losses differ in one epoch: the line says where."""
    a, b, dst = (tmp_path / n for n in ("a", "b", "dst"))
    run_id = _add(Store(a), _cfg("resnet18", 0), 42.8)
    store_b = Store(b)
    assert _add(store_b, _cfg("resnet18", 0), 42.8) == run_id
    store_b.record_epoch(run_id, 2, {"test_acc": 42.8, "train_loss": 0.500000001})  # 0.5 in a
    assert main(["merge", str(a), str(b), "--into", str(dst)]) == 1
    out = capsys.readouterr().out
    assert (f"kept 42.80% from {a}; differs: 42.80% in {b} (epoch 2 train_loss 0.5 vs 0.500000001)") in out
    # Several differences: the first three, and how many more.
    store_c = Store(tmp_path / "c")
    _add(store_c, _cfg("resnet18", 0), 43.0)
    assert main(["merge", str(tmp_path / "c"), "--into", str(dst)]) == 1
    out = capsys.readouterr().out
    assert (f"differs: 43.00% in {tmp_path / 'c'} (final_acc 42.8 vs 43; best_acc 42.8 vs 43; epoch 1 test_acc "
            "41.8 vs 42; and 1 more)") in out


def test_merge_copies_run_cards_and_tensorboard_files(tmp_path, capsys):
    a, dst = tmp_path / "a", tmp_path / "dst"
    store_a = Store(a)
    run_id = _add(store_a, _cfg("resnet18", 0), 80.0)
    card = store_a.checkpoint_path(run_id).with_suffix(".md")
    card.write_text(f"# kdlab run {run_id}\n")
    events = a / "tb" / f"resnet18_ce_s0.{run_id}" / "events.out.tfevents.1.host"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"scalars of a")
    other = _add(store_a, _cfg("vgg16", 0), 70.0)  # a run without a card or TensorBoard files
    # The destination has the run unfinished, with the TensorBoard files of its own, interrupted, attempt.
    store_dst = Store(dst)
    _add(store_dst, _cfg("resnet18", 0), 10.0, status="running")
    store_dst.release(run_id, OWNER)
    stale = dst / "tb" / f"resnet18_ce_s0_old.{run_id}" / "events.out.tfevents.0.host"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"scalars of the interrupted attempt")

    assert main(["merge", str(a), "--into", str(dst)]) == 0
    assert "2 runs copied" in capsys.readouterr().out
    merged = Store(dst, create=False)
    assert merged.checkpoint_path(run_id).with_suffix(".md").read_text() == f"# kdlab run {run_id}\n"
    assert (dst / "tb" / events.parent.name / events.name).read_bytes() == b"scalars of a"
    assert not stale.parent.exists()  # the replaced copy's files go with it
    assert sorted(p.name for p in (dst / "tb").iterdir()) == [events.parent.name]
    assert not merged.checkpoint_path(other).with_suffix(".md").exists()
    assert not [p for p in (dst / "checkpoints").iterdir() if ".tmp" in p.name]
