"""Combination: a weighted sum of other registered methods' loss terms, from one student forward.

Not a paper: the usual way benchmarks stack methods (e.g. "KD + RKD" in the CRD benchmark, Tian et
al. 2020). Method args:
    parts:   {method: weight, ...}, e.g. {"kd": 1.0, "rkd": 1.0}; weights >= 0; not "combo" itself.
    args:    {method: {its own method args}}, e.g. {"rkd": {"angle": 0}}; defaults where absent.
    ce_once: true (default): the hard-label cross-entropy, which most parts include, is counted
             once, at the largest weight any part gives it (the parts' "ce" terms are all multiples
             of the same CE, so this is their maximum); false: each part's CE is kept and summed.
From the command line: --method-arg 'parts={kd: 1, rkd: 1}' --method-arg 'args={rkd: {angle: 0}}'.

Terms are logged as "<part>.<term>" (and "ce" when merged). Each part is built with its own
config (method and method_args replaced), so it reads its own defaults and checks its own args.
Parts run in sorted name order, so the order the parts are written in changes nothing (the run's
hash does not see it either). The student and the teacher run once per batch: the parts receive
`SharedStudent` / `SharedTeacher` proxies which compute, on the first request, the features too
if any part uses them (the `uses_features` flag of its class).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kdlab.errors import UserError
from kdlab.methods.base import METHODS, Method, register_method
from kdlab.methods.shared import SharedStudent, SharedTeacher, check_weights, method_args


def _part_config(cfg, name: str, args: dict):
    return dataclasses.replace(cfg, method=name, method_args=dict(args.get(name) or {}))


@register_method
class Combination(Method):
    """Weighted sum of registered methods sharing one student (and teacher) forward per batch."""

    name = "combo"
    needs_teacher = False  # it needs one if a part does: checked per part in check_config
    defaults = {"parts": {}, "args": {}, "ce_once": True}
    paper = "weighted combination of registered methods (no paper)"
    setting = "each part keeps its own defaults and their setting (see that method)"

    @classmethod
    def needs_teacher_for(cls, cfg):
        parts = cfg.method_args.get("parts")
        if not isinstance(parts, dict):
            return False  # check_config reports the malformed parts
        return any(name in METHODS and name != cls.name and METHODS[name].needs_teacher_for(cfg) for name in parts)

    @classmethod
    def versions(cls, cfg):
        out = super().versions(cfg)
        parts, args = cfg.method_args.get("parts"), cfg.method_args.get("args") or {}
        if isinstance(parts, dict) and isinstance(args, dict):  # else check_config reports them
            for name in sorted(parts):
                if name in METHODS and name != cls.name:
                    out.update(METHODS[name].versions(_part_config(cfg, name, args)))
        return out

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        a = method_args(cls, cfg)
        parts, args = a["parts"], a["args"]
        if not isinstance(parts, dict) or not parts:
            raise UserError("method 'combo' needs parts: a mapping of method names to weights, "
                            "e.g. {kd: 1, rkd: 1}")
        for name in parts:
            if name == cls.name or name not in METHODS:
                known = ", ".join(sorted(m for m in METHODS if m != cls.name))
                raise UserError(f"method 'combo': unknown part {name!r}: choose from {known}")
        check_weights(cls.name, {f"weight of part {n!r}": w for n, w in parts.items()},
                      tuple(f"weight of part {n!r}" for n in parts))
        if not isinstance(args, dict):
            raise UserError(f"method 'combo': args must map part names to their args, got {args!r}")
        for name, part_args in args.items():
            if name not in parts:
                raise UserError(f"method 'combo': args given for {name!r}, which is not one of the parts")
            if part_args is not None and not isinstance(part_args, dict):
                raise UserError(f"method 'combo': args of {name!r} must be a mapping, got {part_args!r}")
        if not isinstance(a["ce_once"], bool):
            raise UserError(f"method 'combo': ce_once must be true or false, got {a['ce_once']!r}")
        for name in parts:
            METHODS[name].check_config(_part_config(cfg, name, args))

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        parts, args = self.args["parts"], self.args["args"]
        names = sorted(parts)
        self.weights = {name: float(parts[name]) for name in names}
        self.parts = nn.ModuleDict({name: METHODS[name](_part_config(cfg, name, args), student, teacher)
                                    for name in names})
        self.features = any(part.uses_features for part in self.parts.values())

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        for part in self.parts.values():
            part.start_epoch(epoch)

    def graph_key(self):
        return tuple(part.graph_key() for part in self.parts.values())

    def teacher_needs(self):
        needs = {part.teacher_needs() for part in self.parts.values()} - {None}
        if not needs:
            return None
        # The shared teacher proxy asks for features whenever any part uses features.
        return "features" if self.features or "features" in needs else "logits"

    def forward(self, student, batch, teacher):
        shared_student = SharedStudent(student, self.features)
        shared_teacher = SharedTeacher(teacher, self.features) if teacher is not None else None
        terms, ces, logits = {}, [], None
        for name, part in self.parts.items():
            part_logits, part_terms = part(shared_student, batch, shared_teacher)
            logits = part_logits if logits is None else logits
            for term, value in part_terms.items():
                if term == "ce" and self.args["ce_once"]:
                    ces.append(self.weights[name] * value)
                else:
                    terms[f"{name}.{term}"] = self.weights[name] * value
        if ces:
            terms["ce"] = torch.stack(ces).max()
        return logits, terms
