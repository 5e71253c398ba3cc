"""Relational KD: the student preserves the distances and angles among the teacher's embeddings.

Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068).
Loss: ce * CE + distance * L_D + angle * L_A + kd * T^2 KL, where L_D is the Huber loss between
mean-normalised pairwise distances and L_A the Huber loss between triplet angle cosines
(`kdlab.losses.rkd_distance_loss`, `rkd_angle_loss`). The embeddings are the penultimate
features: the last stage's output, globally average-pooled (what every zoo model's classifier
reads). Student and teacher embedding sizes may differ; no projection is needed.
Hyperparameters (method args): `distance` 25, `angle` 50 (the paper's weights), `ce` 1.0,
`kd` 0.0 (KD at the run's temperature).

Normalisation: each loss is averaged over the pairs (N(N-1)) and triplets (N(N-1)^2) that carry
a relation; the reference codes (the authors', RepDistiller, mdistiller) average over all N^2 and
N^3 entries, zeros included. So kdlab's distance term is N/(N-1) and its angle term (N/(N-1))^2
times theirs at equal weights: to use a weight from those codes at batch N, multiply it by
(N-1)/N (distance) and ((N-1)/N)^2 (angle); at batch 128 the factors are 0.992 and 0.984.

The angle loss builds an (N, N, D) difference tensor and an (N, N, N) cosine tensor: at batch 512
and D = 1024 that is about 1 GiB each, fine on a GPU, to keep in mind on small ones.
"""

from __future__ import annotations

from torch import Tensor

from kdlab.losses import rkd_angle_loss, rkd_distance_loss, soft_kl
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import check_weights, hard_ce, method_args


def embedding(last_stage: Tensor) -> Tensor:
    """Global-average-pooled last stage feature: the penultimate embedding, (N, C), in float32."""
    return last_stage.float().mean(dim=(2, 3))


@register_method
class RelationalKD(Method):
    """Distance-wise and angle-wise relational distillation on the penultimate embeddings."""

    name = "rkd"
    needs_teacher = True
    uses_features = True
    defaults = {"distance": 25.0, "angle": 50.0, "ce": 1.0, "kd": 0.0}
    paper = "Park et al. 2019, CVPR, arXiv:1904.05068"
    setting = ("the paper's weights for classification; mdistiller uses them on CIFAR-100 (240 epochs, batch 64, "
               "SGD lr 0.05, x0.1 at 150, 180, 210)")
    notes = ("averaged over the N(N-1) pairs and N(N-1)^2 triplets, not all N^2 and N^3 entries as the reference "
             "codes: a weight from those codes becomes weight x (N-1)/N (distance) and x ((N-1)/N)^2 (angle)")

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        check_weights(cls.name, method_args(cls, cfg), ("distance", "angle", "ce", "kd"))

    def forward(self, student, batch, teacher):
        t_feats, t_logits = teacher.features(batch)
        feats, logits = student.forward_with_features(batch.x)
        e_s, e_t = embedding(feats[-1]), embedding(t_feats[-1])
        a = self.args
        terms = {"ce": a["ce"] * hard_ce(logits, self.cfg, batch.y)}
        # A zero weight skips its term's work entirely (the angle term is the costly one).
        if a["distance"] > 0:
            terms["rkd_distance"] = a["distance"] * rkd_distance_loss(e_s, e_t)
        if a["angle"] > 0:
            terms["rkd_angle"] = a["angle"] * rkd_angle_loss(e_s, e_t)
        if a["kd"] > 0:
            terms["kd"] = a["kd"] * soft_kl(logits, t_logits, self.cfg.temperature)
        return logits, terms
