"""``torchvision:NAME``: the classification models of torchvision (``torchvision:resnet50``,
``torchvision:mobilenet_v3_small``), built for the data's classes; needs
``pip install 'kdlab[torchvision]'``.

``--width`` scales the families that have a width multiplier (the MobileNets' ``width_mult``);
the others are built as named. ``model_args`` go to the constructor; ``weights: DEFAULT`` (or
``pretrained: true``) fetches the published ImageNet weights where the machine can, and then the
classifier is replaced by a new one for the data's classes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdlab.errors import UserError
from kdlab.models.foreign import ForeignModel, import_extra, pop_feature_nodes, unknown_model
from kdlab.models.hub import check_download
from kdlab.models.registry import ModelSource, register_source

# The constructor argument that scales every layer's width, for the families that have one.
WIDTH_ARGS = {"mobilenet_v2": "width_mult", "mobilenet_v3_large": "width_mult", "mobilenet_v3_small": "width_mult"}


def _models() -> Any:
    import_extra("torchvision", "torchvision")
    import torchvision.models

    return torchvision.models


@register_source
class TorchvisionSource(ModelSource):
    """Classification models of torchvision, by their torchvision name."""

    prefix = "torchvision"

    def create(self, name: str, width: float, num_classes: int, **model_args: Any) -> nn.Module:
        models = _models()
        self.check(name)
        args, nodes = pop_feature_nodes(model_args)
        if width != 1.0:
            if name not in WIDTH_ARGS:
                raise UserError(f"torchvision:{name} has no width multiplier, so it is built as named (width 1), "
                                f"not at width {width:g}; these have one: {', '.join(sorted(WIDTH_ARGS))}")
            args[WIDTH_ARGS[name]] = width
        weights = args.pop("weights", None) or ("DEFAULT" if args.pop("pretrained", False) else None)
        try:
            if weights is None:
                net = models.get_model(name, weights=None, num_classes=num_classes, **args)
            else:  # published weights come with their own classifier: replace it for the data's classes
                _check_weights_download(models, name, weights)
                net = replace_head(models.get_model(name, weights=weights, **args), num_classes, name)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 (torchvision's own errors: bad arguments, failed download)
            hint = (" (published weights are fetched from the network: on a machine without it, give a local file "
                    "with --set weights=PATH)") if weights else ""
            given = {**args, **({"weights": weights} if weights else {})}
            raise UserError(f"torchvision:{name} could not be built with {given}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from None
        return ForeignModel(net, f"torchvision:{name}", num_classes, width, nodes)

    def names(self) -> list[str]:
        models = _models()
        return list(models.list_models(module=models))

    def check(self, name: str) -> None:
        known = self.names()
        if name not in known:
            raise unknown_model("torchvision", name, known)


def _check_weights_download(models: Any, name: str, weights: Any) -> None:
    """Published weights not in torch.hub's cache, on a machine that cannot fetch them: fail at once."""
    try:
        url = models.get_model_weights(name).verify(weights).url
    except Exception:  # noqa: BLE001 (unknown weights: torchvision says so itself when building)
        return
    check_download(url, f"torchvision:{name}")


def replace_head(net: nn.Module, num_classes: int, name: str) -> nn.Module:
    """Give a pretrained classifier a new last linear layer with ``num_classes`` outputs."""
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"torchvision:{name} has no linear classifier to replace for {num_classes} classes")
    path, last = linears[-1]
    if last.out_features == num_classes:
        return net
    parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
    setattr(parent, path.rpartition(".")[2], nn.Linear(last.in_features, num_classes, bias=last.bias is not None))
    return net
