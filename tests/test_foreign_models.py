"""Models from elsewhere: timm and torchvision models, foreign checkpoints, nn.Modules from Python,
stage features for every feature method, image sizes, FLOPs. Tiny configurations, no downloads."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdlab
from kdlab.configure import build_config
from kdlab.errors import UserError
from kdlab.models import ForeignModel, create_model

# timm's test_* models are a few hundred thousand parameters; MobileNetV3-small at width 0.25 too.
TIMM_T, TIMM_S = "timm:test_resnet", "timm:test_efficientnet"
TV = "torchvision:mobilenet_v3_small"
# width None: the default, which is 1 (as built) for models from other libraries.
ONE_EPOCH = {"epochs": 1, "train_limit": 128, "test_limit": 64, "width": None}


def _db_rows(runs: Path) -> list[str]:
    if not (runs / "kdlab.db").exists():
        return []
    with sqlite3.connect(runs / "kdlab.db") as c:
        return list(c.iterdump())


def test_timm_and_torchvision_as_teacher_and_student(tmp_path, tiny):
    run = {**tiny, **ONE_EPOCH}
    timm_teacher = kdlab.train(TIMM_T, preset="smoke", runs_dir=tmp_path, **run)
    tv_teacher = kdlab.train(TV, preset="smoke", runs_dir=tmp_path, **{**run, "width": 0.25})
    assert timm_teacher.status == tv_teacher.status == "done"
    assert timm_teacher.config["width"] == 1.0  # built as named: the smoke preset's 1/8 is for kdlab's models
    assert timm_teacher.params == sum(p.numel() for p in create_model(TIMM_T, 1.0, 10).parameters())
    assert tv_teacher.flops > 0 and tv_teacher.paper_params > 0
    tv_student = kdlab.distill(timm_teacher.run_id, TV, preset="smoke", runs_dir=tmp_path, **{**run, "width": 0.25})
    timm_student = kdlab.distill(tv_teacher.run_id, TIMM_S, preset="smoke", runs_dir=tmp_path, **run)
    for student, teacher in ((tv_student, timm_teacher), (timm_student, tv_teacher)):
        assert student.status == "done" and student.config["teacher"] == teacher.run_id
        assert student.history[-1]["terms"].keys() == {"ce", "kd"} and student.timing["teacher_s"] > 0
    # The report's Table 1 gives each model's FLOPs at the data's image size.
    from kdlab.models.profile import format_flops
    from kdlab.reporting import build_report, render
    from kdlab.store import Store

    store = Store(tmp_path, create=False)
    table = render(build_report(store, dataset="synthetic", preset="smoke"), "md")
    store.close()
    assert "FLOPs" in table and format_flops(timm_teacher.flops) in table
    # A width where the family has none is one line, not a silently different model.
    with pytest.raises(UserError, match="built as named"):
        kdlab.train(TIMM_T, preset="smoke", runs_dir=tmp_path, **{**run, "width": 0.5})
    with pytest.raises(UserError, match="the number of classes comes from the data"):
        build_config("smoke", TV, overrides={"model_args": {"num_classes": 5}})


@pytest.mark.parametrize("name", [TIMM_T, TV, "torchvision:resnet18"])
def test_stage_features_follow_the_interface(name):
    model = create_model(name, 0.25 if name == TV else 1.0, 7).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats, logits = model.forward_with_features(x)
        torch.testing.assert_close(logits, model(x))
    assert logits.shape == (2, 7) and model.num_classes == 7
    assert [f.shape[1] for f in feats] == model.stage_channels()
    assert [-(-48 // r) for r in model.stage_reductions()] == [f.shape[-1] for f in feats]
    assert model.stage_reductions() == sorted(model.stage_reductions())
    if name == "torchvision:resnet18":  # found by node name: the stem's output, then layer1..layer4
        assert model.stages().nodes == ["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
        named = create_model(name, 1.0, 7, feature_nodes=["layer2", "layer4"])
        assert named.stage_channels() == [128, 512] and named.stage_reductions() == [8, 32]


def test_every_feature_method_on_a_timm_pair(tiny):
    from kdlab.data import load_dataset
    from kdlab.job import build
    from kdlab.loop import build_loaders
    from kdlab.teacher import Teacher

    dataset = load_dataset("synthetic", tiny["data_dir"])
    teacher_model = create_model(TIMM_T, 1.0, 10)
    for method in ("fitnets", "at", "rkd", "sp", "byot"):
        cfg = build_config("smoke", TIMM_S, overrides={**tiny, "width": 1.0, "method": method,
                                                        "teacher": None if method == "byot" else "t"})
        s = build(cfg, dataset, teacher_model)
        batch = next(build_loaders(cfg, dataset, s.device)[0].epoch(0))
        logits, terms = s.method(s.student, batch, Teacher(teacher_model))
        sum(terms.values()).backward()
        assert logits.shape == (len(batch.y), 10) and len(terms) >= 2, method
        assert all(torch.isfinite(v) for v in terms.values()), method
        learned = [p for p in s.method.parameters() if p.requires_grad]  # regressors, embeddings, aux heads
        assert all(p.grad is not None for p in learned), method
        assert all(p.grad is not None for p in s.student.parameters() if p.requires_grad), method


def test_a_torchvision_teacher_with_a_feature_method(tmp_path, tiny):
    teacher = kdlab.train(TV, preset="smoke", runs_dir=tmp_path, **{**tiny, **ONE_EPOCH, "width": 0.25})
    student = kdlab.distill(teacher.run_id, TIMM_T, method="fitnets", preset="smoke", runs_dir=tmp_path,
                            **{**tiny, **ONE_EPOCH})
    assert student.status == "done" and "hint" in student.history[-1]["terms"]


class SmallCNN(nn.Module):
    """A hand-written student: two conv blocks and a linear head."""

    def __init__(self, classes: int = 10, width: int = 8):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                    nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                                    nn.MaxPool2d(2))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)).mean((2, 3)))


class FlatMLP(nn.Module):
    """A hand-written model with no feature maps at all."""

    def __init__(self, classes: int = 10, side: int = 32):
        super().__init__()
        self.fc = nn.Linear(3 * side * side, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _arrays(seed: int = 0, n: int = 96, classes: int = 10) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    y_train, y_test = rng.integers(0, classes, n), rng.integers(0, classes, n // 2)
    # Each class a different mean colour, so there is something to learn.
    x_train = (rng.random((n, 32, 32, 3)) * 100 + y_train[:, None, None, None] * 15).astype(np.uint8)
    x_test = (rng.random((n // 2, 32, 32, 3)) * 100 + y_test[:, None, None, None] * 15).astype(np.uint8)
    return x_train, y_train, x_test, y_test


def test_python_api_with_two_hand_written_modules(tmp_path):
    torch.manual_seed(0)
    teacher, student = SmallCNN(width=16), SmallCNN(width=4)
    data = _arrays()
    common = {"preset": "smoke", "runs_dir": tmp_path, "epochs": 1, "batch_size": 32}
    rec = kdlab.distill(teacher=teacher, student=student, data=data, **common)
    assert rec.status == "done" and rec.config["model"].startswith("module:SmallCNN.")
    assert rec.config["teacher"].startswith("module:SmallCNN.") and rec.config["dataset"].startswith("arrays:")
    assert rec.config["width"] == 1.0 and rec.params == sum(p.numel() for p in student.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's module is left as it was
    # The same modules and arrays are the same run; other teacher weights or other data are another.
    assert kdlab.distill(teacher=teacher, student=student, data=data, **common).run_id == rec.run_id
    with torch.no_grad():
        teacher.head.bias.add_(1.0)
    other_teacher = kdlab.distill(teacher=teacher, student=student, data=data, **common)
    other_data = kdlab.distill(teacher=teacher, student=student, data=_arrays(seed=1), **common)
    assert len({rec.run_id, other_teacher.run_id, other_data.run_id}) == 3
    # Feature methods find a hand-written module's stages by node name.
    fit = kdlab.distill(teacher=teacher, student=student, data=data, method="fitnets", **common)
    assert fit.status == "done" and "hint" in fit.history[-1]["terms"]
    # A module whose features cannot be found: one line naming the methods that need them, nothing written.
    before = _db_rows(tmp_path)
    with pytest.raises(UserError, match=r"gives no stage features .*fitnets.*need them") as info:
        kdlab.distill(teacher=teacher, student=FlatMLP(), data=data, method="at", **common)
    assert "\n" not in str(info.value) and _db_rows(tmp_path) == before
    # A teacher for other classes, likewise.
    with pytest.raises(UserError, match="teacher .* has 5 classes but the data .* has 10"):
        kdlab.distill(teacher=SmallCNN(classes=5), student=student, data=data, **common)
    assert _db_rows(tmp_path) == before


def _main(args: list[str], capsys) -> tuple[int, str]:
    from kdlab.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def test_foreign_state_dict_teacher_from_the_cli(tmp_path, tiny, capsys):
    import timm

    common = ["--student", "resnet18", "--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--dataset",
              "synthetic", "--data-dir", tiny["data_dir"], "--epochs", "1", "--set", "train_limit=128",
              "--set", "test_limit=64", "--quiet"]
    state = tmp_path / "teacher.pt"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), state)
    code, err = _main(["distill", "--teacher", str(state), "--teacher-model", TIMM_T, *common], capsys)
    assert code == 0, err
    # Classes that do not fit the data, and a pickled model without --trust-checkpoint: one line each, nothing written.
    before = _db_rows(tmp_path / "runs")
    five = tmp_path / "five.pt"
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), five)
    pickled = tmp_path / "whole.pt"
    torch.save(SmallCNN(), pickled)
    for args, message in (([str(five), "--teacher-model", TIMM_T], "has 5 classes but the data (synthetic) has 10"),
                          ([str(state), "--teacher-model", "timm:test_convnext"], "does not fit timm:test_convnext"),
                          ([str(pickled)], "--trust-checkpoint"),
                          ([str(state), "--teacher-model", "timm:no_such_net"], "timm has no model 'no_such_net'")):
        code, err = _main(["distill", "--teacher", *args, *common], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert _db_rows(tmp_path / "runs") == before
    code, err = _main(["distill", "--teacher", str(pickled), "--trust-checkpoint", *common], capsys)
    assert code == 0, err


def test_weights_file_starts_the_student(tmp_path, tiny):
    from kdlab.data import load_dataset
    from kdlab.job import build

    source = create_model(TIMM_T, 1.0, 100)  # another task's classifier: it cannot fit 10 classes
    path = tmp_path / "init.pt"
    torch.save(source.net.state_dict(), path)
    cfg = build_config("smoke", TIMM_T, overrides={**tiny, "width": 1.0, "weights": str(path)})
    plain = build_config("smoke", TIMM_T, overrides={**tiny, "width": 1.0})
    assert cfg.weights_id.startswith("file:") and cfg.run_hash() != plain.run_hash()
    student = build(cfg, load_dataset("synthetic", tiny["data_dir"]), None).student
    mine, theirs = student.net.state_dict(), source.net.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith("fc."))
    assert mine["fc.weight"].shape == (10, theirs["fc.weight"].shape[1])
    with pytest.raises(UserError, match="cannot read weights file"):
        build_config("smoke", TIMM_T, overrides={"weights": str(tmp_path / "missing.pt")})


def test_pretrained_weights_without_the_network_is_one_line(monkeypatch):
    import huggingface_hub.constants

    # As on a machine that cannot reach the hub; no request is made (the flag is read at import, hence both).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"could not be built .*give a local file with --set weights=PATH") as info:
        create_model(TIMM_T, 1.0, 10, pretrained=True)
    assert "\n" not in str(info.value)


def test_stem_warning_and_flops(capsys):
    from kdlab.cli import main
    from kdlab.models.profile import model_facts

    facts = model_facts(create_model("torchvision:resnet18", 1.0, 10), (32, 32))
    assert "torchvision:resnet18 downsamples 32x32 images 4x in its stem" in capsys.readouterr().err
    assert facts["paper_params"] == 11_172_032 and facts["flops"] > 0
    model_facts(create_model(TIMM_T, 1.0, 10), (32, 32))  # a stride-2 stem only: 16x16 maps
    model_facts(create_model("torchvision:resnet18", 1.0, 10), (224, 224))
    assert capsys.readouterr().err == ""  # a small-image stem, or images large enough
    # The paper's DenseNet121 on 32x32 images, the known case; in `kdlab models` too.
    model_facts(create_model("densenet121", 0.0625, 10), (32, 32))
    assert "densenet121 downsamples 32x32 images 4x in its stem" in capsys.readouterr().err
    model_facts(create_model("densenet121_cifar", 0.0625, 10), (32, 32))
    assert capsys.readouterr().err == ""
    assert main(["models", "densenet121", "--widths", "0.0625"]) == 0
    assert "note: densenet121 downsamples 32x32 images 4x" in capsys.readouterr().out
    assert main(["models", "torchvision:resnet18", "--image-size", "224", "--num-classes", "1000", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    # ResNet-18 at 224x224: 1.82 G multiply-adds, the figure torchvision publishes (GFLOPS 1.81), counted as 2 FLOPs.
    assert row["params"] == 11_689_512 and row["flops"] == pytest.approx(2 * 1.814e9, rel=0.01)


def test_in_process_module_source_copies_the_module():
    from kdlab.models.module_source import register_module

    module = SmallCNN()
    name = register_module(module)
    built = create_model(name, 1.0, 10)
    assert isinstance(built, ForeignModel) and built.net is not module
    assert all(torch.equal(a, b) for a, b in zip(built.net.state_dict().values(), module.state_dict().values(),
                                                strict=True))
    with pytest.raises(UserError, match="exists only in the process"):
        create_model("module:Gone.0123456789abcdef", 1.0, 10)


def test_an_older_store_gains_the_flops_column(tmp_path, monkeypatch):
    import kdlab.store.database as store_module
    from kdlab.store import Store

    with monkeypatch.context() as m:  # a store as written before FLOPs were recorded (schema 2)
        m.setattr(store_module, "SCHEMA_VERSION", 2)
        lines = [line for line in store_module._SCHEMA.splitlines() if "flops INTEGER" not in line]
        m.setattr(store_module, "_SCHEMA", "\n".join(lines).replace("role TEXT,", "role TEXT"))
        store = Store(tmp_path)
        store.ensure("old", build_config("smoke", "resnet18").to_dict())
        store.close()
    with sqlite3.connect(tmp_path / "kdlab.db") as c:
        assert "flops" not in {r[1] for r in c.execute("PRAGMA table_info(runs)")}
    store = Store(tmp_path)
    assert store.get("old").flops is None
    store.set_info("old", flops=123)
    assert store.get("old").flops == 123
    store.close()


def test_a_grid_of_models_from_other_libraries(tmp_path, tiny, capsys):
    from kdlab.cli import main

    args = ["grid", "--teachers", TIMM_T, "--students", TIMM_S, "--preset", "smoke", "--dataset", "synthetic",
            "--data-dir", tiny["data_dir"], "--runs-dir", str(tmp_path), "--epochs", "1", "--set", "train_limit=128",
            "--set", "test_limit=64", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    from kdlab.store import Store

    store = Store(tmp_path, readonly=True)
    runs = store.runs()
    store.close()
    assert sorted((r.model, r.config["width"], r.method, r.status) for r in runs) == [
        (TIMM_S, 1.0, "ce", "done"), (TIMM_S, 1.0, "kd", "done"), (TIMM_T, 1.0, "ce", "done")]
