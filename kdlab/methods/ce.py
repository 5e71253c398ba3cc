"""Training from scratch with cross-entropy: the teachers and the students without KD."""

from __future__ import annotations

import torch.nn.functional as F

from kdlab.methods.base import Method, register_method


@register_method
class CrossEntropy(Method):
    """Plain supervised training: the loss is CE(student(x), y)."""

    name = "ce"
    paper = "baseline (no distillation)"

    def forward(self, student, batch, teacher):
        logits = student(batch.x)
        ce = F.cross_entropy(logits.float(), batch.y, label_smoothing=self.cfg.label_smoothing)
        return logits, {"ce": ce}
