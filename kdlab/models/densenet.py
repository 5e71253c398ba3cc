"""DenseNet121: the paper's torchvision-style model (6,880,448 conv + linear weights) and a CIFAR-stem one.

Stage boundaries: stage i is ``[transition] -> dense block i``; the transition (BN-ReLU-1x1 conv
halving the channels - 2x2 average pool) that sits between blocks opens the next stage, so each
stage feature is a dense block's full concatenated output at that block's resolution. The last
stage ends with the final BN + ReLU, so its feature is post-activation, as the other families'
last features are.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.base import StagedModel, conv_bn_relu, init_weights, scaled
from kdlab.models.registry import register_model

DENSENET121_BLOCKS = [6, 12, 24, 16]
BOTTLENECK_FACTOR = 4  # the 1x1 conv widens to 4k channels before the 3x3 conv to k


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k); returns the input with the k new channels appended."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        mid = BOTTLENECK_FACTOR * growth
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Appending to the running tensor is the same math as torchvision's concatenation of a
        # feature list, with a fixed graph that traces, compiles and exports cleanly. The first
        # ReLU must not be in place on x, and it is not: BatchNorm gives it a fresh tensor.
        return torch.cat([x, self.body(x)], 1)


def _transition(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False),
        # ceil_mode: a 1x1 map stays 1x1 (the paper's stem leaves 2x2 of an 8x8 image), and odd sizes
        # keep their last row and column; on the even sizes of a 32x32 image it is the plain 2x2 pool.
        nn.AvgPool2d(2, 2, ceil_mode=True),
    )


def _densenet(blocks: list[int], width: float, num_classes: int, cifar_stem: bool) -> StagedModel:
    growth = scaled(32, width)
    cin = 2 * growth
    if cifar_stem:
        stem = conv_bn_relu(3, cin)
        stem_reduction = 1
    else:
        stem = nn.Sequential(
            nn.Conv2d(3, cin, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stem_reduction = 4
    stages, channels, reductions = [], [], []
    for i, n in enumerate(blocks):
        layers: list[nn.Module] = []
        if i > 0:
            cout = cin // 2
            layers.append(_transition(cin, cout))
            cin = cout
        for _ in range(n):
            layers.append(DenseLayer(cin, growth))
            cin += growth
        if i == len(blocks) - 1:
            layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        stages.append(nn.Sequential(*layers))
        channels.append(cin)
        reductions.append(stem_reduction * 2**i)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(cin, num_classes))
    model = StagedModel(
        stem,
        stages,
        head,
        stage_channels=channels,
        stage_reductions=reductions,
        width=width,
        num_classes=num_classes,
    )
    init_weights(model)
    return model


@register_model("densenet121")
def densenet121(width: float = 1.0, num_classes: int = 10) -> StagedModel:
    """The paper's DenseNet121: torchvision-style 7x7 stride-2 stem + max pool, growth 32.

    The stem shrinks a 32x32 image to 8x8 before the first block (stage features at 8, 4, 2, 1
    pixels), which is why the paper's DenseNet121 reached only ~88% on CIFAR-10.
    """
    return _densenet(DENSENET121_BLOCKS, width, num_classes, cifar_stem=False)


@register_model("densenet121_cifar")
def densenet121_cifar(width: float = 1.0, num_classes: int = 10) -> StagedModel:
    """DenseNet121 with a CIFAR stem (3x3 stride-1 conv, no max pool). NOT the paper's model.

    Same blocks and growth as ``densenet121``; stage features at 32, 16, 8, 4 pixels. About 95% on
    CIFAR-10 in the literature, against ~88% for the paper's stem, at 16x the compute.
    """
    return _densenet(DENSENET121_BLOCKS, width, num_classes, cifar_stem=True)
