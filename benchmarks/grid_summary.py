#!/usr/bin/env python3
"""The grid stage's JSON summary (committed as benchmarks/results/<device>-grid-<date>.json).

    python3 benchmarks/grid_summary.py RUNS_DIR OUT.json --wall-s S [--stage-s NAME=S ...]

Keys: stage ("grid"), device, date, versions, wall_s (the whole stage: data, grid, report),
stages (seconds per part), and runs: per run label, model, width, method, teacher label, final_acc,
best_acc, wall_s, compile_s, epochs, status, and the run's timing split. Prints a short table.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlab.store import Store  # noqa: E402


def summarise(runs_dir: Path, wall_s: float, stages: dict[str, float]) -> dict:
    store = Store(runs_dir, create=False)
    records = store.runs()
    labels = {r.run_id: r.label or r.run_id for r in records}
    runs = []
    for r in records:
        runs.append({"label": r.label, "run_id": r.run_id, "model": r.model, "width": r.config["width"],
                     "method": r.method, "teacher": labels.get(r.config.get("teacher"), r.config.get("teacher")),
                     "status": r.status, "epochs": r.epochs_done, "final_acc": r.final_acc, "best_acc": r.best_acc,
                     "wall_s": r.wall_s, "compile_s": r.timing.get("compile_s"), "timing": r.timing,
                     "peak_mem_bytes": r.peak_mem_bytes, "error": r.error})
    store.close()
    device = next((r.device for r in records if r.device), "unknown")
    versions = next((r.versions for r in records if r.versions), {})
    return {"stage": "grid", "device": device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions, "wall_s": wall_s, "stages": stages, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--wall-s", type=float, required=True)
    parser.add_argument("--stage-s", action="append", default=[], metavar="NAME=SECONDS")
    args = parser.parse_args()
    stages = {k: float(v) for k, v in (s.split("=", 1) for s in args.stage_s)}
    summary = summarise(args.runs_dir, args.wall_s, stages)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"grid on {summary['device']}: {summary['wall_s']:.0f}s wall "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in stages.items())})")
    print(f"{'run':<40}{'status':<8}{'final %':>9}{'wall s':>9}{'compile s':>11}")
    for r in summary["runs"]:
        acc = f"{r['final_acc']:.2f}" if r["final_acc"] is not None else "-"
        wall = f"{r['wall_s']:.1f}" if r["wall_s"] is not None else "-"
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        print(f"{(r['label'] or r['run_id'])[:39]:<40}{r['status']:<8}{acc:>9}{wall:>9}{comp:>11}")


if __name__ == "__main__":
    main()
