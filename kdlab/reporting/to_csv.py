"""The report as CSV: one row per (section, student, teacher, method, metric), numbers unformatted."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from kdlab import paper
from kdlab.reporting.model import Report, Study
from kdlab.reporting.sections import TIMING_PARTS
from kdlab.reporting.text import one_line
from kdlab.stats import PairedResult, Summary

CSV_COLUMNS = ("dataset", "preset", "recipe", "section", "student", "teacher", "method", "metric", "seed",
               "n", "mean", "std", "ci_low", "ci_high", "p", "significant", "paper_vcl", "paper_colab",
               "detail")


def render_csv(report: Report, compare: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for study in report.studies:
        base = {"dataset": study.dataset, "preset": study.preset, "recipe": study.recipe}
        for row in _csv_rows(study, compare):
            writer.writerow({**base, **row})
    return buf.getvalue()


def _stat_fields(x: Summary | PairedResult | float | int | None) -> dict[str, Any]:
    if isinstance(x, Summary):
        return {"n": x.n, "mean": x.mean, "std": x.std, "ci_low": x.ci_low, "ci_high": x.ci_high}
    if isinstance(x, PairedResult):
        return {"n": x.n, "mean": x.mean_diff, "std": x.std_diff, "ci_low": x.ci_low, "ci_high": x.ci_high,
                "p": x.p, "significant": x.significant}
    return {"mean": x}


def _csv_rows(study: Study, compare: bool) -> Iterable[dict[str, Any]]:
    for r in study.table1:
        ref = paper.table1(r.model) if compare else None
        key = {"section": "table1", "student": r.model, "teacher": "", "method": "ce"}
        for metric, value, vcl, colab in (("acc", r.acc, *paper_pair(ref, "acc_vcl", "acc_colab")),
                                          ("best_acc", r.best_acc, None, None),
                                          ("time_s", r.time, *paper_pair(ref, "time_vcl_s", "time_colab_s")),
                                          ("paper_params", r.paper_params, *paper_pair(ref, "params", "params")),
                                          ("params", r.params, None, None), ("flops", r.flops, None, None)):
            yield {**key, "metric": metric, **_stat_fields(value), "paper_vcl": vcl, "paper_colab": colab}
    for c in study.cells:
        key = {"section": "cells", "student": c.student, "teacher": c.teacher or "", "method": c.method}
        refs = [paper.kd_cell(c.student, c.teacher or "", p) if compare and c.method == "kd" else None
                for p in paper.PLATFORMS]
        metrics: list[tuple[str, Any, str | None]] = [
            ("acc", c.acc, "acc"), ("best_acc", c.best_acc, None), ("time_s", c.time, "time_s"),
            ("acc_gain", c.gain, "gain"), ("gain_vs_kd", c.gain_vs_kd, None),
            ("compression", c.compression, "compression"), ("time_ratio_vs_alone", c.time_ratio, None),
            *((key_, c.timing.get(key_), None) for key_, _ in TIMING_PARTS)]
        for metric, value, attr in metrics:
            vcl, colab = (getattr(ref, attr) if ref is not None and attr else None for ref in refs)
            yield {**key, "metric": metric, **_stat_fields(value), "paper_vcl": vcl, "paper_colab": colab}
    for m in study.missing:
        yield {"section": "missing", "student": m.what, "metric": m.status, "seed": m.seed,
               "detail": one_line(m.error or m.run_id or "", 300)}


def paper_pair(ref: paper.PaperModel | None, vcl: str, colab: str) -> tuple[Any, Any]:
    return (None, None) if ref is None else (getattr(ref, vcl), getattr(ref, colab))
