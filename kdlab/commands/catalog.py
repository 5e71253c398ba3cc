"""`kdlab models` and `kdlab methods`: what kdlab can train, and how."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kdlab.errors import UserError


def register(sub: Any) -> None:
    p = sub.add_parser("models", help="list the model zoo with parameter counts and FLOPs")
    p.add_argument("names", nargs="*", help="models to describe (default: kdlab's own), e.g. timm:resnet50")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--widths", default="1.0,0.5", help="comma-separated widths to list (default 1.0,0.5; "
                   "models from other libraries: 1)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32, help="image side for FLOPs (default 32)")
    p.add_argument("--all", action="store_true", help="list every model name of every source (timm, torchvision)")
    p.set_defaults(handler=models)

    p = sub.add_parser("methods", help="list the training methods with their arguments and papers")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(handler=methods)


def models(args: argparse.Namespace) -> int:
    from kdlab.api import list_models
    from kdlab.models.listing import print_sources, print_table

    if args.all:
        print_sources()
        return 0
    try:
        widths = [float(w) for w in args.widths.split(",")]
    except ValueError:
        raise UserError(f"--widths takes comma-separated numbers, got {args.widths!r}") from None
    rows = list_models(args.names, widths, args.num_classes, args.image_size)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, args.image_size)
    return 0


def methods(args: argparse.Namespace) -> int:
    from kdlab.api import list_methods

    rows = list_methods()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        needs = "teacher" if r["teacher"] else "no teacher"
        args_text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["args"].items())
        print(f"{r['name']:<8} {needs:<11} {r['paper']}\n{'':<20} args: {args_text or '-'}")
        for label in ("setting", "notes"):
            if r[label]:
                print(f"{'':<20} {'defaults from' if label == 'setting' else 'note'}: {r[label]}")
    print("Defaults are tuned for the setting named; on other data, lrs, batch sizes or run lengths, check them: "
          "a run whose training falls apart is flagged as diverged.")
    return 0
