"""`StagedModel`: the one shape every kdlab model has, so methods can tap any family the same way.

A model is ``stem -> stages[0] -> ... -> stages[-1] -> head``. Distillation methods that match
intermediate features read the stage outputs; everything else just calls ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# The input size the documented stage shapes (and the paper's models) assume.
CIFAR_INPUT = (3, 32, 32)


class StagedModel(nn.Module):
    """An image classifier split into a stem, a list of stages and a head.

    Args:
        stem: applied to the image before the first stage (may be ``nn.Identity``).
        stages: applied in order; the output of each is one "stage feature".
        head: maps the last stage's output to logits (pooling, flatten, classifier).
        stage_channels: channel count of each stage's output.
        stage_reductions: how much each stage output is downsampled relative to the input
            (e.g. 4 means a 32x32 image gives an 8x8 feature map).
        width: the width multiplier the model was built with.
        num_classes: number of output logits.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        head: nn.Module,
        *,
        stage_channels: Sequence[int],
        stage_reductions: Sequence[int],
        width: float,
        num_classes: int,
    ) -> None:
        super().__init__()
        if not (len(stages) == len(stage_channels) == len(stage_reductions)):
            raise ValueError("stages, stage_channels and stage_reductions must have the same length")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        # Known at construction, so no dry run is needed: a dry run in train mode would update
        # BatchNorm running statistics, and would have to know the model's device and dtype.
        self._stage_channels = [int(c) for c in stage_channels]
        self._stage_reductions = [int(r) for r in stage_reductions]
        self.name = ""  # set by the registry
        self.width = float(width)
        self.num_classes = int(num_classes)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the output of every stage, in order (the stem's output is not included)."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        """Return logits from the last stage's output."""
        return self.head(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits. Same computation as ``forward_with_features``, without keeping features."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def forward_with_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return ``(stage features, logits)`` from a single pass."""
        feats = self.forward_stages(x)
        return feats, self.forward_head(feats[-1])

    def stage_channels(self) -> list[int]:
        """Channel count of each stage's output."""
        return list(self._stage_channels)

    def stage_reductions(self) -> list[int]:
        """Spatial downsampling factor of each stage's output relative to the input image."""
        return list(self._stage_reductions)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, width={self.width}, num_classes={self.num_classes}"


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width``, rounded, never below 1."""
    return max(1, int(round(channels * width)))


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, bias: bool = False) -> nn.Sequential:
    """Conv (same padding) - BatchNorm - ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def init_weights(model: nn.Module) -> None:
    """Initialise weights the way the CIFAR reference implementations do.

    Convs get Kaiming normal (fan_out, ReLU gain), which keeps activations at unit scale through
    deep ReLU stacks; BatchNorm starts as the identity (weight 1, bias 0); conv biases start at 0.
    Linear layers keep PyTorch's default init (uniform, scaled by fan_in): the classifiers here
    sit behind BatchNorm'd features, and that default is what the reference code trains with.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
