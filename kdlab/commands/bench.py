"""`kdlab bench`: the engine's speed against a plain eager loop, KD's cost against the student alone."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kdlab.commands.options import csv, pairs
from kdlab.errors import UserError
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
    from kdlab import bench as engine_bench
    from kdlab.outputs import writable_dir

    out = writable_dir(args.out, "--out")
    models, what = csv(args.models), set(csv(args.what))
    if args.warmup < 0 or args.steps < 1:
        raise UserError("--warmup must be >= 0 and --steps >= 1")
    if not what <= {"throughput", "kd"}:
        raise UserError(f"--what takes throughput and/or kd, got {args.what!r}")
    settings = pairs(args.set, "--set")
    results: dict[str, Any] = {"environment": engine_bench.environment(), "preset": args.preset,
                               "overrides": settings, "warmup": args.warmup, "steps": args.steps}
    if "throughput" in what:
        results["throughput"] = engine_bench.throughput(models, args.preset, args.warmup, args.steps, settings)
    if "kd" in what:
        results["kd_overhead"] = engine_bench.kd_overhead(models, models, args.preset, args.warmup, args.steps,
                                                          settings)
    print(engine_bench.format_table(results))
    print(f"wrote {engine_bench.write_results(results, out)}", file=sys.stderr)
    return 0
