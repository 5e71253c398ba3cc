"""Deep mutual learning: the student and its peers train together from scratch, each mimicking the others.

Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384).
Each of the K = 1 + `peers` networks minimises ce * CE + kl * mean over the others of
T^2 KL(p_other || p_self) (`kdlab.losses.mutual_kl`; T = `temperature`, 1 in the paper). The
paper alternates the networks' updates within a step; here all are updated at once from the same
batch with the others' predictions held constant, the usual simultaneous form.
Hyperparameters (method args): `peers` 1, `peer_model` null (the student's architecture),
`peer_width` null (the student's width), `temperature` 1.0, `ce` 1.0, `kl` 1.0.

The peers are this method's submodules, so the loop's optimiser trains them with the student and
checkpoints save them; only the student is evaluated. No teacher is used.
"""

from __future__ import annotations

from torch import nn

from kdlab.errors import UserError
from kdlab.losses import mutual_kl
from kdlab.methods.base import Method, register_method
from kdlab.methods.shared import check_int, check_positive, check_weights, hard_ce, method_args


@register_method
class DeepMutualLearning(Method):
    """Online distillation among a cohort of networks trained from scratch."""

    name = "dml"
    needs_teacher = False
    defaults = {"peers": 1, "peer_model": None, "peer_width": None, "temperature": 1.0, "ce": 1.0, "kl": 1.0}
    paper = "Zhang et al. 2018, CVPR, arXiv:1706.00384"
    setting = "the paper's CIFAR-100 setting: SGD with Nesterov momentum, lr 0.1, batch 64, 200 epochs; T=1"

    @classmethod
    def check_config(cls, cfg):
        from kdlab.models import list_models

        super().check_config(cfg)
        args = method_args(cls, cfg)
        check_int(cls.name, args, "peers", minimum=1)
        check_weights(cls.name, args, ("ce", "kl"))
        check_positive(cls.name, args, ("temperature",))
        model = args["peer_model"]
        if model is not None and model not in list_models():
            raise UserError(f"method 'dml': unknown peer_model {model!r}: "
                            f"choose one of {', '.join(list_models())}")
        if args["peer_width"] is not None:
            check_positive(cls.name, args, ("peer_width",))

    def __init__(self, cfg, student, teacher):
        from kdlab.models import create_model

        super().__init__(cfg, student, teacher)
        model = self.args["peer_model"] or cfg.model
        width = self.args["peer_width"] or cfg.width
        self.peers = nn.ModuleList(create_model(model, width, student.num_classes)
                                   for _ in range(self.args["peers"]))

    def forward(self, student, batch, teacher):
        logits = student(batch.x)
        all_logits = [logits] + [peer(batch.x) for peer in self.peers]
        kls = mutual_kl(all_logits, self.args["temperature"])
        a = self.args
        terms = {}
        for k, (z, kl) in enumerate(zip(all_logits, kls, strict=True)):
            prefix = "" if k == 0 else f"peer{k}_"
            terms[prefix + "ce"] = a["ce"] * hard_ce(z, self.cfg, batch.y)
            terms[prefix + "kl"] = a["kl"] * kl
        return logits, terms
