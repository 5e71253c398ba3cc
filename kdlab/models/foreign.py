"""Models from elsewhere (timm, torchvision, any ``nn.Module``) in the shape kdlab's methods read.

`ForeignModel` wraps a module: ``forward`` is the module's own, and ``forward_with_features``,
``stage_channels``, ``stage_reductions`` and ``num_classes`` come from one of two ways of finding
its stages, so feature and relation methods treat it like a kdlab model:

- timm models: ``forward_intermediates`` and ``feature_info``, timm's own stage outputs;
- any other module: torchvision's feature extraction by node name (torch.fx). The stage nodes are
  the module's top-level blocks (and the blocks of a top-level ``Sequential``, such as
  ``features.3``), found by a dry run at two image sizes: the last block at each downsampling
  factor is a stage (blocks whose output does not scale with the image, such as pooling to 1x1,
  are not). ``model_args={"feature_nodes": [...]}`` names the nodes instead.

A module whose stages cannot be found still trains with response methods (kd, dkd, ...); asking
it for features raises one line naming the methods that need them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kdlab.errors import UserError

# Dry-run image sizes: stage outputs scale with the input, global pools do not.
_PROBE_SIZES = (64, 128)


@contextmanager
def dry_run(model: nn.Module, image_hw: tuple[int, int], batch: int = 1) -> Iterator[Tensor]:
    """Blank images on the model's device, with the model in eval mode and no gradients, so that a
    look at its outputs changes nothing (BatchNorm statistics, dropout); its mode is restored after."""
    param = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield torch.zeros(batch, 3, *image_hw, device=param.device if param is not None else None)
    finally:
        model.train(was_training)


def unknown_model(library: str, name: str, known: Sequence[str]) -> UserError:
    """One line for a name a library does not have, with the closest names it does."""
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"{library} has no model {name!r}{hint}: `kdlab models --all` lists them")


def import_extra(module: str, extra: str) -> Any:
    """Import an optional library, or say in one line which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 (missing, or failing to import beside this torch)
        detail = "" if isinstance(e, ModuleNotFoundError) else f" ({type(e).__name__}: {str(e).splitlines()[0]})"
        raise UserError(f"this needs {module}, which does not import{detail}: pip install 'kdlab[{extra}]'") from None


# Names of the methods that read stage features, for the message of a model that gives none. The
# methods registry (one layer up, kdlab.methods.base.register_method) adds them, so this layer
# names them without importing the methods.
FEATURE_READERS: set[str] = set()


def feature_methods() -> list[str]:
    """Names of the registered methods that read stage features."""
    return sorted(FEATURE_READERS)


def no_features(name: str, why: str) -> UserError:
    """The one-line error for a model whose stage features cannot be found."""
    return UserError(f"model {name} gives no stage features ({why}): methods {', '.join(feature_methods())} need "
                     "them; use a response method (kd, dkd, dml, eskd), or name its stage nodes with "
                     "--set 'model_args={feature_nodes: [NODE, ...]}'")


