"""CIFAR ResNet18, as in the paper's Table 1 (11,164,352 conv + linear weights)."""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.base import StagedModel, conv_bn_relu, init_weights, scaled
from kdlab.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        # Decided at build time, so forward has no shape-dependent branches.
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _resnet(blocks: list[int], width: float, num_classes: int) -> StagedModel:
    stem_c = scaled(64, width)
    stem = conv_bn_relu(3, stem_c)
    stages, channels = [], []
    cin = stem_c
    for i, n in enumerate(blocks):
        cout = scaled(64 * 2**i, width)
        stride = 1 if i == 0 else 2
        layers = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
        stages.append(nn.Sequential(*layers))
        channels.append(cout)
        cin = cout
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(cin, num_classes))
    model = StagedModel(
        stem,
        stages,
        head,
        stage_channels=channels,
        stage_reductions=[2**i for i in range(len(blocks))],
        width=width,
        num_classes=num_classes,
    )
    init_weights(model)
    return model


@register_model("resnet18")
def resnet18(width: float = 1.0, num_classes: int = 10) -> StagedModel:
    """CIFAR ResNet18. Stages: the four layer groups (features at 32, 16, 8, 4 pixels for 32x32 input)."""
    return _resnet([2, 2, 2, 2], width, num_classes)
