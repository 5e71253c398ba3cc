"""A frozen teacher: loaded once, in eval mode, never building a graph or receiving gradients."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from kdlab.data.loader import Batch


class Teacher:
    """Wraps a trained model for distillation: outputs under no_grad, in eval mode.

    `no_grad` rather than `inference_mode`: the teacher's outputs are saved by the student's loss
    for its backward pass, which inference tensors may not be. The outputs for the latest batch
    are remembered, so students trained side by side on the same batch share one forward.
    """

    def __init__(self, model: nn.Module, run_id: str | None = None, forward: Callable[[Tensor], Tensor] | None = None,
                 timer: Callable[[str], AbstractContextManager] | None = None, copy_outputs: bool = False):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.run_id = run_id
        self._forward = forward if forward is not None else self.model
        self._timer = timer
        self._batch: Batch | None = None
        self._logits: Tensor | None = None
        self._features: list[Tensor] | None = None
        self.forwards = 0  # how many forward passes actually ran (the rest were shared)
        # Under CUDA graphs a compiled module's outputs live in memory the next graph replay reuses,
        # and the next student's compiled forward starts a new replay: keep a copy to share.
        self._copy = copy_outputs

    def logits(self, batch: Batch) -> Tensor:
        """The teacher's logits for this batch's images (same crops and flips as the student's)."""
        if batch is not self._batch or self._logits is None:
            with self._time(), torch.no_grad():
                self._remember(batch, self._forward(batch.x), None)
        return self._logits

    def features(self, batch: Batch) -> tuple[list[Tensor], Tensor]:
        """Stage features and logits in one pass, for feature- and relation-based methods."""
        if batch is not self._batch or self._features is None:
            with self._time(), torch.no_grad():
                features, logits = self.model.forward_with_features(batch.x)
                self._remember(batch, logits, features)
        return self._features, self._logits

    def _remember(self, batch: Batch, logits: Tensor, features: list[Tensor] | None) -> None:
        if self._copy:
            logits = logits.clone()
            features = [f.clone() for f in features] if features is not None else None
        self.forwards += 1
        self._batch, self._logits, self._features = batch, logits, features

    def _time(self) -> AbstractContextManager:
        return self._timer("teacher") if self._timer else nullcontext()
