"""The deploy layer's parts: ONNX export of every family, structured pruning of every family and its
rebuild as a `pruned:` model, quantization-aware layers, the checks that turn disagreement into errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab.configure import build_config
from kdlab.data import load_dataset
from kdlab.data.loader import channel_stats
from kdlab.deploy.export import check_agreement, compare, export_onnx
from kdlab.deploy.latency import parse_counts
from kdlab.deploy.prune import prune_model
from kdlab.deploy.runs import model_flops
from kdlab.deploy.runtime import accuracy, evaluation_loader, run_logits, session
from kdlab.deploy.table import pareto
from kdlab.errors import UserError
from kdlab.methods.qat import make_quant_aware, strip_quant_aware
from kdlab.models import count_params, create_model
from kdlab.models.densenet import _densenet
from kdlab.models.pruned import resize_to, save_pruned

IMAGE = (3, 32, 32)


def _model(name: str, width: float) -> nn.Module:
    """A model whose BatchNorm layers are not the identity, so folding them into convs is exercised.

    "densenet" is the paper's DenseNet121 code (stem, dense layers, concatenations, transitions) with
    two dense layers per block instead of 6-12-24-16: the same kinds of layers and joins, a tenth of
    the graph to trace, so the exporter and the pruner take seconds here instead of a minute.
    """
    torch.manual_seed(0)
    model = _densenet([2, 2, 2, 2], width, 10, cifar_stem=False) if name == "densenet" else create_model(name, width)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.2, 1.5)  # distinct scales: something for the BN criterion to rank
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "densenet"])
def test_export_agrees_with_pytorch_for_every_family(tmp_path, name):
    model = _model(name, 0.0625)
    x = torch.randn(12, *IMAGE)
    path = tmp_path / "model.onnx"
    export_onnx(model, x[:2], path, 20)
    sess = session(path)
    result = compare(sess, model, x)
    check_agreement(result)  # raises on disagreement
    assert result["top1_agreement"] == 100.0 and result["max_abs_diff"] < 1e-3
    assert run_logits(sess, x[:5]).shape == (5, 10)  # the batch dimension is dynamic


def test_disagreement_and_unwritable_opsets_are_errors(tmp_path):
    model = _model("resnet18", 0.0625)
    x = torch.randn(8, *IMAGE)
    # The exporter quietly writes another opset (18) when it cannot write the one asked for.
    with pytest.raises(UserError, match="cannot write opset 17"):
        export_onnx(model, x[:2], tmp_path / "a.onnx", 17)
    other = create_model("resnet18", 0.0625).eval()  # same shape, other weights
    with pytest.raises(UserError, match="disagrees with PyTorch"):
        check_agreement(compare(session(tmp_path / "a.onnx"), other, x))


def test_onnx_accuracy_counts_each_test_image_once(tmp_path, synthetic_dir):
    model = _model("resnet18", 0.0625)
    export_onnx(model, torch.randn(2, *IMAGE), tmp_path / "m.onnx", 20)
    dataset = load_dataset("synthetic", synthetic_dir)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in channel_stats(dataset.train.images))
    x = (torch.from_numpy(dataset.test.images[:127]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        right = model(x).argmax(1).numpy() == dataset.test.labels[:127]
    # End the split on an image the model gets right: evaluation pads the last batch of 64 with copies
    # of it, which must not count.
    n = max(i for i in range(65, 127) if right[i]) + 1
    loader = evaluation_loader({"test_limit": n, "eval_batch_size": 64}, dataset)
    assert accuracy(session(tmp_path / "m.onnx"), loader) == pytest.approx(right[:n].mean() * 100)


@pytest.mark.parametrize(("name", "criterion"), [("vgg16", "l2"), ("resnet18", "bn"), ("densenet", "l1")])
def test_pruning_removes_channels_and_the_pruned_model_rebuilds(tmp_path, name, criterion):
    model = _model(name, 0.125)
    x = torch.randn(4, *IMAGE)
    reference = model(x)
    params, flops = count_params(model), model_flops(model, IMAGE)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    prune_model(model, x[:2], 0.5, criterion)
    pruned_widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(pruned_widths) == len(widths) and all(p <= w for p, w in zip(pruned_widths, widths, strict=True))
    assert sum(pruned_widths) < 0.6 * sum(widths)  # whole channels are gone, not masked
    assert count_params(model) < 0.4 * params and model_flops(model, IMAGE) <= 0.5 * flops
    assert model(x).shape == reference.shape  # residuals and concatenations still line up

    digest, path = save_pruned(model, {"model": name, "width": 0.125, "num_classes": 10}, tmp_path)
    rebuilt = _model(name, 0.125)  # the unpruned model, resized to the saved shapes: what `pruned:` models do
    resize_to(rebuilt, torch.load(path, weights_only=True)["state"])
    assert torch.equal(rebuilt.eval()(x), model(x))


def test_pruned_source_rebuilds_the_saved_model_and_checks_its_digest(tmp_path):
    model = _model("resnet18", 0.125)
    x = torch.randn(2, *IMAGE)
    prune_model(model, x, 0.3, "l1")
    digest, path = save_pruned(model, {"model": "resnet18", "width": 0.125, "num_classes": 10}, tmp_path)
    args = {"parent": "p", "ratio": 0.3, "criterion": "l1", "sha256": digest, "path": str(path)}
    rebuilt = create_model("pruned:resnet18", 0.125, 10, **args).eval()
    assert torch.equal(rebuilt(x), model(x))
    feats, _ = rebuilt.forward_with_features(x)
    assert [f.shape[1] for f in feats] == rebuilt.stage_channels() != model.stage_channels()
    with pytest.raises(UserError, match="sha256 differs"):
        create_model("pruned:resnet18", 0.125, 10, **{**args, "sha256": "0" * 64})
    with pytest.raises(UserError, match="are missing"):
        create_model("pruned:resnet18", 0.125, 10, **{**args, "path": str(tmp_path / "gone.pt")})
    with pytest.raises(UserError, match="needs model_args"):
        create_model("pruned:resnet18", 0.125, 10)


def test_pruned_file_location_is_not_part_of_a_runs_identity(synthetic_dir):
    args = {"parent": "p", "ratio": 0.5, "criterion": "l1", "sha256": "ab" * 32}
    runs = [build_config("smoke", "pruned:resnet18", overrides={"model_args": {**args, "path": p}})
            for p in ("/a/x.pt", "/b/x.pt")]
    assert runs[0].run_hash() == runs[1].run_hash()
    other = build_config("smoke", "pruned:resnet18", overrides={"model_args": {**args, "sha256": "cd" * 32}})
    assert other.run_hash() != runs[0].run_hash()  # what the pruned weights were is


def test_quant_aware_layers_round_to_int8_and_strip_back():
    model = create_model("resnet18", 0.0625)
    keys = set(model.state_dict())
    make_quant_aware(model)
    conv = model.stem[0]
    levels = torch.unique(conv.weight[0] / (conv.parametrizations.weight.original[0].abs().max() / 127))
    assert len(levels) <= 255 and torch.allclose(levels, levels.round(), atol=1e-4)
    model.train()
    model(torch.randn(8, *IMAGE)).sum().backward()
    assert conv.parametrizations.weight.original.grad is not None  # straight through the rounding
    assert float(conv.input_quant.hi) > float(conv.input_quant.lo)
    strip_quant_aware(model)
    assert set(model.state_dict()) == keys


def test_small_helpers():
    assert pareto([(1.0, 50.0), (2.0, 49.0), (0.5, 40.0), (3.0, 60.0)]) == [(0.5, 40.0), (1.0, 50.0), (3.0, 60.0)]
    assert parse_counts("1, 64", "--batch") == [1, 64]
    for bad in ("0", "x", ""):
        with pytest.raises(UserError):
            parse_counts(bad, "--batch")
