"""Decoupled KD: the KD loss split into target-class and non-target-class parts, reweighted.

Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022 (arXiv:2203.08679).
Loss: ce * CE + w(epoch) * (alpha * TCKD + beta * NCKD), where TCKD and NCKD are T^2-scaled KLs
(see `kdlab.losses.dkd_parts`) at the run's `temperature` (the paper uses T=4 on CIFAR-100).
Hyperparameters (method args): `alpha` 1.0 and `beta` 8.0 (the paper's CIFAR-100 values),
`ce` 1.0, `warmup` 1/12: w rises linearly over that fraction of the run's epochs,
w = min((epoch+1) / (warmup * epochs), 1) (the authors' warm-up, their epochs counted from 1);
0 switches it off. The authors warm up over 20 of their 240 epochs; a warm-up in epochs would not
scale with the run (20 epochs is all of a 15-epoch run), so like the lr schedules it is a fraction.
"""

from __future__ import annotations

import torch

from kdlab.errors import UserError
from kdlab.losses import dkd_parts
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import check_weights, hard_ce, method_args

WARMUP = 20 / 240  # the authors' warm-up: 20 of their 240 CIFAR-100 epochs


@register_method
class DecoupledKD(Method):
    """Response-based KD with TCKD and NCKD weighted separately, the DKD term warmed up linearly."""

    name = "dkd"
    needs_teacher = True
    defaults = {"alpha": 1.0, "beta": 8.0, "ce": 1.0, "warmup": WARMUP}
    paper = "Zhao et al. 2022, CVPR, arXiv:2203.08679"
    setting = ("CIFAR-100 (the authors' and mdistiller's): 240 epochs, batch 64, SGD lr 0.05 (x0.1 at epochs "
               "150, 180, 210), weight decay 5e-4, T=4; warm-up 20 of the 240 epochs. beta=8 is their CIFAR-100 "
               "value: with fewer classes, a higher lr or a tiny student, lower it (it can take a run to chance)")
    version = 2  # 2: warm-up as a fraction of the run (was 20 epochs whatever the run's length)

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        args = method_args(cls, cfg)
        check_weights(cls.name, args, ("alpha", "beta", "ce", "warmup"))
        if args["warmup"] >= 1:
            raise UserError(f"method 'dkd': warmup is a fraction of the run's epochs, in [0, 1), got "
                            f"{args['warmup']!r} (the paper's 20 of 240 epochs is {WARMUP:.3f})")

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        # A buffer, not a float: a step replayed as a CUDA graph reads its current value.
        self.register_buffer("ramp", torch.tensor(self._ramp(0)), persistent=False)

    def _ramp(self, epoch: int) -> float:
        warmup_epochs = self.args["warmup"] * self.cfg.epochs
        return 1.0 if warmup_epochs == 0 else min((epoch + 1) / warmup_epochs, 1.0)

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
