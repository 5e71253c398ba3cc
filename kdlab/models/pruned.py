"""`pruned:BASE` models: a registered model with whole channels removed by structured pruning.

`kdlab compress` prunes a finished run's model (with torch-pruning, in `kdlab.deploy.prune`) and
saves the result as one file: the pruned model's plain state dict (tensors only, safe to load)
and what it was built from. This source rebuilds that model from the file: it builds BASE at the
run's width and resizes each conv, BatchNorm and linear layer to the shapes in the file, so a
recovery run is an ordinary run of the training loop, resumable and reportable like any other.

model_args (all but `path` are part of the run's identity):
    parent    the run whose weights were pruned
    ratio     fraction of channels removed from each prunable layer
    criterion l1, l2 (filter magnitude) or bn (BatchNorm scale)
    sha256    digest of the file's content: what the pruned weights were
    path      where the file is (a location, like teacher_path; refreshed from the runs dir)

Why a saved file rather than pruning the parent again on every rebuild: the rebuild is then
exact whatever torch-pruning version is installed (or none), takes no dependency-graph tracing
(seconds for DenseNet), and the digest says which weights a run started from.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.errors import UserError
from kdlab.models.base import CIFAR_INPUT, StagedModel
from kdlab.models.registry import ModelSource, check_model_name, create_model, register_source

PRUNED_FORMAT = "kdlab-pruned"
MODEL_ARGS = ("parent", "ratio", "criterion", "sha256", "path")


def state_digest(state: dict[str, torch.Tensor], base: dict[str, Any]) -> str:
    """sha256 of a state dict's content (names, dtypes, shapes, values) and the base model it
    resizes: the same weights give the same digest whatever torch.save's byte layout."""
    h = hashlib.sha256(repr(sorted(base.items())).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def save_pruned(model: nn.Module, base: dict[str, Any], folder: Path) -> tuple[str, Path]:
    """Write the pruned model's weights under `folder`, named by their digest; returns (digest, path).

    `base` is {"model": name, "width": w, "num_classes": n}. Written to a temporary file and
    renamed, so a file under its final name is always whole (and the same digest is the same file).
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    digest = state_digest(state, base)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest[:16]}.pt"
    if not path.exists() or _saved_digest(path, base) != digest:  # a damaged file is written again
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"format": PRUNED_FORMAT, "version": 1, "base": base, "state": state}, tmp)
        os.replace(tmp, path)
    return digest, path


def _saved_digest(path: Path, base: dict[str, Any]) -> str | None:
    """The digest of the pruned weights in a file, None when it cannot be read."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return state_digest(saved["state"], base)
    except Exception:  # noqa: BLE001 (a damaged file fails in many ways)
        return None


def resize_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every Conv2d, BatchNorm2d and Linear of `model` the sizes its weights have in `state`,
    then load `state` strictly (any layer left at the wrong size is an error)."""
    for name, module in model.named_modules():
        weight = state.get(f"{name}.weight")
        if weight is None:
            continue
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise UserError(f"layer {name} is a grouped convolution: pruned models of grouped convs are not "
                                "supported")
            module.out_channels, module.in_channels = int(weight.shape[0]), int(weight.shape[1])
        elif isinstance(module, nn.BatchNorm2d):
            module.num_features = int(weight.shape[0])
            module.running_mean = torch.zeros(module.num_features)
            module.running_var = torch.ones(module.num_features)
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
        else:
            continue
        module.weight = nn.Parameter(torch.empty_like(weight))
        if getattr(module, "bias", None) is not None:
            module.bias = nn.Parameter(torch.empty_like(state[f"{name}.bias"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"pruned weights do not fit the base model: {str(e).splitlines()[-1].strip()}") from None


def _measure_stage_channels(model: StagedModel) -> None:
    """A pruned model's stages output fewer channels than the base model said: look (eval mode,
    so BatchNorm statistics are untouched)."""
    was_training = model.training
    with torch.no_grad():
        feats = model.eval().forward_stages(torch.zeros(1, *CIFAR_INPUT))
    model.train(was_training)
    model._stage_channels = [int(f.shape[1]) for f in feats]


@register_source
class PrunedSource(ModelSource):
    """`pruned:BASE`: BASE with the channel counts and starting weights of a file written by `kdlab compress`."""

    prefix = "pruned"
    about = "a model with channels removed by `kdlab compress RUN --prune RATIO`, named pruned:<model> in its runs"

    def check(self, name: str) -> None:
        check_model_name(name)
        if ":" in name:
            raise UserError(f"pruned:{name}: the base of a pruned model is a registered model, not a source's")

    def create(self, name: str, width: float, num_classes: int, **model_args: Any) -> nn.Module:
        self.check(name)
        missing = [k for k in MODEL_ARGS if k not in model_args]
        if missing:
            raise UserError(f"model pruned:{name} needs model_args {', '.join(missing)}: pruned models are made by "
                            "`kdlab compress RUN --prune RATIO`")
        path = Path(model_args["path"])
        again = (f"`kdlab compress {str(model_args['parent'])[:8]} --prune {model_args['ratio']:g} --criterion "
                 f"{model_args['criterion']}` writes them again")
        if not path.is_file():
            raise UserError(f"pruned weights {path} are missing (was the runs dir moved?): {again}")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (a damaged zip or pickle fails in many ways)
            raise UserError(f"pruned weights {path} are damaged ({type(e).__name__}): {again}") from None
        base = {"model": name, "width": float(width), "num_classes": int(num_classes)}
        if not isinstance(saved, dict) or saved.get("format") != PRUNED_FORMAT or saved.get("base") != base:
            raise UserError(f"{path} does not hold pruned weights of {name} at width {width:g} with "
                            f"{num_classes} classes")
        if state_digest(saved["state"], base) != model_args["sha256"]:
            raise UserError(f"pruned weights {path} are damaged or not the ones this run started from (their "
                            f"sha256 differs): {again}")
        model = create_model(name, width, num_classes)
        resize_to(model, saved["state"])
        _measure_stage_channels(model)
        model.name = f"pruned:{name}"
        return model
