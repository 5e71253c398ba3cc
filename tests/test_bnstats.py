"""BatchNorm statistics for evaluation (kdlab.bnstats): re-estimated in place when training cannot have
settled them, which turns a student at chance into the model that trained; everything else unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import kdlab
from kdlab import bnstats
from kdlab.configure import build_config
from kdlab.data.loader import Batch

MOBILENET = {"width": 0.5, "preset": "smoke", "epochs": 3, "batch_size": 16}


def _batches(xs):
    return [Batch(x=x, y=torch.zeros(len(x), dtype=torch.long), index=torch.arange(len(x)),
                  view=torch.zeros(len(x), dtype=torch.long)) for x in xs]


def test_reestimation_averages_the_training_batches_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.ReLU(), nn.Dropout(0.5),
                          nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    bn = model[1]
    mean, var, weight = bn.running_mean, bn.running_var, model[0].weight.detach().clone()
    addresses = (mean.data_ptr(), var.data_ptr())
    xs = [torch.randn(8, 3, 8, 8) * 3 + 2 for _ in range(4)]
    rng = torch.get_rng_state()
    model.train()
    bnstats.reestimate([model], _batches(xs))
    # The plain average of the batches' statistics, written into the same tensors (a captured
    # evaluation graph reads them by address); weights, modes, momentum and the RNG as they were.
    with torch.no_grad():
        conv = [model[0](x) for x in xs]
    assert (bn.running_mean.data_ptr(), bn.running_var.data_ptr()) == addresses
    assert torch.allclose(bn.running_mean, torch.stack([c.mean((0, 2, 3)) for c in conv]).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([c.var((0, 2, 3)) for c in conv]).mean(0), atol=1e-4)
    assert torch.equal(model[0].weight, weight) and bn.momentum == 0.01 and model.training and bn.training
    assert torch.equal(torch.get_rng_state(), rng)  # dropout stayed off: no random number drawn


@pytest.mark.parametrize("model, momentum, steps, expected", [
    ("resnet18", 0.1, 2, "running"),  # kdlab's own models always keep their running statistics
    ("torchvision:mobilenet_v3_small", 0.01, 12, "train"),  # 89% of the initial statistics left
    ("torchvision:mobilenet_v3_small", 0.01, 1000, "running"),  # 0.004%: settled
    ("timm:resnet10t", 0.1, 12, "running"),  # PyTorch's default momentum: kdlab leaves it as it was
])
def test_auto_re_estimates_only_where_the_statistics_cannot_have_settled(model, momentum, steps, expected):
    cfg = build_config("smoke", model, overrides={"width": 0.5 if "mobilenet" in model else 1.0, "epochs": 1,
                                                  "batch_size": 10, "train_limit": 0, "dataset": "synthetic"})
    cfg = dataclasses.replace(cfg, data_info={"train": 10 * steps, "classes": 3})
    assert bnstats.training_steps(cfg) == steps
    assert bnstats.resolve(cfg) == expected
    for explicit in ("running", "train"):
        assert bnstats.resolve(dataclasses.replace(cfg, bn_stats=explicit)) == explicit


def test_kdlab_runs_keep_their_ids():
    # bn_stats is hashed only when it re-estimates: a run that computes what it computed before the
    # setting existed keeps its id (this one is the README's worked example, c839c234...).
    cfg = build_config("smoke", "resnet18", overrides={"width": 0.125, "dataset": "synthetic"})
    ids = {dataclasses.replace(cfg, bn_stats=v).run_hash() for v in ("auto", "running")}
    assert len(ids) == 1 and dataclasses.replace(cfg, bn_stats="train").run_hash() not in ids


def test_a_mobilenet_at_chance_is_flagged_and_auto_evaluates_the_model_that_trained(tmp_path, image_folder):
    pytest.importorskip("torchvision")
    folder = image_folder("bands", classes=3, per_class=24, size=32)
    # PyTorch's running statistics: after 12 steps at momentum 0.01 they are mostly the initial ones,
    # and the model in eval mode predicts one class.
    stuck = kdlab.train("torchvision:mobilenet_v3_small", data=str(folder), runs_dir=tmp_path, bn_stats="running",
                        **MOBILENET)
    assert [h["test_acc"] for h in stuck.history] == pytest.approx([100 / 3] * 3)
    assert stuck.history[-1]["train_acc"] > 60
    assert stuck.health.startswith("test at chance: test accuracy 33.3% is chance (33.3%, 3 classes) while "
                                   "training accuracy reached")
    assert "momentum 0.01 over 12 training steps leaves 89% of the initial statistics" in stuck.health
    assert "--set bn_stats=train" in stuck.health and stuck.diverged
    # The default re-estimates them for this model (a new run id), trains exactly the same, and
    # evaluates the model that trained.
    fixed = kdlab.train("torchvision:mobilenet_v3_small", data=str(folder), runs_dir=tmp_path, **MOBILENET)
    assert fixed.config["bn_stats"] == "train" and fixed.run_id != stuck.run_id
    for a, b in zip(fixed.history, stuck.history, strict=True):
        assert (a["train_loss"], a["train_acc"]) == (b["train_loss"], b["train_acc"])
    assert fixed.final_acc > 80 and fixed.health == "ok"


def test_the_likely_cause_of_a_test_at_chance_depends_on_the_model():
    cfg = build_config("smoke", "resnet18", overrides={"width": 0.0625, "dataset": "synthetic"})
    slow = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01))
    assert bnstats.describe(slow, cfg, 30).startswith(
        "its BatchNorm running statistics never settled: momentum 0.01 over 30 training steps leaves 74%")
    assert "should have settled (500 training steps), so look elsewhere" in bnstats.describe(slow, cfg, 500)
    assert "re-estimated on the training set" in bnstats.describe(slow, dataclasses.replace(cfg, bn_stats="train"), 30)
    assert bnstats.describe(nn.Linear(2, 2), cfg, 30).startswith("it has no BatchNorm statistics to blame")
