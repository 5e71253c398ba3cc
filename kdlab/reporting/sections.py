"""The report's tables as format-neutral sections (title, header, rows, notes), shared by markdown and LaTeX.

Each section is one question: Table 1 (models without KD), the Tables 2-3 layout per method,
methods compared pair by pair, where the time goes, whether the paper's platform differences
exceed our seed spread, and what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdlab import paper
from kdlab.models.profile import format_flops
from kdlab.reporting.model import NoiseRow, Report, Study
from kdlab.reporting.text import DASH, fmt_duration, fmt_gain, fmt_summary, fmt_time, integer, num, one_line, yes_no

TIMING_PARTS = (("data_s", "Data"), ("teacher_s", "Teacher fwd"), ("student_s", "Student step"),
                ("eval_s", "Eval"), ("other_s", "Other"))

PAPER_NOTE = (f"Paper values: {paper.SOURCE}; one run per cell on NCSU VCL and on Google Colab, on "
              "CIFAR-10. Our runs used the data named under each study, with kdlab's code and recipe, so "
              "absolute numbers are not a reproduction: compare directions and sizes of differences. The "
              "paper's Table 1 gives one time per row (taken as VCL). Its Colab gains for resnet18_half are "
              "0.03 below Colab acc minus Table 1's student acc; they are shown as printed.")


@dataclass
class Section:
    """One table: a title, a header row, body rows and notes under it."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def sections(study: Study, compare: bool) -> list[Section]:
    """Every section the study has something for, in reading order."""
    out = []
    if study.table1:
        out.append(_table1_section(study, compare))
    for method in study.methods:
        if any(c.method == method and not c.online for c in study.cells):
            out.append(_kd_section(study, method, compare))
    if len(study.methods) > 1 or any(c.online for c in study.cells):
        out.append(_methods_section(study))
    if study.cells:
        out.append(_timing_section(study))
    if study.noise:
        out.append(_noise_section(study))
    if study.missing:
        out.append(_missing_section(study))
    return out


def _table1_section(study: Study, compare: bool) -> Section:
    header = ["Family", "Role", "Model", "Width", "Params (paper)", "Params (all)", "FLOPs", "Acc (%)", "Time",
              "Seeds"]
    if compare:
        header += ["Paper VCL acc", "Paper Colab acc", "Paper VCL time"]
    rows = []
    for r in study.table1:
        row = [r.family, r.role, r.model, f"{r.width:g}", integer(r.paper_params), integer(r.params),
               format_flops(r.flops), fmt_summary(r.acc), fmt_time(r.time), ",".join(map(str, r.seeds))]
        if compare:
            ref = paper.table1(r.model)
            row += [DASH] * 3 if ref is None else [num(ref.acc_vcl), num(ref.acc_colab),
                                                   fmt_duration(ref.time_vcl_s)]
        rows.append(row)
    return Section("Table 1: training without KD (T = teacher, S = student alone)", header, rows,
                   ["Roles come from the runs: T when some run distils from it (or a grid planned it as a "
                    f"teacher), S when a distilled run trains its model and width; {DASH} when neither."])


def _kd_section(study: Study, method: str, compare: bool) -> Section:
    cells = [c for c in study.cells if c.method == method and not c.online]
    teachers = list(dict.fromkeys(c.teacher for c in cells))
    students = list(dict.fromkeys(c.student for c in cells))
    index = {(c.student, c.teacher): c for c in cells}
    metrics = [("Acc (%)", lambda c: fmt_summary(c.acc), "acc", num),
               ("Time", lambda c: fmt_time(c.time), "time_s", fmt_duration),
               ("Acc gain", lambda c: fmt_gain(c.gain), "gain", lambda x: num(x, sign=True)),
               ("Comp", lambda c: num(c.compression), "compression", num)]
    rows = []
    for s in students:
        for label, show, attr, paper_fmt in metrics:
            rows.append([s, label, *(show(index[(s, t)]) if (s, t) in index else DASH for t in teachers)])
            if compare and method == "kd":  # the paper ran plain KD (T=3, alpha=0.7) only
                rows.append(["", f"{label}, paper", *(_paper_kd(s, t, attr, paper_fmt) for t in teachers)])
    title = f"Tables 2-3 layout, method {method}: rows student, columns teacher"
    return Section(title, ["Student", "Metric", *[t or DASH for t in teachers]], rows)


def _paper_kd(student: str, teacher: str | None, attr: str, fmt: Any) -> str:
    vcl, colab = (paper.kd_cell(student, teacher or "", p) for p in paper.PLATFORMS)
    if vcl is None or colab is None:
        return DASH
    a, b = getattr(vcl, attr), getattr(colab, attr)
    return f"VCL/Colab {fmt(a)}" if a == b else f"VCL {fmt(a)} / Colab {fmt(b)}"


