"""Runs that fall apart are flagged, never reported as results; method defaults say where they come from."""

from __future__ import annotations

import json

import pytest
import torch

import kdlab
from kdlab.health import assess
from kdlab.reporting import build_report, render
from kdlab.store import RunRecord, Store


def _history(losses, accs):
    return [{"train_loss": loss, "train_acc": acc} for loss, acc in zip(losses, accs, strict=True)]


def test_rising_loss_without_learning_is_diverged():
    # What DKD did to vgg16@0.125 on the digits: loss 4.6 -> 24, training accuracy at chance throughout.
    verdict = assess(_history([4.6, 5.0, 8.1, 13.0, 19.5, 24.0], [10.3, 9.8, 10.1, 10.4, 9.9, 10.0]), 10)
    assert verdict.startswith("diverged: training loss rose from 4.6 (epoch 1) to 24 (epoch 6)")


def test_collapse_after_learning_is_diverged():
    verdict = assess(_history([2.0, 1.2, 0.9, 1.0, 1.2], [30.0, 60.0, 75.0, 40.0, 12.0]), 10)
    assert verdict.startswith("diverged: training accuracy collapsed from 75.0% (epoch 3) to 12.0%")
    assert assess(_history([2.0, 1.2, 0.9, 1.0, 1.2], [30.0, 60.0, 75.0, 40.0, 12.0])) == "ok"  # chance unknown


def test_a_run_that_never_learns_is_flagged():
    # What DKD did at its old defaults to vgg16@0.125 on 1,437 digits (seed 0): a finite, flat loss and
    # training accuracy at chance for all 15 epochs; the rising-loss rule does not see it.
    losses = [37.07, 43.91, 96.61, 46.2, 46.38, 45.81, 45.98, 46.29, 45.87, 46.08, 45.5, 45.68, 45.69, 46.24, 45.99]
    accs = [10.9, 13.4, 11.8, 11.3, 11.3, 11.3, 10.8, 10.9, 10.7, 10.8, 10.6, 10.6, 10.7, 10.7, 10.8]
    verdict = assess(_history(losses, accs), 10)
    assert verdict == ("not learning: training accuracy stayed at chance (10.0%) for all 15 epochs (at most 13.4%) "
                       "while the training loss stayed finite (37.1 -> 46)")
    assert assess(_history([2.3, 2.3, 2.29], [10.0, 12.0, 16.0]), 10) == "ok"  # slowly, but learning
    assert assess(_history([2.3, 2.3], [10.0, 10.5]), 10) == "ok"  # two epochs: too early to say


def test_a_test_accuracy_at_chance_after_training_far_above_it_is_flagged():
    # torchvision's mobilenet_v3_small on a 3-class folder: BatchNorm running statistics never settled.
    history = [{"train_loss": loss, "train_acc": acc, "test_acc": 100 / 3}
               for loss, acc in ((1.1, 37.5), (0.8, 68.8), (0.7, 66.0))]
    verdict = assess(history, 3)
    assert verdict.startswith("test at chance: test accuracy 33.3% is chance (33.3%, 3 classes) while training "
                              "accuracy reached 66.0%: the model in eval mode does not behave as in training; most "
                              "often BatchNorm running statistics that never settled")
    assert verdict.endswith("--set bn_stats=train")
    assert assess(history, 3, bn_note="its BatchNorm running statistics never settled: momentum 0.01").endswith(
        "momentum 0.01")  # what the loop knows of the model is said instead
    history[-1]["test_acc"] = 52.0
    assert assess(history, 3) == "ok"
    history[-1]["train_acc"] = 45.0  # barely above chance itself: a test at chance says nothing yet
    history[-1]["test_acc"] = 100 / 3
    assert assess(history, 3) == "ok"


def test_each_verdict_is_printed_with_what_to_do(capsys):
    from kdlab.commands.runs import print_record as _print_record
    from kdlab.configure import build_config

    cfg = build_config("smoke", "vgg16", overrides={"width": 0.0625, "dataset": "synthetic"})
    for health, expected in (("not learning: training accuracy stayed at chance (10.0%) for all 15 epochs",
                              "NOT LEARNING: training accuracy stayed at chance (10.0%) for all 15 epochs; its "
                              "accuracy is not a result (the report lists it as not learning): lower the lr"),
                             ("test at chance: test accuracy 33.3% ...; re-estimate them with --set bn_stats=train",
                              "TEST AT CHANCE: test accuracy 33.3% ...; re-estimate them with --set bn_stats=train; "
                              "its accuracy is not a result (the report lists it as test at chance)\n")):
        record = RunRecord(run_id="abc", config=cfg.to_dict(), status="done", final_acc=10.0, best_acc=10.0,
                           best_epoch=1, wall_s=1.0, health=health)
        assert _print_record(record) == 1
        assert expected in capsys.readouterr().out


