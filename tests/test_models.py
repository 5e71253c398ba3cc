"""Model zoo: the paper's parameter counts to the digit, shapes, gradients, errors, exportability."""

from __future__ import annotations

import pytest
import torch

from kdlab.errors import UserError
from kdlab.models import (
    StagedModel,
    count_params,
    create_model,
    list_models,
    model_family,
    paper_params,
)

# The paper's Table 1 "Params" column: conv + linear weights only, 10 classes.
PAPER_PARAMS = {
    ("vgg16", 1.0): 15_239_872,
    ("vgg16", 0.5): 3_811_680,
    ("resnet18", 1.0): 11_164_352,
    ("resnet18", 0.5): 2_792_800,
    ("densenet121", 1.0): 6_880_448,
    ("densenet121", 0.5): 1_725_024,
}

# Documented stage feature sizes (pixels) for a 32x32 input.
STAGE_SIZES = {
    "vgg16": [16, 8, 4, 2, 1],
    "resnet18": [32, 16, 8, 4],
    "densenet121": [8, 4, 2, 1],
    "densenet121_cifar": [32, 16, 8, 4],
}

FAMILIES = {"vgg16": "vgg", "resnet18": "resnet", "densenet121": "densenet", "densenet121_cifar": "densenet"}

TINY = 1 / 16


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_lists_every_model() -> None:
    assert list_models() == sorted(STAGE_SIZES)
    for name in list_models():
        assert model_family(name) == FAMILIES[name]


@pytest.mark.parametrize(("name", "width"), list(PAPER_PARAMS))
def test_paper_params_match_table_1(name: str, width: float) -> None:
    model = create_model(name, width=width, num_classes=10)
    assert paper_params(model) == PAPER_PARAMS[(name, width)]
    # Biases and BatchNorm affine terms come on top of the paper's figure.
    assert count_params(model) > paper_params(model)


def test_paper_params_counts_only_conv_and_linear_weights() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2, bias=True)
    )
    assert paper_params(model) == 3 * 4 * 9 + 5 * 2
    assert count_params(model) == paper_params(model) + 4 + 2 * 4 + 2


@pytest.mark.parametrize("width", [TINY, 0.5])
@pytest.mark.parametrize("name", sorted(STAGE_SIZES))
def test_shapes_and_features(name: str, width: float) -> None:
    x = torch.randn(2, 3, 32, 32)
    for num_classes in (10, 100):
        model = create_model(name, width=width, num_classes=num_classes).eval()
        assert isinstance(model, StagedModel)
        assert (model.name, model.width, model.num_classes) == (name, width, num_classes)
        with torch.no_grad():
            logits = model(x)
            feats, logits2 = model.forward_with_features(x)
        assert logits.shape == (2, num_classes)
        torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
        assert [f.shape[1] for f in feats] == model.stage_channels()
        assert [f.shape[-1] for f in feats] == STAGE_SIZES[name]
        assert [f.shape[-2] for f in feats] == STAGE_SIZES[name]
        assert [32 // r for r in model.stage_reductions()] == STAGE_SIZES[name]


@pytest.mark.parametrize("name", sorted(STAGE_SIZES))
def test_gradients_reach_every_parameter(name: str) -> None:
    model = create_model(name, width=TINY).train()
    feats, logits = model.forward_with_features(torch.randn(2, 3, 32, 32))
    # Through the logits and every stage feature, so in-place ops on features would show up here.
    (logits.square().mean() + sum(f.mean() for f in feats)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_half_width_densenet_has_growth_16_and_stem_32() -> None:
    model = create_model("densenet121", width=0.5)
    assert model.stem[0].out_channels == 32
    assert model.stages[0][0].body[-1].out_channels == 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "resnet19"}, "unknown model 'resnet19'.*resnet18"),
        ({"name": "vgg16", "width": 0}, "width"),
        ({"name": "vgg16", "width": -1.0}, "width"),
        ({"name": "vgg16", "width": float("nan")}, "width"),
        ({"name": "vgg16", "num_classes": 0}, "num_classes"),
    ],
)
def test_bad_input_raises_user_error(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        create_model(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_family_raises_user_error() -> None:
    with pytest.raises(UserError, match="unknown model"):
        model_family("alexnet")


@pytest.mark.parametrize("name", ["densenet121", "resnet18"])
def test_torch_export_with_dynamic_batch(name: str) -> None:
    # torch.export traces with the same graph capture as torch.compile(fullgraph=True): it fails on
    # data-dependent Python control flow, and is the route to ONNX.
    model = create_model(name, width=TINY).eval()
    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
