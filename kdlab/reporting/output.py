"""Rendering a report in a chosen format, writing every format and the plots, and the Python API."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kdlab.errors import UserError
from kdlab.reporting.build import build_report
from kdlab.reporting.model import Report
from kdlab.reporting.to_csv import render_csv
from kdlab.reporting.to_json import render_json
from kdlab.reporting.to_latex import render_latex
from kdlab.reporting.to_markdown import render_markdown

if TYPE_CHECKING:
    from collections.abc import Sequence

FORMATS = ("md", "csv", "json", "latex")
FILE_NAMES = {"md": "report.md", "csv": "report.csv", "json": "report.json", "latex": "report.tex"}


def render(report: Report, fmt: str = "md", compare_paper: bool = False) -> str:
    """The report as text: "md" (markdown), "csv", "json" or "latex" (booktabs)."""
    renderers = {"md": render_markdown, "csv": render_csv, "json": render_json, "latex": render_latex}
    if fmt not in renderers:
        raise UserError(f"unknown report format {fmt!r}: choose from {', '.join(FORMATS)}")
    return renderers[fmt](report, compare_paper)


def write_report(report: Report, out_dir: str | Path, formats: Sequence[str] = ("md", "json", "csv", "latex"),
                 compare_paper: bool = True, plots: bool = True) -> list[Path]:
    """Write report.md / .json / .csv / .tex and the plots into out_dir; returns the files written."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown report format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create report folder {out}: {e.strerror}") from None
    written = []
    for fmt in formats:
        path = out / FILE_NAMES[fmt]
        path.write_text(render(report, fmt, compare_paper), encoding="utf-8")
        written.append(path)
    if plots:
        from kdlab.reporting.plots import draw_all

        written += draw_all(report, out)
    report.files = written
    return written


def report(runs_dir: str | Path | None = None, out_dir: str | Path | None = None, *,
           dataset: str | None = None, preset: str | None = None,
           formats: Sequence[str] = ("md", "json", "csv", "latex"), compare_paper: bool = True,
           plots: bool = True) -> Report:
    """The Python API of `kdlab report`: build the report of a runs directory and, with out_dir, write it.

    The files written are in the returned report's `files`.
    """
    from kdlab.store import open_store

    store = open_store(runs_dir)
    try:
        result = build_report(store, dataset=dataset, preset=preset)
    finally:
        store.close()
    if out_dir is not None:
        write_report(result, out_dir, formats=formats, compare_paper=compare_paper, plots=plots)
    return result
