"""Attention transfer: the student matches the teacher's spatial attention maps, stage by stage.

Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017 (arXiv:1612.03928).
Loss: ce * CE + beta * sum over stage pairs of at_loss (mean squared difference of the
L2-normalised maps Q = mean_c |f_c|^p) + kd * T^2 KL, with the mean over the batch and the
positions inside each pair's term (`kdlab.losses.at_loss`). The paper writes beta/2 per pair; the
authors' code, mdistiller and RepDistiller all use beta times the sum, with beta = 1000, and the
published tables come from that weight. kdlab uses the code's form, so a beta from those codes
carries over unchanged (a beta meant for the paper's beta/2 formula is halved here).
Hyperparameters (method args): `beta` 1000, `p` 2, `ce` 1.0, `kd` 0.0 (KD at the run's temperature).

Stages are paired by relative depth (all stages of the shallower model; `stage_pairs`). Maps of
different resolutions are compared after average-pooling the finer one's energy to the coarser
grid; a pair at 1x1 carries no information (its normalised map is 1) and contributes zero.
"""

from __future__ import annotations

from kdlab.losses import at_loss, soft_kl
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import check_positive, check_weights, hard_ce, method_args, stage_pairs


@register_method
class AttentionTransfer(Method):
    """Activation-based attention transfer over every matched stage pair."""

    name = "at"
    needs_teacher = True
    uses_features = True
    defaults = {"beta": 1000.0, "p": 2.0, "ce": 1.0, "kd": 0.0}
    paper = "Zagoruyko & Komodakis 2017, ICLR, arXiv:1612.03928"
    setting = ("CIFAR-10 (the authors'): wide ResNets, 200 epochs, batch 128, SGD lr 0.1 (x0.2 at 60, 120, 160), "
               "weight decay 5e-4; mdistiller and RepDistiller use the same beta on CIFAR-100 (240 epochs, batch 64, "
               "lr 0.05)")
    notes = ("term = beta x sum over stage pairs (the authors' code, mdistiller, RepDistiller); the paper writes "
             "beta/2, so halve a beta meant for that formula")
    version = 2  # 2: beta x sum (was beta/2 x sum, half the reference codes' weight)

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        args = method_args(cls, cfg)
        check_weights(cls.name, args, ("beta", "ce", "kd"))
        check_positive(cls.name, args, ("p",))

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        self.pairs = stage_pairs(len(student.stage_channels()), len(teacher.stage_channels()))

    def forward(self, student, batch, teacher):
        t_feats, t_logits = teacher.features(batch)
        feats, logits = student.forward_with_features(batch.x)
        a = self.args
        at = sum(at_loss(feats[i], t_feats[j], a["p"]) for i, j in self.pairs)
        terms = {"ce": a["ce"] * hard_ce(logits, self.cfg, batch.y), "at": a["beta"] * at}
        if a["kd"] > 0:
            terms["kd"] = a["kd"] * soft_kl(logits, t_logits, self.cfg.temperature)
        return logits, terms
