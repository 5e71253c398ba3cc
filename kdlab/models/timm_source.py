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
from kdlab.models.hub import check_download, hub_offline_unless_reachable
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
        offline = None
        try:
            if not args["pretrained"]:
                net = timm.create_model(name, **args)
            else:
                _check_url_download(timm, name)
                with hub_offline_unless_reachable() as offline:
                    net = timm.create_model(name, **args)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 (timm's own errors: bad arguments, failed download)
            if offline is not None:
                raise UserError(f"timm:{name}: its published weights are not in the Hugging Face hub's cache and "
                                f"{offline} cannot be reached from here: give a local file with --set weights=PATH "
                                "(a state dict)") from None
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


def _check_url_download(timm: Any, name: str) -> None:
    """Weights timm fetches from a plain URL (not the hub): fail at once when they cannot be."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 (no pretrained config: timm says so itself)
        return
    if cfg is not None and not getattr(cfg, "hf_hub_id", None) and getattr(cfg, "url", None):
        check_download(cfg.url, f"timm:{name}")
