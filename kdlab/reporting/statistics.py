"""Statistics per row and cell: means over seeds with intervals, paired gains, timings, curves, noise.

Each Table 1 row summarises the finished `ce` runs of one model and width; each Tables 2-3 cell the
runs of one (student, teacher, method), paired seed by seed with the student trained alone. The
numbers come from `kdlab.stats`; this module only decides what is compared with what.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from kdlab import health, paper, stats
from kdlab.reporting.model import Cell, Missing, ModelRow, NoiseRow
from kdlab.reporting.naming import RunInfo
from kdlab.stats import PairedResult, Summary

if TYPE_CHECKING:
    from kdlab.store import RunRecord

Alone = dict[tuple[str, float, int], "RunRecord"]  # (model, width, seed) -> finished ce run
Rows = dict[tuple[str, float], ModelRow]  # (model, width) -> Table 1 row


def verdict(r: RunRecord) -> str:
    """The run's health (kdlab.health): as stored, or judged from its history for runs finished
    before kdlab stored it."""
    if r.health is not None:
        return r.health
    return health.assess(r.history, (r.config.get("data_info") or {}).get("classes"))


def usable(r: RunRecord) -> bool:
    """A run that may enter a table: finished, with an accuracy, and not diverged."""
    return r.status == "done" and r.final_acc is not None and not health.is_diverged(verdict(r))


def accuracy_summary(values: list[float]) -> Summary:
    """Mean, spread and 95% interval of accuracies; the interval is clipped to 0-100, where
    accuracies live (with few seeds a t-interval can reach past either end)."""
    s = stats.summarize(values)
    if s.ci_low is None or s.ci_high is None:
        return s
    return dataclasses.replace(s, ci_low=max(0.0, s.ci_low), ci_high=min(100.0, s.ci_high))


def summary(values: Iterable[float | None]) -> Summary | None:
    present = [v for v in values if v is not None]
    return stats.summarize(present) if present else None


def mean_timing(records: Sequence[RunRecord]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in records for k in r.timing)
    return {k: sum(r.timing[k] for r in records if k in r.timing) / sum(k in r.timing for r in records)
            for k in keys}


def curve(records: Sequence[RunRecord]) -> list[tuple[int, float]]:
    """Mean test accuracy per epoch over the runs that reached that epoch."""
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in records:
        for e in r.history:
            if e.get("test_acc") is not None:
                per_epoch[int(e["epoch"])].append(e["test_acc"])
    return [(epoch, sum(v) / len(v)) for epoch, v in sorted(per_epoch.items())]


def first_value(values: Iterable[Any]) -> Any:
    return next((v for v in values if v is not None), None)


def model_row(infos: list[RunInfo], role: str) -> ModelRow:
    """A Table 1 row from the finished ce runs of one model and width (one per seed)."""
    first, records = infos[0], [i.record for i in infos]
    return ModelRow(
        family=first.model, role=role, model=first.name, model_name=first.model,
        width=first.width, params=first_value(r.params for r in records),
        paper_params=first_value(r.paper_params for r in records),
        acc=accuracy_summary([r.final_acc for r in records]),
        best_acc=accuracy_summary([r.best_acc if r.best_acc is not None else r.final_acc for r in records]),
        time=summary(r.wall_s for r in records), timing=mean_timing(records), seeds=[i.seed for i in infos],
        acc_by_seed={i.seed: i.record.final_acc for i in infos}, run_ids=[r.run_id for r in records],
        curve=curve(records), flops=first_value(r.flops for r in records),
    )


def cell(infos: list[RunInfo], alone: Alone, rows: Rows, study_seeds: list[int],
         missing: list[Missing]) -> Cell:
    """A Tables 2-3 cell from the runs of one (student, teacher, method), each paired with the
    student trained alone on the same seed."""
    first, records = infos[0], [i.record for i in infos]
    accs = {i.seed: i.record.final_acc for i in infos}
    keys = {s: (first.model, first.width, s) for s in accs}
    base = {s: alone[k].final_acc for s, k in keys.items() if k in alone}
    for s in accs:
        if s not in base:
            missing.append(Missing("baseline", f"{first.what}: no finished {first.name} (ce) run to pair "
                                   "with, so no gain for this seed", s, "no baseline"))
    gains = {s: accs[s] - base[s] for s in base}
    teachers = {i.teacher_run.run_id: i.teacher_run for i in infos if i.teacher_run is not None}
    student_pp = first_value(r.paper_params for r in records)
    teacher_pp = first_value(t.paper_params for t in teachers.values())
    alone_row = rows.get((first.model, first.width))
    return Cell(
        student=first.name, teacher=first.teacher, method=first.method, student_model=first.model,
        student_width=first.width, teacher_model=first.teacher_model, teacher_width=first.teacher_width,
        acc=accuracy_summary(list(accs.values())),
        best_acc=accuracy_summary([r.best_acc if r.best_acc is not None else r.final_acc for r in records]),
        acc_by_seed=accs, gain=paired(accs, base), gain_by_seed=gains,
        time=summary(r.wall_s for r in records),
        alone_time=alone_row.time if alone_row else None,
        teacher_time=summary(t.wall_s for t in teachers.values()),
        compression=student_pp / teacher_pp if student_pp and teacher_pp else None,
        timing=mean_timing(records),
        seeds=sorted(accs), seeds_missing=[s for s in study_seeds if s not in accs],
        run_ids=[r.run_id for r in records], curve=curve(records),
    )


def link_to_kd(cells: list[Cell]) -> None:
    """Pair each other offline method's accuracy with plain `kd` on the same pair, seed by seed."""
    kd = {(c.student, c.teacher): c for c in cells if c.method == "kd"}
    for c in cells:
        ref = kd.get((c.student, c.teacher))
        if c.method == "kd" or c.online or ref is None:
            continue
        c.gain_vs_kd = paired(c.acc_by_seed, ref.acc_by_seed)


def paired(a: dict[int, float], b: dict[int, float]) -> PairedResult | None:
    """Paired test of a - b over the seeds both have; None when they share no seed."""
    common = [s for s in a if s in b]
    return stats.paired_test([a[s] for s in common], [b[s] for s in common]) if common else None


def noise_rows(table1: list[ModelRow], cells: list[Cell]) -> list[NoiseRow]:
    """The paper's VCL-vs-Colab differences set against our seed-to-seed spread, cell by cell."""
    out = []
    for row in table1:
        ref = paper.table1(row.model)
        if ref is not None:
            d = abs(ref.acc_vcl - ref.acc_colab)
            n, std = row.acc.n, row.acc.std
            out.append(NoiseRow(row.model, None, n, std, d, stats.noise_bound(std, n),
                                stats.within_noise(d, std, n)))
    for c in cells:
        vcl, colab = (paper.kd_cell(c.student, c.teacher or "", p) for p in paper.PLATFORMS)
        if c.method != "kd" or vcl is None or colab is None:
            continue
        d = abs(vcl.acc - colab.acc)
        row = NoiseRow(c.student, c.teacher, c.acc.n, c.acc.std, d, stats.noise_bound(c.acc.std, c.acc.n),
                       stats.within_noise(d, c.acc.std, c.acc.n))
        if c.gain is not None:
            dg = abs(vcl.gain - colab.gain)
            row.gain_n, row.gain_std, row.paper_gain_diff = c.gain.n, c.gain.std_diff, dg
            row.gain_bound = stats.noise_bound(c.gain.std_diff, c.gain.n)
            row.gain_within = stats.within_noise(dg, c.gain.std_diff, c.gain.n)
        out.append(row)
    return out
