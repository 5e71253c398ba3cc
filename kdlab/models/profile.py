"""What a model costs at the data's image size, and whether that size suits it.

FLOPs are counted by torch's own ``FlopCounterMode`` on one blank image (a multiply-add is two
FLOPs; every convolution and matrix product, attention included). The stem check is the
known trap of the paper's DenseNet121 on 32x32 CIFAR images, measured for any model: an ImageNet
stem (a stride-2 conv and a max pool) shrinks them 4x before the first block, so most of the
network runs on 8x8 maps or less. kdlab says so instead of training silently.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdlab.errors import warn as warn_line
from kdlab.models.foreign import dry_run
from kdlab.models.registry import count_params, input_size_note, paper_params

# A stem leaving the first blocks this many pixels per side or fewer loses most of a small image.
MIN_SIDE_AFTER_STEM = 8
_WARNED: set[tuple[str, tuple[int, int]]] = set()


def model_facts(model: nn.Module, image_hw: tuple[int, int], warn: bool = True) -> dict[str, Any]:
    """``params``, ``paper_params`` and ``flops`` (per image at ``image_hw``; None when the model does not
    run on that size). The stem warning, once per model and size, goes to stderr when ``warn``, else
    to Python's warnings (a quiet API call still hears of it); not when images smaller than a kdlab
    model's design size are already said (`input_size_note`, where a run is planned)."""
    flops, stem = profile(model, image_hw)
    name = getattr(model, "name", "") or type(model).__name__
    message = None if input_size_note(name, image_hw) else stem_warning(model, image_hw, stem)
    if message and (name, tuple(image_hw)) not in _WARNED:
        _WARNED.add((name, tuple(image_hw)))
        if warn:
            warn_line(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=2)
    return {"params": count_params(model), "paper_params": paper_params(model), "flops": flops}


def profile(model: nn.Module, image_hw: tuple[int, int]) -> tuple[int | None, int]:
    """(FLOPs of one forward pass on one image, the stem's downsampling factor).

    The stem's factor is how much smaller than the image the output of the first tenth of the
    model's convolutions is (at least the first): where the model's blocks start working.
    """
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-2]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with dry_run(model, image_hw) as x, FlopCounterMode(display=False) as counter:
            model(x)
        flops = int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 (a model that cannot run at this size: the run itself will say why)
        flops = None
    finally:
        for h in hooks:
            h.remove()
    if not sizes:
        return flops, 1
    after_stem = sizes[max(1, math.ceil(0.1 * len(sizes))) - 1]
    return flops, max(1, round(image_hw[0] / max(1, after_stem)))


def stem_warning(model: nn.Module, image_hw: tuple[int, int], stem: int) -> str | None:
    """One line when the stem leaves the blocks too few pixels, else None."""
    h, w = image_hw
    if stem < 2 or min(h, w) // stem > MIN_SIDE_AFTER_STEM:
        return None
    name = getattr(model, "name", "") or type(model).__name__
    return (f"{name} downsamples {h}x{w} images {stem}x in its stem, so its blocks see {h // stem}x{w // stem} "
            "maps or less (a stem made for larger images, such as 224x224): expect lower accuracy; use larger "
            "images, or a model with a small-image stem (such as densenet121_cifar)")


def format_flops(flops: int | None) -> str:
    """FLOPs in human units: 1.23G, 45.6M."""
    if flops is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g}{unit}"
    return str(flops)
