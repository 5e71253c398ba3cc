"""Similarity-preserving KD: the student reproduces the teacher's batch similarity matrices.

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv:1907.09682).
Loss: ce * CE + gamma * sum over chosen stage pairs of ||G_t - G_s||_F^2 / N^2, where G = F F^T
with rows L2-normalised (`kdlab.losses.sp_loss`), + kd * T^2 KL. gamma = 3000 is the paper's
CIFAR-10 weight. G is N x N whatever the channels and resolution, so any student stage can be
compared with any teacher stage without an adapter.
Hyperparameters (method args): `stages` [-1] (student stages; each is paired with the teacher's
stage at the same relative depth; the default is the last stage of both, as in the CRD benchmark),
`gamma` 3000, `ce` 1.0, `kd` 0.0 (KD at the run's temperature).
"""

from __future__ import annotations

from kdlab.losses import soft_kl, sp_loss
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import (
    check_stage_list,
    check_weights,
    hard_ce,
    method_args,
    relative_depth,
    resolve_stage,
)


@register_method
class SimilarityPreservingKD(Method):
    """Relation-based KD on pairwise activation similarities within the batch."""

    name = "sp"
    needs_teacher = True
    uses_features = True
    defaults = {"stages": [-1], "gamma": 3000.0, "ce": 1.0, "kd": 0.0}
    paper = "Tung & Mori 2019, ICCV, arXiv:1907.09682"
    setting = ("gamma=3000 is the paper's CIFAR-10 weight (wide ResNets); mdistiller and RepDistiller use it on "
               "CIFAR-100 (240 epochs, batch 64, SGD lr 0.05)")

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        args = method_args(cls, cfg)
        check_weights(cls.name, args, ("gamma", "ce", "kd"))
        check_stage_list(cls.name, args, "stages")

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        n_s, n_t = len(student.stage_channels()), len(teacher.stage_channels())
        stages = sorted({resolve_stage(self.name, i, student, "student") for i in self.args["stages"]})
        self.pairs = [(i, relative_depth(i, n_s, n_t)) for i in stages]

    def forward(self, student, batch, teacher):
        t_feats, t_logits = teacher.features(batch)
        feats, logits = student.forward_with_features(batch.x)
        a = self.args
        sp = sum(sp_loss(feats[i], t_feats[j]) for i, j in self.pairs)
        terms = {"ce": a["ce"] * hard_ce(logits, self.cfg, batch.y), "sp": a["gamma"] * sp}
        if a["kd"] > 0:
            terms["kd"] = a["kd"] * soft_kl(logits, t_logits, self.cfg.temperature)
        return logits, terms
