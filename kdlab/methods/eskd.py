"""Early-stopped KD: Hinton KD whose soft term is switched off after `stop_epoch` epochs.

Cho & Hariharan, "On the Efficacy of Knowledge Distillation", ICCV 2019 (arXiv:1910.01348): KD
can hurt late in training when the student cannot follow the teacher, so the KD term is stopped
early and training finishes on the labels alone. For the first `stop_epoch` epochs the loss is
Hinton's equation (2) at the run's `alpha` and `temperature` (as `kd`); from then on it is plain
CE (weight 1) and the teacher is not run at all.
Hyperparameters (method args): `stop_epoch` 0 (= half the run's epochs, at least 1).

The paper's other half, an early-stopped *teacher* (a checkpoint from before its final epoch),
is a choice of teacher, not of loss: pass that checkpoint as the teacher.
"""

from __future__ import annotations

from kdlab.errors import UserError
from kdlab.losses import soft_kl
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import check_int, hard_ce, method_args


@register_method
class EarlyStoppedKD(Method):
    """Hinton KD for the first `stop_epoch` epochs, cross-entropy alone after."""

    name = "eskd"
    needs_teacher = True
    defaults = {"stop_epoch": 0}
    paper = "Cho & Hariharan 2019, ICCV, arXiv:1910.01348"
    setting = ("stop_epoch 0 stops KD at half the run, whatever its length; the paper tuned its stop for its own "
               "schedules, so set it for yours")

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        args = method_args(cls, cfg)
        check_int(cls.name, args, "stop_epoch", minimum=0)
        if args["stop_epoch"] > cfg.epochs:
            raise UserError(f"method 'eskd': stop_epoch {args['stop_epoch']} is beyond the run's "
                            f"{cfg.epochs} epochs, so KD would never stop: use method 'kd'")

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        self.stop_epoch = self.args["stop_epoch"] or max(1, cfg.epochs // 2)

    @property
    def distilling(self) -> bool:
        return self.epoch < self.stop_epoch

    def graph_key(self):
        return self.distilling

    def teacher_needs(self):
        return "logits" if self.distilling else None

    def forward(self, student, batch, teacher):
        # Ask for the teacher only while it is used: after the stop it costs nothing.
        t_logits = teacher.logits(batch) if self.distilling else None
        logits = student(batch.x)
        ce = hard_ce(logits, self.cfg, batch.y)
        if t_logits is None:
            # Same term names every epoch, so the logged history has the same columns throughout.
            return logits, {"ce": ce, "kd": ce.new_zeros(())}
        a, t = self.cfg.alpha, self.cfg.temperature
        return logits, {"ce": a * ce, "kd": (1 - a) * soft_kl(logits, t_logits, t)}
