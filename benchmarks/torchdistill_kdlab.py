"""What torchdistill needs from kdlab to run the comparison's KD job through its own pipeline.

torchdistill_kd.yaml imports this module (its `dependencies`, and its datasets by `!import_call`), so
everything here goes through torchdistill's documented extension points, its registries:

* `kdlab_model`: kdlab's own model definitions in torchdistill's model registry, so both sides train
  the very same networks (torchdistill's `resnet18` key would be torchvision's ImageNet ResNet18).
* `forward_batch_only_bf16`: torchdistill's `forward_batch_only` under bf16 autocast, in its
  forward-process registry. torchdistill 1.1.5 has no mixed-precision setting of its own for this
  pipeline; kdlab's preset trains in bf16, so without this the comparison would pit bf16 against fp32.
  Logits come back in float32, as kdlab computes its losses in float32.
* `CIFAR10Copy`: torchvision's CIFAR10 reader for a copy whose files are not the official archive's
  (the JPEG copy of CIFAR-10 has other pixels, so other checksums): the same reading and per-image
  transforms, without the MD5 comparison (the files must still exist).

Not a kdlab module: it needs torchdistill, which kdlab does not depend on.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchdistill.core.interfaces.registry import register_forward_proc_func
from torchdistill.models.registry import register_model
from torchvision.datasets import CIFAR10

from kdlab.models import create_model


@register_model(key="kdlab_model")
def kdlab_model(name: str, width: float = 1.0, num_classes: int = 10, channels_last: bool = False) -> nn.Module:
    """A kdlab model (as `kdlab.models.create_model` builds it), in channels_last if asked, as kdlab's
    engine places it for a preset with `channels_last: true`."""
    model = create_model(name, width, num_classes)
    return model.to(memory_format=torch.channels_last) if channels_last else model


@register_forward_proc_func
def forward_batch_only_bf16(model: nn.Module, sample_batch: Tensor, targets: Tensor | None = None,
                            supp_dict: dict | None = None, **kwargs) -> Tensor:
    """The model's forward on the batch under bf16 autocast; float32 logits out."""
    with torch.autocast(sample_batch.device.type, dtype=torch.bfloat16):
        return model(sample_batch).float()


class CIFAR10Copy(CIFAR10):
    """torchvision's CIFAR10 on files in the official python layout but not from the official archive."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}
