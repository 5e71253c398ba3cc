"""Weights from files: kdlab checkpoints, plain state dicts (what ``torch.save(model.state_dict())``
writes, in timm, torchvision or anyone's code), and whole pickled models when the user trusts the
file (unpickling runs code from it, so it is never done unasked)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdlab.checkpoints import CHECKPOINT_FORMAT
from kdlab.errors import UserError
from kdlab.models.foreign import ForeignModel, inner

_WARNED: set[str] = set()


def file_identity(path: str | Path) -> str:
    """``file:<sha256 prefix>`` of a file's bytes: what a run's identity records for it."""
    p = Path(path).expanduser()
    try:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise UserError(f"cannot read weights file {p}: {e.strerror}") from None
    return f"file:{digest}"


def read_checkpoint(path: Path, trust: bool = False) -> Any:
    """What a checkpoint file holds: tensors and plain containers only, unless ``trust``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 (any unpickling failure)
        if not trust and "weights_only" in str(e).lower().replace(" ", "_"):
            raise UserError(f"{path} holds pickled objects (a whole model?), and loading them runs code from the "
                            "file: if you trust it, add --trust-checkpoint (Python: trust_checkpoint=True)") from None
        raise UserError(f"{path} is not a PyTorch checkpoint, or a damaged one ({type(e).__name__}): give a kdlab "
                        "checkpoint or a state dict saved with torch.save") from None


def plain_state(obj: Any) -> dict[str, Tensor] | None:
    """The state dict in a file's contents: the dict itself, or one under a usual key
    (``state_dict``, ``model``, ``model_state_dict``), without DataParallel's ``module.`` prefixes."""
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        return None
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state(model: nn.Module, state: dict[str, Tensor], what: str, skip_head: bool = False) -> list[str]:
    """Load ``state`` into ``model`` (a foreign model's own module when the keys are its module's).

    With ``skip_head``, tensors of the classifier that do not fit the model's classes are left
    as initialised (weights of another task); the skipped keys are returned. Anything else that
    does not fit is a UserError counting the differences and naming the first few.
    """
    own = isinstance(model, ForeignModel) and all(k.startswith("net.") for k in state)
    target = model if own else inner(model)
    skipped = []
    if skip_head:
        mine = target.state_dict()
        classes = getattr(model, "num_classes", None)
        skipped = [k for k, v in state.items() if k in mine and mine[k].shape != v.shape
                   and mine[k].ndim >= 1 and mine[k].shape[0] == classes]
        state = {k: v for k, v in state.items() if k not in skipped}
        state.update({k: mine[k] for k in skipped})
    misfit = key_differences(target.state_dict(), state)
    if misfit:
        raise UserError(f"{what} does not fit {getattr(model, 'name', '') or type(model).__name__}: {misfit}")
    target.load_state_dict(state)
    return skipped


def key_differences(mine: dict[str, Tensor], theirs: dict[str, Tensor], shown: int = 3) -> str:
    """How a state dict differs from a model's: how many keys are missing, unexpected or of another
    shape, with the first few of each whole ('' when it fits)."""

    def some(keys: list[str]) -> str:
        more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
        return ", ".join(keys[:shown]) + more

    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    shapes = [f"{k} {tuple(theirs[k].shape)} in the file, {tuple(mine[k].shape)} in the model"
              for k in mine if k in theirs and tuple(mine[k].shape) != tuple(theirs[k].shape)]
    parts = ([f"{len(missing)} keys missing ({some(missing)})"] if missing else []) + \
            ([f"{len(unexpected)} unexpected ({some(unexpected)})"] if unexpected else []) + \
            ([f"{len(shapes)} of another shape ({some(shapes)})"] if shapes else [])
    return "; ".join(parts)


def load_initial_weights(model: nn.Module, path: str | Path) -> None:
    """Start ``model`` from the weights in a file (``--set weights=PATH``): a plain state dict or a
    kdlab checkpoint; a classifier for other classes is left as initialised, with a note."""
    p = Path(path).expanduser()
    obj = read_checkpoint(p)
    state = plain_state(obj)
    if state is None and isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        from kdlab.store import check_checkpoint

        check_checkpoint(obj, p)
        state = obj["student"]
    if state is None:
        raise UserError(f"weights file {p} holds no state dict")
    skipped = load_state(model, state, f"weights file {p}", skip_head=True)
    if skipped and str(p) not in _WARNED:
        _WARNED.add(str(p))
        print(f"kdlab: note: {', '.join(skipped)} from {p.name} do not fit {model.num_classes} classes: "
              "that classifier starts from scratch", file=sys.stderr)
