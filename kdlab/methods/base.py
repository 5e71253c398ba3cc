"""What a training method is: a small module that turns a batch into named loss terms.

A method owns its own learnable parts (a regressor, an embedding, peer networks); the training
loop optimises them together with the student, sums the returned terms and logs each one. Adding
a method is one file with one `@register_method` class: the loop never names a method.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from kdlab.errors import UserError
from kdlab.models.foreign import FEATURE_READERS

if TYPE_CHECKING:
    from kdlab.config import Config
    from kdlab.data.loader import Batch
    from kdlab.teacher import Teacher

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    if cls.uses_features:
        FEATURE_READERS.add(cls.name)  # named by a model's "no stage features" message (kdlab.models.foreign)
    return cls


class Method(nn.Module):
    """Base class of every training method.

    Subclasses set `name`, `needs_teacher`, `defaults` (their own hyperparameters, read from
    `config.method_args`) and `paper` (the reference), and implement `forward`.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    uses_features: ClassVar[bool] = False  # needs stage features, not only logits
    defaults: ClassVar[dict[str, Any]] = {}
    paper: ClassVar[str] = ""
    setting: ClassVar[str] = ""  # the paper's setting its defaults were tuned in (dataset, lr, batch...)
    notes: ClassVar[str] = ""  # how the loss differs from the paper's or the reference code's, if it does
    # Bumped when a change of the method's formula or defaults changes what a run computes.
    version: ClassVar[int] = 1

    def __init__(self, cfg: Config, student: nn.Module, teacher: nn.Module | None):
        super().__init__()
        self.cfg = cfg
        self.args = {**self.defaults, **cfg.method_args}
        self.epoch = 0

    @classmethod
    def versions(cls, cfg: Config) -> dict[str, int]:
        """{name: version} for the run's identity once the method has changed (nothing at version 1),
        so a run stored before the change is never returned for the new behaviour."""
        return {cls.name: cls.version} if cls.version > 1 else {}

    @classmethod
    def needs_teacher_for(cls, cfg: Config) -> bool:
        """Whether this configuration of the method distils from a teacher (combinations ask their parts)."""
        return cls.needs_teacher

    @classmethod
    def typed_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        """The method's arguments with whole numbers given for float settings made floats: beta=8 and
        beta=8.0 are one setting, so one run (one id), however they were written."""
        out = dict(args)
        for key, value in args.items():
            if isinstance(cls.defaults.get(key), float) and isinstance(value, int) and not isinstance(value, bool):
                out[key] = float(value)
        return out

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Reject method arguments this method does not know or cannot use."""
        unknown = set(cfg.method_args) - set(cls.defaults)
        if unknown:
            known = ", ".join(sorted(cls.defaults)) or "none"
            raise UserError(f"method {cls.name!r} has no argument {sorted(unknown)[0]!r} (its arguments: {known})")
        if cls.needs_teacher_for(cfg) and not cfg.teacher:
            raise UserError(f"method {cls.name!r} needs a teacher: use `kdlab distill --teacher RUN_OR_CHECKPOINT`")

    def start_epoch(self, epoch: int) -> None:
        """Called by the loop before each epoch (0-based); methods with schedules (ESKD) use it.

        A value that changes with the epoch and enters the loss belongs in a buffer updated here
        (`fill_`), not in a Python number: the engine replays the step as a CUDA graph, which keeps
        the numbers it was captured with (see `graph_key` for Python code that takes another path).
        """
        self.epoch = epoch

    def graph_key(self) -> Hashable:
        """What `forward`'s Python code depends on besides tensors in the current epoch (ESKD: whether
        the stop epoch has passed). The engine captures the step in a CUDA graph again whenever this
        changes. None: nothing."""
        return None

    def teacher_needs(self) -> str | None:
        """What `forward` reads from the teacher in the current epoch: "features" (stage features and
        logits), "logits", or None. The engine runs the teacher once per batch to provide it."""
        if not self.needs_teacher_for(self.cfg):
            return None
        return "features" if self.uses_features else "logits"

    def forward(self, student: nn.Module, batch: Batch, teacher: Teacher | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the student's logits and the weighted loss terms whose sum is minimised."""
        raise NotImplementedError
