"""The report as LaTeX: one booktabs table per section (the document needs \\usepackage{booktabs})."""

from __future__ import annotations

from kdlab.reporting.model import Report
from kdlab.reporting.sections import intro, sections

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "—": "--", "<-": r"$\leftarrow$", "|": r"$|$"}


def latex_escape(text: str) -> str:
    """Text safe inside a LaTeX table: specials escaped, `±`, `—` and `<-` as LaTeX symbols."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("<-", i):
            out.append(_LATEX_SPECIAL["<-"])
            i += 2
            continue
        out.append(_LATEX_SPECIAL.get(text[i], text[i]))
        i += 1
    return "".join(out)


def _latex_table(caption: str, header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [r"\begin{table}[ht]", r"\centering", r"\small", rf"\caption{{{latex_escape(caption)}}}",
             r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in rows]
    return lines + [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]


def render_latex(report: Report, compare: bool) -> str:
    lines = ["% kdlab report: needs \\usepackage{booktabs}", *("% " + p for p in intro(report, compare)), ""]
    for study in report.studies:
        lines += [f"% {study.name}", ""]
        for sec in sections(study, compare):
            lines += _latex_table(f"{study.name}: {sec.title}", sec.header, sec.rows)
            lines += [latex_escape(n) + "\n" for n in sec.notes]
    return "\n".join(lines)