@pytest.mark.parametrize("losses, accs", [
    ([2.3, 2.1, 1.5, 1.0, 0.7], [12.0, 25.0, 45.0, 60.0, 75.0]),  # learning
    ([2.3, 2.3], [10.0, 10.5]),  # too short to judge: not learned yet is not diverged
    ([1.0, 1.6, 2.0, 2.2], [40.0, 55.0, 63.0, 70.0]),  # a loss rising with its weight while accuracy climbs
    ([0.05, 0.09, 0.12, 0.14], [99.0, 99.0, 99.0, 99.0]),  # tiny losses wobble by large factors
])
def test_healthy_runs_are_ok(losses, accs):
    assert assess(_history(losses, accs), 10) == "ok"


def test_finished_runs_carry_their_verdict(tmp_path, tiny):
    rec = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, "epochs": 1})
    assert rec.health == "ok" and not rec.diverged


def test_diverged_runs_are_listed_not_tabled(tmp_path, capsys):
    from kdlab.commands.runs import print_record as _print_record
    from kdlab.configure import build_config

    store = Store(tmp_path)
    cfgs = [build_config("smoke", "vgg16", overrides={"width": 0.0625, "seed": s, "dataset": "synthetic"})
            for s in (0, 1)]
    history = _history([4.6, 8.0, 15.0, 24.0], [10.0, 10.2, 9.9, 10.1])
    for cfg, acc, health in ((cfgs[0], 71.0, "ok"), (cfgs[1], 40.0, None)):  # None: a run stored before the check
        store.ensure(cfg.run_hash(), cfg.to_dict())
        store.claim(cfg.run_hash(), "me:1:x")
        for epoch, metrics in enumerate(history if health is None else history[:1], start=1):
            store.record_epoch(cfg.run_hash(), epoch, {**metrics, "test_acc": acc})
        store.finish(cfg.run_hash(), {"final_acc": acc, "best_acc": acc, "best_epoch": 1, "wall_s": 1.0,
                                      "timing": {}, "health": health})
    study = build_report(store).studies[0]
    assert study.table1[0].acc.n == 1 and study.table1[0].acc.mean == 71.0  # the diverged seed is not averaged
    diverged = [m for m in study.missing if m.kind == "diverged"]
    assert len(diverged) == 1 and diverged[0].seed == 1 and "training loss rose" in diverged[0].status
    assert "diverged: training loss rose" in render(build_report(store), "md")
    record = RunRecord(run_id="abc", config=cfgs[1].to_dict(), status="done", final_acc=40.0, best_acc=40.0,
                       best_epoch=1, wall_s=1.0, health="diverged: training loss rose from 4.6 to 24")
    assert _print_record(record) == 1
    assert "DIVERGED: training loss rose" in capsys.readouterr().out


def test_attention_transfer_weighs_beta_times_the_sum():
    from kdlab.configure import build_config
    from kdlab.data.loader import Batch
    from kdlab.losses import at_loss
    from kdlab.methods import METHODS
    from kdlab.methods.shared import stage_pairs
    from kdlab.models import create_model
    from kdlab.teacher import Teacher

    torch.manual_seed(0)
    student, teacher_model = create_model("resnet18", 0.0625), create_model("vgg16", 0.0625)
    cfg = build_config("smoke", "resnet18", overrides={"method": "at", "teacher": "t", "width": 0.0625})
    method = METHODS["at"](cfg, student, teacher_model)
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x=x, y=torch.tensor([0, 1, 2, 3]), index=torch.arange(4), view=torch.zeros(4, dtype=torch.long))
    _, terms = method(student, batch, Teacher(teacher_model))
    feats, t_feats = student.forward_stages(x), teacher_model.forward_stages(x)
    by_hand = sum(at_loss(feats[i], t_feats[j]) for i, j in stage_pairs(4, 5))
    # beta = 1000, times the sum (the reference codes), not beta/2 times it
    assert float(terms["at"].detach()) == pytest.approx(1000.0 * float(by_hand.detach()), rel=1e-5)


def test_byot_hint_weight_is_one():
    from kdlab.configure import build_config
    from kdlab.data.loader import Batch
    from kdlab.losses import pool_to
    from kdlab.methods import METHODS
    from kdlab.models import create_model

    torch.manual_seed(0)
    student = create_model("resnet18", 0.0625)
    method = METHODS["byot"](build_config("smoke", "resnet18", overrides={"method": "byot", "width": 0.0625}),
                             student, None)
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x=x, y=torch.tensor([0, 1, 2, 3]), index=torch.arange(4), view=torch.zeros(4, dtype=torch.long))
    _, terms = method(student, batch, None)
    feats = student.forward_stages(x)
    hint = sum(torch.nn.functional.mse_loss(pool_to(head(f)[0], feats[-1].shape[-2:]), feats[-1])
               for head, f in zip(method.heads, feats[:-1], strict=True))
    assert float(terms["aux_hint"].detach()) == pytest.approx(float(hint.detach()), rel=1e-5)


def test_methods_say_where_their_defaults_come_from(capsys):
    from kdlab.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "defaults from: CIFAR-100" in out and "batch 64, SGD lr 0.05" in out  # dkd
    assert "beta x sum over stage pairs" in out  # at
    assert "(N-1)/N" in out  # rkd: converting the reference codes' weights
    assert "lambda 1 is where kdlab measured the hint being fitted" in out  # byot
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["dkd"]["args"]["warmup"] == pytest.approx(20 / 240) and rows["at"]["version"] == 2