def _methods_section(study: Study) -> Section:
    # Only the pairs some other method ran on: plain kd alone is already in the Tables 2-3 layout.
    pairs = list(dict.fromkeys(c.pair for c in study.cells if c.method != "kd"))
    index = {(c.method, c.pair): c for c in study.cells}
    metrics = [("Acc (%)", lambda c: fmt_summary(c.acc)), ("Gain vs alone", lambda c: fmt_gain(c.gain, ci=True)),
               ("Gain vs kd", lambda c: fmt_gain(c.gain_vs_kd, ci=True))]
    rows = []
    for m in study.methods:
        for label, show in metrics[:2] if m == "kd" else metrics:
            rows.append([m, label, *(show(index[(m, p)]) if (m, p) in index else DASH for p in pairs)])
    notes = ["Gains are paired by seed; methods without a teacher are compared with the student alone."]
    return Section("Methods by pair", ["Method", "Metric", *pairs], rows, notes)


def _timing_section(study: Study) -> Section:
    header = ["Student", "Teacher", "Method", "n", "Wall", *(name for _, name in TIMING_PARTS), "Alone wall",
              "KD / alone", "Teacher training"]
    rows = []
    for c in study.cells:
        parts = [fmt_duration(c.timing.get(key)) for key, _ in TIMING_PARTS]
        ratio = DASH if c.time_ratio is None else f"{c.time_ratio:.2f}x"
        rows.append([c.student, c.teacher or DASH, c.method, str(c.acc.n), fmt_time(c.time), *parts,
                     fmt_time(c.alone_time), ratio, fmt_time(c.teacher_time)])
    ratios = [c.time_ratio for c in study.cells if c.time_ratio is not None]
    notes = ["Mean seconds per run: data loading, teacher forward, student step (without the teacher), "
             "evaluation, other. KD / alone divides the mean KD wall time by the student-alone wall time; "
             "teacher training is paid once per teacher, on top."]
    if ratios:
        notes.append(f"KD / alone wall time ranges {min(ratios):.2f}x to {max(ratios):.2f}x over "
                     f"{len(ratios)} cells.")
    return Section("Timing: where the time goes", header, rows, notes)


def _noise_section(study: Study) -> Section:
    header = ["Model / cell", "n", "Our acc std", "Paper |VCL-Colab| acc", "Two-run bound", "Within noise",
              "Our gain std", "Paper |VCL-Colab| gain", "Two-run bound (gain)", "Within noise (gain)"]
    rows = [[r.student if r.teacher is None else f"{r.student} <- {r.teacher}", str(r.n), num(r.acc_std),
             num(r.paper_acc_diff), num(r.acc_bound), yes_no(r.acc_within), num(r.gain_std),
             num(r.paper_gain_diff), num(r.gain_bound), yes_no(r.gain_within)] for r in study.noise]
    notes = ["Two-run bound: t(0.975, n-1) x std x sqrt(2), the difference two single runs that differ "
             "only by their seed stay within 95% of the time (stats.within_noise).",
             noise_summary(study.noise)]
    return Section("Noise: are the paper's VCL-vs-Colab differences larger than seed-to-seed spread?",
                    header, rows, notes)


def noise_summary(rows: list[NoiseRow]) -> str:
    """One sentence: how many of the paper's platform differences our seed spread explains."""
    acc = [r.acc_within for r in rows if r.acc_within is not None]
    gain = [r.gain_within for r in rows if r.gain_within is not None]
    if not acc:
        return "Not answerable yet: it needs at least two seeds per cell (run the grid with more seeds)."
    text = (f"In {sum(acc)} of {len(acc)} comparisons the paper's VCL-vs-Colab accuracy difference is "
            "within the spread two runs differing only by seed show")
    if gain:
        text += f", and so is the gain difference in {sum(gain)} of {len(gain)} KD cells"
    if all(acc) and all(gain):
        what = "hardware changes what KD does" if gain else "hardware changes the results"
        text += f": the platform differences are no evidence that {what}"
    else:
        text += ": the others exceed our seed spread, which may reflect the platform or the paper's own noise"
    return text + " (our spread is measured with our data and recipe, not the paper's)."


def _missing_section(study: Study) -> Section:
    rows = [[m.what, DASH if m.seed is None else str(m.seed), m.status, (m.run_id or DASH)[:12],
             one_line(m.error) if m.error else DASH] for m in study.missing]
    return Section("Missing or unusable runs", ["What", "Seed", "Status", "Run", "Error"], rows)


def intro(report: Report, compare: bool) -> list[str]:
    """The paragraphs before the first study: what the numbers are, and notes."""
    lines = [f"Runs: {report.source}. Accuracy is the test accuracy after the last epoch (%), never the "
             "best epoch. With several seeds: mean ± std [95% CI] (accuracy intervals clipped to 0-100); "
             "gains are per-seed differences from the student trained alone, with a paired t-test "
             "(significant at p < 0.05). Diverged runs (training loss rising without learning, or training "
             "accuracy collapsing) are listed, never averaged in."]
    if compare:
        lines.append(PAPER_NOTE)
    return lines + report.notes


def study_line(study: Study) -> str:
    """One line under a study's title: its seeds and how its model names read."""
    tw = study.teacher_width
    seeds = ", ".join(map(str, study.seeds)) or DASH
    names = ("No run is a teacher, so models are named `model@width`." if tw is None else
             f"Teacher width {tw:g}: `resnet18` means width {tw:g}, `resnet18_half` width {tw / 2:g}, `model@w` "
             "any other width.")
    return f"Data: {study.data}. Seeds: {seeds}. {names}"