class TimmStages:
    """Stages of a timm model: its ``feature_info`` and ``forward_intermediates``."""

    def __init__(self, net: nn.Module):
        info = list(net.feature_info)
        self.channels = [int(f["num_chs"]) for f in info]
        self.reductions = [int(f["reduction"]) for f in info]

    def run(self, net: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
        final, feats = net.forward_intermediates(x)
        return list(feats), net.forward_head(final)

    def reset(self) -> None:
        """Nothing cached: timm runs the model's own modules."""


class NodeStages:
    """Stages of any traceable module, by node name (torchvision's feature extraction)."""

    def __init__(self, net: nn.Module, name: str, nodes: Sequence[str] | None = None):
        try:
            import_extra("torchvision", "torchvision")
        except UserError:
            raise no_features(name, "finding them needs torchvision: pip install 'kdlab[torchvision]'") from None
        from torchvision.models.feature_extraction import get_graph_node_names

        self.name = name
        try:
            train_nodes, eval_nodes = get_graph_node_names(net)
        except Exception as e:  # noqa: BLE001 (any tracing failure)
            raise no_features(name, f"torch.fx cannot trace it: {type(e).__name__}") from None
        # The last node of each graph is what the module returns: its logits.
        self._outputs = (train_nodes[-1], eval_nodes[-1])
        if nodes is None:
            nodes = _discover(net, name, eval_nodes)
        else:
            nodes = [str(n) for n in nodes]
            missing = [n for n in nodes if not _in_graph(n, eval_nodes)]
            if missing:
                raise UserError(f"model {name} has no node {missing[0]!r}: its nodes include "
                                f"{', '.join(_top_nodes(net, eval_nodes)[:12])}")
        (shapes,) = _probe(net, name, nodes, _PROBE_SIZES[:1])
        bad = [n for n, s in zip(nodes, shapes, strict=True) if s is None]
        if bad:
            raise no_features(name, f"node {bad[0]} does not give a feature map")
        self.nodes = list(nodes)
        self.channels = [s[0] for s in shapes]
        self.reductions = [max(1, round(_PROBE_SIZES[0] / s[1])) for s in shapes]
        self._extractor: nn.Module | None = None

    def run(self, net: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
        if self._extractor is None:
            self._extractor = _extractor(net, self.nodes, self._outputs)
        if self._extractor.training != net.training:
            self._extractor.train(net.training)  # switches between the traced train and eval graphs
        out = self._extractor(x)
        return [out[f"stage{i}"] for i in range(len(self.nodes))], out["logits"]

    def reset(self) -> None:
        """Forget the traced graph: it holds the module's tensors as they were (device, dtype)."""
        self._extractor = None


def _extractor(net: nn.Module, nodes: Sequence[str], outputs: tuple[str, str]) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor

    stages = {n: f"stage{i}" for i, n in enumerate(nodes)}
    # The graph shares the module's submodules and parameters: nothing is copied.
    return create_feature_extractor(net, train_return_nodes={**stages, outputs[0]: "logits"},
                                    eval_return_nodes={**stages, outputs[1]: "logits"})


def _in_graph(node: str, graph_nodes: Sequence[str]) -> bool:
    return any(g == node or g.startswith(node + ".") for g in graph_nodes)


def _top_nodes(net: nn.Module, graph_nodes: Sequence[str]) -> list[str]:
    """Candidate stage nodes, in the order the module runs them: its top-level blocks, and the
    blocks of top-level containers (``features.0``, ``features.1``, ...)."""
    names = []
    for name, child in net.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child):
            names += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            names.append(name)
    last = {}  # a block's output is its last node in the graph
    for i, g in enumerate(graph_nodes):
        for n in names:
            if g == n or g.startswith(n + "."):
                last[n] = i
    return sorted(last, key=last.__getitem__)


def _discover(net: nn.Module, name: str, graph_nodes: Sequence[str]) -> list[str]:
    candidates = _top_nodes(net, graph_nodes)
    small, large = _probe(net, name, candidates, _PROBE_SIZES)
    stages: dict[int, str] = {}  # reduction -> last node at that reduction
    for node, a, b in zip(candidates, small, large, strict=True):
        if a is None or b is None or not (1.5 * a[1] <= b[1] <= 2.5 * a[1]):
            continue  # not a map, or its size does not follow the image's (a global pool)
        reduction = max(1, round(_PROBE_SIZES[0] / a[1]))
        if stages and reduction < max(stages):
            continue  # upsampling back: not a backbone stage
        stages[reduction] = node
    if not stages:
        raise no_features(name, "no block of it outputs a feature map that follows the image size")
    return [stages[r] for r in sorted(stages)]


def _probe(net: nn.Module, name: str, nodes: Sequence[str],
           sizes: Sequence[int]) -> list[list[tuple[int, int] | None]]:
    """For each image size, (channels, height) of each node's output for a blank image (None: not
    a 4-D map). Runs in eval mode without gradients, so nothing in the model changes."""
    from torchvision.models.feature_extraction import create_feature_extractor

    out = []
    try:
        extractor = create_feature_extractor(net.eval(), return_nodes=list(nodes)).eval()
        for size in sizes:
            with dry_run(net, (size, size)) as x:
                maps = extractor(x).values()
            out.append([(int(v.shape[1]), int(v.shape[2])) if isinstance(v, Tensor) and v.ndim == 4 else None
                        for v in maps])
    except Exception as e:  # noqa: BLE001 (a model that cannot run at this size, or cannot be traced)
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise no_features(name, f"a dry run on blank {sizes[-1]}x{sizes[-1]} images failed: {type(e).__name__}: "
                                f"{detail}") from None
    return out


class ForeignModel(nn.Module):
    """A module from another library (or the user's own) with kdlab's model interface.

    Args:
        net: the module; its ``forward(x)`` returns logits.
        name: the model's name in kdlab (``timm:resnet18``), shown in messages and the report.
        num_classes: how many logits it returns (None: not known yet; the run's checks count them).
        width: the width it was built at (1.0: as built).
        feature_nodes: stage node names (torchvision-style), instead of finding them.
    """

    def __init__(self, net: nn.Module, name: str, num_classes: int | None, width: float = 1.0,
                 feature_nodes: Sequence[str] | None = None):
        super().__init__()
        self.net = net
        self.name = name
        self.num_classes = int(num_classes) if num_classes is not None else None
        self.width = float(width)
        self._feature_nodes = list(feature_nodes) if feature_nodes is not None else None
        self._stages: TimmStages | NodeStages | None = None  # found on first use (a plain object, not a submodule)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward_with_features(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Return ``(stage features, logits)`` from a single pass."""
        return self.stages().run(self.net, x)

    def stage_channels(self) -> list[int]:
        """Channel count of each stage's output."""
        return list(self.stages().channels)

    def stage_reductions(self) -> list[int]:
        """Spatial downsampling factor of each stage's output relative to the input image."""
        return list(self.stages().reductions)

    def stages(self) -> TimmStages | NodeStages:
        """How this model's stage features are taken (found on first use)."""
        if self._stages is None:
            is_timm = hasattr(self.net, "forward_intermediates") and hasattr(self.net, "feature_info")
            if is_timm and self._feature_nodes is None:
                self._stages = TimmStages(self.net)
            else:
                self._stages = NodeStages(self.net, self.name, self._feature_nodes)
        return self._stages

    def _apply(self, fn: Any, recurse: bool = True) -> ForeignModel:
        # .to(), .cuda(), .half(): a traced graph would keep the old tensors.
        out = super()._apply(fn, recurse)
        if self._stages is not None:
            self._stages.reset()
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, width={self.width}, num_classes={self.num_classes}"


def inner(model: nn.Module) -> nn.Module:
    """The module whose state dict a foreign checkpoint holds (a ForeignModel's own module)."""
    return model.net if isinstance(model, ForeignModel) else model


def pop_feature_nodes(model_args: dict[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
    """Split kdlab's own ``feature_nodes`` from the constructor arguments."""
    args = dict(model_args)
    nodes = args.pop("feature_nodes", None)
    if nodes is not None and (not isinstance(nodes, (list, tuple)) or not nodes
                              or not all(isinstance(n, str) for n in nodes)):
        raise UserError(f"model_args feature_nodes must be a list of node names, got {nodes!r}")
    return args, nodes
