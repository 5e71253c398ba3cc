"""``module:NAME``: an ``nn.Module`` handed to the Python API (``kdlab.train(my_net, ...)``).

The module is registered under a name that carries a digest of its structure and initial
weights, ``module:MyNet.3f2a9c01b7d4e5a6``, so the run's identity (its config hash) changes when
either does, and the same module trained twice is the same run. It exists only in the process
that registered it; each build is a copy of the module as it was registered.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from torch import nn

from kdlab.errors import UserError
from kdlab.models.foreign import ForeignModel
from kdlab.models.registry import ModelSource, register_source


def module_digest(module: nn.Module) -> str:
    """A digest of a module's class, structure (its repr) and every parameter and buffer."""
    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}".encode())
    for key, value in module.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        h.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()[:16]


def module_name(module: nn.Module) -> str:
    """The kdlab name of a module: ``module:ClassName.digest``."""
    return f"module:{type(module).__name__}.{module_digest(module)}"


@register_source
class ModuleSource(ModelSource):
    """Modules registered in this process by the Python API."""

    prefix = "module"
    about = ("an nn.Module given to kdlab.train or kdlab.distill in Python, named module:<Class>.<digest> in the "
             "process that gave it")

    def __init__(self) -> None:
        self._modules: dict[str, nn.Module] = {}

    def register(self, module: nn.Module) -> str:
        """Keep a copy of ``module`` as it is now; return its kdlab name."""
        name = module_name(module)
        self._modules.setdefault(name.partition(":")[2], copy.deepcopy(module).cpu())
        return name

    def create(self, name: str, width: float, num_classes: int, **model_args: Any) -> nn.Module:
        self.check(name)
        if width != 1.0 or model_args:
            raise UserError(f"module:{name} is built as it was given: no width ({width:g}) or model_args")
        return as_model(copy.deepcopy(self._modules[name]), f"module:{name}", num_classes)

    def names(self) -> list[str]:
        return sorted(self._modules)

    def check(self, name: str) -> None:
        if name not in self._modules:
            raise UserError(f"module:{name} is a module given to the Python API: it exists only in the process "
                            "that passed it to kdlab.train or kdlab.distill")


def as_model(module: nn.Module, name: str, num_classes: int | None) -> nn.Module:
    """The module itself when it has kdlab's model interface already, else wrapped in one."""
    if all(hasattr(module, a) for a in ("forward_with_features", "stage_channels", "stage_reductions")):
        module.name = getattr(module, "name", "") or name
        if num_classes is not None:
            module.num_classes = num_classes
        return module
    return ForeignModel(module, name, num_classes)


def register_module(module: nn.Module) -> str:
    """Make ``module`` buildable by name (``create_model(register_module(m))``); returns the name."""
    from kdlab.models.registry import list_sources

    return list_sources()["module"].register(module)
