"""``timm:NAME``: any model of the timm library (``timm:resnet50``, ``timm:convnext_tiny``,
``timm:test_resnet``), built for the data's classes; needs ``pip install 'kdlab[timm]'``.

timm models are built as named (width 1: a family's sizes are separate names, such as
``mobilenetv3_small_050``). ``model_args`` go to ``timm.create_model``; ``pretrained: true``
fetches the published weights where the machine can (``--set weights=PATH`` loads a local file).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdlab.errors import UserError
from kdlab.models.foreign import ForeignModel, import_extra, pop_feature_nodes, unknown_model
from kdlab.models.registry import ModelSource, register_source


@register_source
class TimmSource(ModelSource):
    """Models of the timm library, by their timm name."""

    prefix = "timm"

    def create(self, name: str, width: float, num_classes: int, **model_args: Any) -> nn.Module:
        timm = import_extra("timm", "timm")
        self.check(name)
        args, nodes = pop_feature_nodes(model_args)
        if width != 1.0:
            raise UserError(f"timm:{name} is built as named (width 1), not at width {width:g}: choose a smaller "
                            "variant by name (e.g. timm:resnet10t, timm:mobilenetv3_small_050)")
        args = {"pretrained": False, **args, "num_classes": num_classes}
        try:
            net = timm.create_model(name, **args)
        except Exception as e:  # noqa: BLE001 (timm's own errors: bad arguments, failed download)
            hint = (" (pretrained weights are fetched from the network: on a machine without it, give a local file "
                    "with --set weights=PATH)") if args["pretrained"] else ""
            raise UserError(f"timm:{name} could not be built with {args}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from None
        return ForeignModel(net, f"timm:{name}", num_classes, width, nodes)

    def names(self) -> list[str]:
        return list(import_extra("timm", "timm").list_models())

    def check(self, name: str) -> None:
        timm = import_extra("timm", "timm")
        if not timm.is_model(name):
            raise unknown_model("timm", name, timm.list_models())
