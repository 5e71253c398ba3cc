"""Decoupled KD: the KD loss split into target-class and non-target-class parts, reweighted.

Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022 (arXiv:2203.08679).
Loss: ce * CE + w(epoch) * s * (alpha * TCKD + beta * NCKD), where TCKD and NCKD are T^2-scaled
KLs (see `kdlab.losses.dkd_parts`) at the run's `temperature` (the paper uses T=4 on CIFAR-100).
Hyperparameters (method args): `alpha` 1.0 and `beta` 8.0 (the paper's CIFAR-100 values), `ce`
1.0, `warmup` 1/12: w rises linearly over that fraction of the run's epochs,
w = min((epoch+1) / (warmup * epochs), 1) (the authors' warm-up, their epochs counted from 1);
0 switches it off. The authors warm up over 20 of their 240 epochs; a warm-up in epochs would not
scale with the run (20 epochs is all of a 15-epoch run), so like the lr schedules it is a fraction.

`scale` s: ``auto`` (the default) is min(1, LR_REF / lr), a number is used as given (1: the
authors' weights at any lr). Why: at its CIFAR-100 weights DKD's gradient is large. Measured on
1,437 32x32 digit images (10 classes; resnet18@0.5 teacher at 99.2%, vgg16@0.125 student, smoke
recipe, 15 epochs), at the student's initialisation the gradient of CE + TCKD + 8 NCKD at T=3 is
11x that of CE alone (KD at alpha 0.7: 1.5x). With lr 0.1 (the smoke preset) and also 0.05 (the
authors' own lr) the first epoch's updates push the student's ReLU classifier into a dead state:
constant logits, training accuracy at chance for all 15 epochs, a finite flat loss. At lr 0.025 it
crawled (63% test), at lr 0.01 it trained (95.3%; KD 94.2%, the student alone 96.4%). What fails is
lr x weight, so by default kdlab keeps that product at most what trained: the authors' weights up to
lr 0.01 (the paper preset: unchanged), 0.1x at the smoke preset's 0.1 (measured: it trains), 0.05x
at the fast preset's 0.2. `benchmarks/dkd_small_data.py` repeats the measurement.
"""

from __future__ import annotations

from numbers import Real

import torch

from kdlab.errors import UserError
from kdlab.losses import dkd_parts
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import check_weights, hard_ce, method_args

WARMUP = 20 / 240  # the authors' warm-up: 20 of their 240 CIFAR-100 epochs
LR_REF = 0.01  # the highest lr at which the authors' weights trained in kdlab's measurement (see above)


def weight_scale(args: dict, lr: float) -> float:
    """The factor s on alpha and beta: min(1, LR_REF / lr) for ``auto``, else the given number."""
    scale = args["scale"]
    return min(1.0, LR_REF / lr) if scale == "auto" else float(scale)


@register_method
class DecoupledKD(Method):
    """Response-based KD with TCKD and NCKD weighted separately, the DKD term warmed up linearly and
    scaled down at learning rates above 0.01 (see the module's docstring)."""

    name = "dkd"
    needs_teacher = True
    defaults = {"alpha": 1.0, "beta": 8.0, "ce": 1.0, "warmup": WARMUP, "scale": "auto"}
    paper = "Zhao et al. 2022, CVPR, arXiv:2203.08679"
    setting = ("CIFAR-100 (the authors' and mdistiller's): 240 epochs, batch 64, SGD lr 0.05 (x0.1 at epochs "
               "150, 180, 210), weight decay 5e-4, T=4; warm-up 20 of the 240 epochs. alpha=1, beta=8 are their "
               "CIFAR-100 values (ImageNet: alpha=beta=0.5, T=1)")
    notes = ("scale=auto multiplies alpha and beta by min(1, 0.01/lr): at the authors' weights the DKD gradient is "
             "~7x KD's, and at lr 0.05 and 0.1 kdlab measured it leaving a small VGG student at chance (a dead ReLU "
             "classifier; 63% at lr 0.025, trained at 0.01); scale=1 gives the authors' weights at any lr")
    # 2: warm-up as a fraction of the run (was 20 epochs whatever the run's length)
    # 3: alpha and beta scaled by min(1, 0.01 / lr) by default (runs at lr <= 0.01 compute what 2 did)
    version = 3

    @classmethod
    def versions(cls, cfg):
        # Only runs whose computation changed are new runs: at scale 1 DKD computes what version 2 did.
        args = {**cls.defaults, **cfg.method_args}
        return {cls.name: 3 if weight_scale(args, cfg.lr) != 1.0 else 2}

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        args = method_args(cls, cfg)
        check_weights(cls.name, args, ("alpha", "beta", "ce", "warmup"))
        if args["warmup"] >= 1:
            raise UserError(f"method 'dkd': warmup is a fraction of the run's epochs, in [0, 1), got "
                            f"{args['warmup']!r} (the paper's 20 of 240 epochs is {WARMUP:.3f})")
        scale = args["scale"]
        if scale != "auto" and (isinstance(scale, bool) or not isinstance(scale, Real)):
            raise UserError(f"method 'dkd': scale is 'auto' or a number >= 0 (1: the authors' weights), got {scale!r}")
        if scale != "auto":
            check_weights(cls.name, args, ("scale",))

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        # A buffer, not a float: a step replayed as a CUDA graph reads its current value.
        self.register_buffer("ramp", torch.tensor(self._ramp(0)), persistent=False)
        self.scale = weight_scale(self.args, cfg.lr)

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
        a, s = self.args, self.scale
        return logits, {"ce": a["ce"] * hard_ce(logits, self.cfg, batch.y),
                        "tckd": self.ramp * (s * a["alpha"]) * tckd, "nckd": self.ramp * (s * a["beta"]) * nckd}
