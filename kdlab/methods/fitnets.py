"""FitNets: the student's "guided" stage regresses the teacher's "hint" stage through a learned adapter.

Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015
(arXiv:1412.6550). The paper trains the hint first, then runs KD; like the CRD benchmark
(Tian et al. 2020, "RepDistiller") we train both at once: loss = ce * CE + beta * MSE(r(f_s), f_t)
+ kd * T^2 KL, with beta = 100 (that benchmark's FitNets weight) and no KD term by default.
Hyperparameters (method args): `teacher_stage` / `student_stage` (null: each model's middle stage,
rounded toward the input; negative counts from the end), `kernel` 3 (the regressor's conv, 1 or 3),
`beta` 100, `ce` 1.0, `kd` 0.0 (KD at the run's temperature).

The regressor r is conv + BatchNorm, without a ReLU: DenseNet's intermediate stage features are
pre-activation (they can be negative), so the hint target is not always non-negative. When the
two stages differ in resolution, both maps are average-pooled to the smaller one; the student's is
pooled before the conv, which is then cheaper.
"""

from __future__ import annotations

from torch import nn

from kdlab.errors import UserError
from kdlab.losses import hint_loss, pool_to, smaller_size, soft_kl
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import check_int, check_weights, hard_ce, method_args, resolve_stage


@register_method
class FitNets(Method):
    """Hint-based feature distillation through a conv + BN regressor."""

    name = "fitnets"
    needs_teacher = True
    uses_features = True
    defaults = {"teacher_stage": None, "student_stage": None, "kernel": 3,
                "beta": 100.0, "ce": 1.0, "kd": 0.0}
    paper = "Romero et al. 2015, ICLR, arXiv:1412.6550"
    setting = ("beta=100 is the CRD benchmark's (RepDistiller, mdistiller) on CIFAR-100: 240 epochs, batch 64, "
               "SGD lr 0.05 (x0.1 at 150, 180, 210), weight decay 5e-4")

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        args = method_args(cls, cfg)
        check_weights(cls.name, args, ("beta", "ce", "kd"))
        check_int(cls.name, args, "teacher_stage", optional=True)
        check_int(cls.name, args, "student_stage", optional=True)
        if args["kernel"] not in (1, 3) or isinstance(args["kernel"], bool):
            raise UserError(f"method 'fitnets': kernel must be 1 or 3, got {args['kernel']!r}")

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        self.t_stage = resolve_stage(self.name, self.args["teacher_stage"], teacher, "teacher")
        self.s_stage = resolve_stage(self.name, self.args["student_stage"], student, "student")
        c_s, c_t = student.stage_channels()[self.s_stage], teacher.stage_channels()[self.t_stage]
        k = self.args["kernel"]
        self.regressor = nn.Sequential(nn.Conv2d(c_s, c_t, k, padding=k // 2, bias=False),
                                       nn.BatchNorm2d(c_t))

    def forward(self, student, batch, teacher):
        t_feats, t_logits = teacher.features(batch)
        feats, logits = student.forward_with_features(batch.x)
        f_s, f_t = feats[self.s_stage], t_feats[self.t_stage]
        hint = hint_loss(self.regressor(pool_to(f_s, smaller_size(f_s, f_t))), f_t)
        a = self.args
        terms = {"ce": a["ce"] * hard_ce(logits, self.cfg, batch.y), "hint": a["beta"] * hint}
        if a["kd"] > 0:
            terms["kd"] = a["kd"] * soft_kl(logits, t_logits, self.cfg.temperature)
        return logits, terms
