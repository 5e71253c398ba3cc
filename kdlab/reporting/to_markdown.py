"""The report as markdown: one section per study, each table a pipe table with its notes below."""

from __future__ import annotations

from kdlab.reporting.model import Report
from kdlab.reporting.sections import intro, sections, study_line


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]


def render_markdown(report: Report, compare: bool) -> str:
    lines = ["# kdlab report", "", *[p + "\n" for p in intro(report, compare)]]
    for study in report.studies:
        lines += [f"## {study.name}", "", study_line(study), ""]
        for sec in sections(study, compare):
            lines += [f"### {sec.title}", "", *_md_table(sec.header, sec.rows), ""]
            lines += [n + "\n" for n in sec.notes]
    return "\n".join(lines).rstrip() + "\n"
