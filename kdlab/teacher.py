"""A frozen teacher: loaded once, in eval mode, never building a graph or receiving gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdlab.data.loader import Batch


class Teacher:
    """Wraps a trained model for distillation: outputs under no_grad, in eval mode.

    `no_grad` rather than `inference_mode`: the teacher's outputs are saved by the student's loss
    for its backward pass, which inference tensors may not be. The outputs for the latest batch
    are held, so students trained side by side on the same batch share one forward: the engine
    runs the teacher once per batch (`run`, then `hold`), and methods read what it holds through
    `logits` and `features`. Used on its own (tests, notebooks), `logits` and `features` compute
    what a new batch needs.
    """

    def __init__(self, model: nn.Module, run_id: str | None = None, forward: Callable[[Tensor], Tensor] | None = None,
                 copy_outputs: bool = False):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.run_id = run_id
        self._forward = forward if forward is not None else self.model
        self._batch: Batch | None = None
        self._logits: Tensor | None = None
        self._features: list[Tensor] | None = None
        self.forwards = 0  # how many forward passes actually ran (the rest were shared)
        # Under torch.compile's own CUDA graphs (compile=reduce-overhead) a compiled module's outputs
        # live in memory that the next graph replay reuses, and the next student's compiled forward
        # starts a new replay: keep a copy to share.
        self._copy = copy_outputs

    def run(self, x: Tensor, features: bool) -> tuple[list[Tensor] | None, Tensor]:
        """One forward pass: (stage features or None, logits). Pure: holds nothing."""
        with torch.no_grad():
            if features:
                feats, logits = self.model.forward_with_features(x)
            else:
                feats, logits = None, self._forward(x)
        if self._copy:
            logits = logits.clone()
            feats = [f.clone() for f in feats] if feats is not None else None
        return feats, logits

    def hold(self, batch: Batch, feats: list[Tensor] | None, logits: Tensor) -> None:
        """Remember the outputs for `batch`: what `logits` / `features` return for it."""
        self.forwards += 1
        self._batch, self._logits, self._features = batch, logits, feats

    def drop(self) -> None:
        """Forget the held outputs (the end of a group: they may live in memory it releases)."""
        self._batch, self._logits, self._features = None, None, None

    def logits(self, batch: Batch) -> Tensor:
        """The teacher's logits for this batch's images (same crops and flips as the student's)."""
        if batch is not self._batch or self._logits is None:
            self.hold(batch, *self.run(batch.x, features=False))
        return self._logits

    def features(self, batch: Batch) -> tuple[list[Tensor], Tensor]:
        """Stage features and logits in one pass, for feature- and relation-based methods."""
        if batch is not self._batch or self._features is None:
            self.hold(batch, *self.run(batch.x, features=True))
        return self._features, self._logits
