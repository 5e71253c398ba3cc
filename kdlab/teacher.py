"""A frozen teacher: loaded once, in eval mode, never building a graph or receiving gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdlab.data.loader import Batch


class Teacher:
    """Wraps a trained model for distillation: outputs under no_grad, in eval mode.

    `no_grad` rather than `inference_mode`: the teacher's outputs are saved by the student's loss
    for its backward pass, which inference tensors may not be.
    """

    def __init__(self, model: nn.Module, run_id: str | None = None, forward: Callable[[Tensor], Tensor] | None = None,
                 timer: Callable[[str], object] | None = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.run_id = run_id
        self._forward = forward or self.model
        self._timer = timer

    def logits(self, batch: Batch) -> Tensor:
        """The teacher's logits for this batch's images (same crops and flips as the student's)."""
        with self._time(), torch.no_grad():
            return self._forward(batch.x)

    def features(self, batch: Batch) -> tuple[list[Tensor], Tensor]:
        """Stage features and logits in one pass, for feature- and relation-based methods."""
        with self._time(), torch.no_grad():
            return self.model.forward_with_features(batch.x)

    def _time(self):
        from contextlib import nullcontext

        return self._timer("teacher") if self._timer else nullcontext()
