"""The report as JSON: every study with its rows, cells, noise and missing runs (NaN and infinity as null)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from kdlab import paper
from kdlab.reporting.model import Cell, ModelRow, Report, Study
from kdlab.reporting.sections import PAPER_NOTE, noise_summary
from kdlab.stats import Summary


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: such values become null."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def render_json(report: Report, compare: bool) -> str:
    doc: dict[str, Any] = {"source": report.source, "notes": report.notes,
                           "studies": [_study_json(s, compare) for s in report.studies]}
    if compare:
        doc["paper"] = {"source": paper.SOURCE, "note": PAPER_NOTE}
    return json.dumps(_clean(doc), indent=2) + "\n"


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return _finite(x)


def _study_json(study: Study, compare: bool) -> dict[str, Any]:
    return {
        "dataset": study.dataset, "preset": study.preset, "recipe": study.recipe,
        "teacher_width": study.teacher_width, "seeds": study.seeds,
        "table1": [_row_json(r, compare) for r in study.table1],
        "cells": [_cell_json(c, compare) for c in study.cells],
        "noise": [asdict(r) for r in study.noise], "noise_summary": noise_summary(study.noise),
        "missing": [asdict(m) for m in study.missing],
    }


def _spread_json(s: Summary, prefix: str) -> dict[str, Any]:
    if s.n < 2:
        return {}
    return {f"{prefix}_std": s.std, f"{prefix}_ci": [s.ci_low, s.ci_high]}


def _row_json(r: ModelRow, compare: bool) -> dict[str, Any]:
    out = {"family": r.family, "role": r.role, "model": r.model, "width": r.width, "params": r.params,
           "paper_params": r.paper_params, "flops": r.flops, "acc": r.acc.mean, "best_acc": r.best_acc.mean,
           "time_s": r.time.mean if r.time else None, "timing": r.timing, "seeds": r.seeds,
           "n_seeds": r.acc.n, "run_ids": r.run_ids, **_spread_json(r.acc, "acc")}
    if compare:
        ref = paper.table1(r.model)
        for platform in paper.PLATFORMS:
            out[f"paper_{platform}"] = None if ref is None else {
                "acc": ref.acc(platform), "time_s": ref.time_s(platform), "params": ref.params}
    return out


def _cell_json(c: Cell, compare: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "teacher": c.teacher, "student": c.student, "method": c.method, "acc": c.acc.mean,
        "acc_gain": c.gain.mean_diff if c.gain else None, "time_s": c.time.mean if c.time else None,
        "compression": c.compression, "best_acc": c.best_acc.mean, "n_seeds": c.acc.n, "seeds": c.seeds,
        "seeds_missing": c.seeds_missing, "gain_seeds": sorted(c.gain_by_seed),
        "gain_vs_kd": c.gain_vs_kd.mean_diff if c.gain_vs_kd else None,
        "alone_time_s": c.alone_time.mean if c.alone_time else None, "time_ratio_vs_alone": c.time_ratio,
        "teacher_time_s": c.teacher_time.mean if c.teacher_time else None, "timing": c.timing,
        "run_ids": c.run_ids, **_spread_json(c.acc, "acc"),
    }
    if c.gain is not None and c.gain.n > 1:
        out |= {"gain_std": c.gain.std_diff, "gain_ci": [c.gain.ci_low, c.gain.ci_high], "gain_p": c.gain.p,
                "gain_significant": c.gain.significant}
    if compare:
        for platform in paper.PLATFORMS:
            ref = paper.kd_cell(c.student, c.teacher or "", platform) if c.method == "kd" else None
            out[f"paper_{platform}"] = None if ref is None else {
                "acc": ref.acc, "acc_gain": ref.gain, "time_s": ref.time_s, "compression": ref.compression}
    return out
