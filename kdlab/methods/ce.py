"""Training from scratch with cross-entropy: the teachers and the students without KD."""

from __future__ import annotations

from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import hard_ce


@register_method
class CrossEntropy(Method):
    """Plain supervised training: the loss is CE(student(x), y)."""

    name = "ce"
    paper = "baseline (no distillation)"

    def forward(self, student, batch, teacher):
        logits = student(batch.x)
        return logits, {"ce": hard_ce(logits, self.cfg, batch.y)}
