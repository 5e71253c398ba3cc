"""Hinton KD, as the paper's equation (2): alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T).

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015. Hyperparameters:
`temperature` (T) and `alpha` (weight of the hard-label cross-entropy), both top-level settings.
"""

from __future__ import annotations

from kdlab.losses import soft_kl
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import hard_ce


@register_method
class HintonKD(Method):
    """Response-based offline KD from a frozen teacher's logits."""

    name = "kd"
    needs_teacher = True
    paper = "Hinton et al. 2015, arXiv:1503.02531"
    setting = ("T and alpha are the run's settings (--temperature, --alpha): the paper preset's T=3, alpha=0.7 are "
               "Patel & Obeid's (CIFAR-10, 100 epochs, batch 128, SGD lr 0.01); the fast preset uses T=4, alpha=0.5")

    def forward(self, student, batch, teacher):
        t_logits = teacher.logits(batch)
        logits = student(batch.x)
        a, t = self.cfg.alpha, self.cfg.temperature
        ce = hard_ce(logits, self.cfg, batch.y)
        return logits, {"ce": a * ce, "kd": (1 - a) * soft_kl(logits, t_logits, t)}
