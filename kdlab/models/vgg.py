"""CIFAR VGG16 with BatchNorm, as in the paper's Table 1 (15,239,872 conv + linear weights)."""

from __future__ import annotations

from torch import nn

from kdlab.models.base import StagedModel, conv_bn_relu, init_weights, scaled
from kdlab.models.registry import register_model

# Output channels of the 13 convs, one inner list per stage; every stage ends with a 2x2 max pool.
VGG16_STAGES = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
VGG16_HIDDEN = 512


def _vgg(cfg: list[list[int]], hidden: int, width: float, num_classes: int) -> StagedModel:
    stages, channels = [], []
    cin = 3
    for block in cfg:
        layers: list[nn.Module] = []
        for c in block:
            cout = scaled(c, width)
            # The paper's VGG keeps conv biases although BatchNorm follows: they are in
            # count_params, not in paper_params.
            layers += list(conv_bn_relu(cin, cout, bias=True))
            cin = cout
        # ceil_mode: a 1x1 map stays 1x1 instead of vanishing, so images from 8x8 up pass all five
        # pools; on even sizes (32 -> 16 -> ... -> 1) it is the plain 2x2 pool.
        layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        stages.append(nn.Sequential(*layers))
        channels.append(cin)
    h = scaled(hidden, width)
    head = nn.Sequential(
        # After five pools a 32x32 image is 1x1, where this pool is the identity; it lets larger
        # images through without changing the classifier.
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(cin, h),
        nn.ReLU(inplace=True),
        nn.Linear(h, h),
        nn.ReLU(inplace=True),
        nn.Linear(h, num_classes),
    )
    model = StagedModel(
        nn.Identity(),
        stages,
        head,
        stage_channels=channels,
        stage_reductions=[2 ** (i + 1) for i in range(len(cfg))],
        width=width,
        num_classes=num_classes,
    )
    init_weights(model)
    return model


@register_model("vgg16")
def vgg16(width: float = 1.0, num_classes: int = 10) -> StagedModel:
    """CIFAR VGG16-BN. Stages: the five conv blocks, each ending with its max pool
    (features at 16, 8, 4, 2, 1 pixels for a 32x32 input)."""
    return _vgg(VGG16_STAGES, VGG16_HIDDEN, width, num_classes)
