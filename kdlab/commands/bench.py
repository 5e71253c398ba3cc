"""`kdlab bench`: the engine's speed against a plain eager loop, KD's cost against the student alone."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kdlab.commands.options import csv, pairs
from kdlab.schedule.plan import PAPER_MODELS


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="engine speed: images/s against a plain eager loop, KD cost against alone")
    p.add_argument("--preset", default="fast", help="the engine settings to measure (default fast)")
    p.add_argument("--models", default=",".join(PAPER_MODELS), help="comma-separated models")
    p.add_argument("--what", default="throughput,kd", help="throughput, kd, or both (default)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation)")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    p.set_defaults(handler=bench)


def bench(args: argparse.Namespace) -> int:
    from kdlab.api import benchmark
    from kdlab.bench import format_table

    results, path = benchmark(csv(args.models), preset=args.preset, what=csv(args.what), warmup=args.warmup,
                              steps=args.steps, settings=pairs(args.set, "--set"), out=args.out)
    print(format_table(results))
    print(f"wrote {path}", file=sys.stderr)
    return 0
