"""What ``kdlab models`` shows: parameters, the paper's params and FLOPs at an image size, for
kdlab's own models or any named ones (``timm:resnet50``), and the names each source can build."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kdlab.errors import UserError
from kdlab.models.profile import format_flops, profile, stem_warning
from kdlab.models.registry import count_params, create_model, input_size_note, list_models, list_sources, paper_params


def describe(names: Sequence[str], widths: Sequence[float], num_classes: int, image_size: int) -> list[dict[str, Any]]:
    """One row per model and width: name, width, params, paper_params, flops, image_size, note (images
    smaller than a kdlab model's design size, or the stem warning, or None).
    Models of other libraries are listed at width 1 (built as named)."""
    rows = []
    hw = (image_size, image_size)
    for name in names or list_models():
        for width in (widths if ":" not in name else [1.0]):
            model = create_model(name, width, num_classes)
            flops, stem = profile(model, hw)
            rows.append({"name": name, "width": width, "params": count_params(model),
                         "paper_params": paper_params(model), "flops": flops, "image_size": image_size,
                         "note": input_size_note(name, hw) or stem_warning(model, hw, stem)})
    return rows


def print_table(rows: list[dict[str, Any]], image_size: int) -> None:
    width = max([20, *(len(r["name"]) + 2 for r in rows)])
    print(f"{'model':<{width}}{'width':>7}{'params':>14}{'paper_params':>15}{'FLOPs':>10}")
    for r in rows:
        print(f"{r['name']:<{width}}{r['width']:>7g}{r['params']:>14,}{r['paper_params']:>15,}"
              f"{format_flops(r['flops']):>10}")
    print("paper_params counts conv and linear weights only, as the paper's Table 1 does. FLOPs: one "
          f"{image_size}x{image_size} image, forward pass, a multiply-add counted as 2.")
    for note in dict.fromkeys(r["note"] for r in rows if r["note"]):
        print(f"note: {note}")


def source_names() -> dict[str, list[str] | str]:
    """The model names a user can give, by source: a list of names, or one line saying why there is none
    (its library is not installed) or what the source's names are (models kdlab makes itself)."""
    out: dict[str, list[str] | str] = {"kdlab": list_models()}
    for prefix, source in sorted(list_sources().items()):
        if source.about:
            out[prefix] = source.about
            continue
        try:
            out[prefix] = source.names()
        except UserError as e:
            out[prefix] = str(e)
    return out


def print_sources() -> None:
    """`kdlab models --all`: every name to type, by source; then what the other sources' names are."""
    about = []
    for prefix, names in source_names().items():
        if isinstance(names, str):
            about.append(f"{prefix}: {names}")
            continue
        print(f"{prefix}: {len(names)} models")
        for name in names:
            print(f"  {name}" if prefix == "kdlab" else f"  {prefix}:{name}")
    for line in about:
        print(line)
