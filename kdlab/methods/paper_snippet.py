"""Ablation: the loss the paper's Figure 4 code computes, which is NOT its equation (2).

The snippet feeds probabilities (not log-probabilities) to `KLDivLoss`, negates the result and
scales it by T + 1. What remains depends on the student only through +mean(p_t * p_s), so
minimising it pushes the student's soft distribution *away* from the teacher's. Offered only so
that its effect can be measured beside `kd` (`kdlab grid --methods kd,paper_snippet`); use `kd`.
"""

from __future__ import annotations

from kdlab.losses import paper_snippet_loss
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import hard_ce


@register_method
class PaperSnippet(Method):
    """alpha * CE + (1 - alpha) * (Figure 4's distillation term), for comparison only."""

    name = "paper_snippet"
    needs_teacher = True
    paper = "ablation: the code of the paper's Figure 4 (not its equation (2))"
    setting = "as kd: T and alpha are the run's settings"

    def forward(self, student, batch, teacher):
        t_logits = teacher.logits(batch)
        logits = student(batch.x)
        a, t = self.cfg.alpha, self.cfg.temperature
        # alpha=0 leaves only the snippet's distillation term.
        snippet = paper_snippet_loss(logits, t_logits, batch.y, t, 0.0)
        return logits, {"ce": a * hard_ce(logits, self.cfg, batch.y), "snippet": (1 - a) * snippet}
