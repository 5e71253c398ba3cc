"""Decoupled KD: the KD loss split into target-class and non-target-class parts, reweighted.

Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022 (arXiv:2203.08679).
Loss: ce * CE + w(epoch) * (alpha * TCKD + beta * NCKD), where TCKD and NCKD are T^2-scaled KLs
(see `kdlab.losses.dkd_parts`) at the run's `temperature` (the paper uses T=4 on CIFAR-100).
Hyperparameters (method args): `alpha` 1.0 and `beta` 8.0 (the paper's CIFAR-100 values),
`ce` 1.0, `warmup` 20: w rises linearly over the first `warmup` epochs, w = min((epoch+1)/warmup, 1)
(the authors' warm-up, their epochs counted from 1); 0 switches the warm-up off.
"""

from __future__ import annotations

import torch

from kdlab.losses import dkd_parts
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import check_int, check_weights, hard_ce, method_args


@register_method
class DecoupledKD(Method):
    """Response-based KD with TCKD and NCKD weighted separately, the DKD term warmed up linearly."""

    name = "dkd"
    needs_teacher = True
    defaults = {"alpha": 1.0, "beta": 8.0, "ce": 1.0, "warmup": 20}
    paper = "Zhao et al. 2022, CVPR, arXiv:2203.08679"

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        args = method_args(cls, cfg)
        check_weights(cls.name, args, ("alpha", "beta", "ce"))
        check_int(cls.name, args, "warmup", minimum=0)

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        # A buffer, not a float: a step replayed as a CUDA graph reads its current value.
        self.register_buffer("ramp", torch.tensor(self._ramp(0)), persistent=False)

    def _ramp(self, epoch: int) -> float:
        warmup = self.args["warmup"]
        return 1.0 if warmup == 0 else min((epoch + 1) / warmup, 1.0)

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self.ramp.fill_(self._ramp(epoch))

    def forward(self, student, batch, teacher):
        t_logits = teacher.logits(batch)
        logits = student(batch.x)
        tckd, nckd = dkd_parts(logits, t_logits, batch.y, self.cfg.temperature)
        a = self.args
        return logits, {"ce": a["ce"] * hard_ce(logits, self.cfg, batch.y),
                        "tckd": self.ramp * a["alpha"] * tckd, "nckd": self.ramp * a["beta"] * nckd}
