"""What a user bringing their own models is told: a checkpoint of another architecture (counts and whole
keys), a teacher for other classes (the way out), `kdlab models --all` (only names one can type), and
published weights on a machine without the network (at once, not after a minute of retries)."""

from __future__ import annotations

import time

import pytest
import torch

from kdlab.cli import main
from kdlab.errors import UserError
from kdlab.models import create_model


def _distill(capsys, tiny, tmp_path, teacher: str, *extra: str) -> str:
    """`kdlab distill` that must fail as a user error: one line, exit 2, nothing written; returns the line."""
    runs = tmp_path / "runs"
    code = main(["distill", "--teacher", teacher, *extra, "--student", "resnet18", "--preset", "smoke",
                 "--dataset", "synthetic", "--data-dir", tiny["data_dir"], "--epochs", "1", "--runs-dir", str(runs),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (runs / "kdlab.db").exists()
    return err


def test_a_checkpoint_of_another_architecture_says_how_many_keys_and_which(tmp_path, tiny, capsys):
    import timm

    path = tmp_path / "teacher.pt"
    saved = timm.create_model("test_resnet", num_classes=10).state_dict()
    torch.save(saved, path)
    wanted = create_model("timm:test_convnext", 1.0, 10).net.state_dict()
    missing = [k for k in wanted if k not in saved]
    unexpected = [k for k in saved if k not in wanted]
    err = _distill(capsys, tiny, tmp_path, str(path), "--teacher-model", "timm:test_convnext")
    assert f"{len(missing)} keys missing" in err and f"{len(unexpected)} unexpected" in err
    for key in missing[:3] + unexpected[:3]:  # the first few, each whole
        assert f"{key}," in err or f"{key} " in err or f"{key})" in err or f"{key};" in err, key


def test_a_teacher_for_other_classes_names_the_way_out(tmp_path, tiny, capsys):
    import timm

    path = tmp_path / "imagenet.pt"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), path)
    err = _distill(capsys, tiny, tmp_path, str(path), "--teacher-model", "timm:test_resnet")
    assert "has 1000 classes but the data (synthetic) has 10" in err
    # Fine-tune it on this data first (its classifier re-headed), then distil from that run.
    assert "kdlab train timm:test_resnet --dataset synthetic" in err and f"--set weights={path}" in err
    assert "--teacher RUN" in err


def test_models_all_lists_only_names_a_user_can_type(capsys):
    assert main(["models", "--all"]) == 0
    out = capsys.readouterr().out
    assert "none available" not in out
    assert "  timm:resnet18" in out and "  torchvision:resnet18" in out and "  resnet18" in out
    # The sources without names to list say what their names are.
    assert "module:" in out and "Python" in out and "pruned:" in out and "kdlab compress" in out


def test_published_weights_without_the_network_fail_at_once(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm  # noqa: F401 (imported before the clock starts: a cold import takes seconds)

    # A hub that cannot be reached (connections refused at once) and an empty cache.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as info:
        create_model("timm:test_resnet", 1.0, 10, pretrained=True)
    assert time.perf_counter() - t0 < 10  # huggingface_hub alone retries for about 50 s
    message = str(info.value)
    assert "\n" not in message and "127.0.0.1:9" in message and "--set weights=PATH" in message
    assert not huggingface_hub.constants.HF_HUB_OFFLINE  # the hub's own setting is left as it was


def test_published_weights_in_the_cache_load_without_the_network(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    # The hub's cache layout, holding test_resnet's weights as if fetched before.
    model = timm.create_model("test_resnet", pretrained=False)
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(model.state_dict(), folder / "snapshots" / ("0" * 40) / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    built = create_model("timm:test_resnet", 1.0, model.num_classes, pretrained=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in built.net.state_dict().items())


def test_torchvision_weights_without_the_network_fail_at_once(tmp_path, monkeypatch):
    from kdlab.models import hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))  # nothing cached
    monkeypatch.setattr(hub, "reachable", lambda url: False)
    with pytest.raises(UserError, match=r"download.pytorch.org cannot be reached .*--set weights=PATH"):
        create_model("torchvision:resnet18", 1.0, 10, weights="DEFAULT")
