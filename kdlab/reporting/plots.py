"""The report's figures, as PNG files: gain vs compression, accuracy and time bars, learning curves.

matplotlib is imported only when a figure is drawn, and through its object API with the Agg
canvas (never pyplot), so drawing neither needs a display nor changes a notebook's backend.
A figure with nothing to show is skipped: no file, no error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from kdlab.reporting import Cell, Report, Study

MARKERS = "osD^vP*Xh<>"
DPI = 120
ACC_AXIS_FROM = 0.0  # where accuracy bar axes start, stated in their label


def draw_all(report: Report, out_dir: str | Path) -> list[Path]:
    """Draw every figure of every study into out_dir; returns the PNG files written."""
    out = Path(out_dir)
    drawers: list[tuple[str, Callable[[Study], Figure | None]]] = [
        ("gain_vs_compression", gain_vs_compression), ("acc_time_bars", acc_time_bars), ("curves", curves)]
    written = []
    for study in report.studies:
        for name, draw in drawers:
            fig = draw(study)
            if fig is not None:
                out.mkdir(parents=True, exist_ok=True)
                path = out / f"{study.slug}_{name}.png"
                fig.savefig(path, dpi=DPI, bbox_inches="tight")
                written.append(path)
    return written


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def gain_vs_compression(study: Study) -> Figure | None:
    """Accuracy gain over the student alone against compression, one point per (student, teacher) pair.

    Error bars are the 95% interval of the paired gain when there are several seeds. Colour
    marks the student, the marker the teacher; each offline method gets its own panel.
    """
    cells = [c for c in study.cells if c.gain is not None and c.compression is not None and not c.online]
    if not cells:
        return None
    methods = list(dict.fromkeys(c.method for c in cells))
    colours = _colours(list(dict.fromkeys(c.student for c in cells)))
    teachers = list(dict.fromkeys(c.teacher or "" for c in cells))
    markers = {t: MARKERS[i % len(MARKERS)] for i, t in enumerate(teachers)}
    fig = _figure(5.5 * len(methods), 4.2)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods, strict=True):
        for c in (c for c in cells if c.method == method):
            _gain_point(ax, c, colours[c.student], markers[c.teacher or ""])
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("compression (student / teacher paper params)")
        ax.set_ylabel("accuracy gain over student alone (points)")
        ax.set_title(f"{study.name}: {method}")
    _two_legends(axes[-1], colours, markers)
    return fig


def _gain_point(ax: Any, c: Cell, colour: Any, marker: str) -> None:
    g = c.gain
    yerr = None
    if g.ci_low is not None and g.ci_high is not None:
        yerr = [[g.mean_diff - g.ci_low], [g.ci_high - g.mean_diff]]
    ax.errorbar([c.compression], [g.mean_diff], yerr=yerr, fmt=marker, color=colour, capsize=3, ms=7)


def _two_legends(ax: Any, colours: dict[str, Any], markers: dict[str, str]) -> None:
    from matplotlib.lines import Line2D

    students = [Line2D([], [], color=col, marker="o", ls="", label=name) for name, col in colours.items()]
    teachers = [Line2D([], [], color="black", marker=m, ls="", label=f"teacher {name}")
                for name, m in markers.items()]
    # Outside the axes, to the right: error bars span most of the plot's height.
    first = ax.legend(handles=students, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title="student",
                      title_fontsize=7)
    ax.add_artist(first)
    ax.legend(handles=teachers, loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize=7)


def acc_time_bars(study: Study) -> Figure | None:
    """Accuracy and wall time per model: trained alone, and distilled from each teacher (grouped bars).

    The accuracy axis starts at ACC_AXIS_FROM (0), as its label says; times are in seconds,
    minutes or hours, whichever the longest bar reads best in."""
    groups = _bar_groups(study)
    if not groups:
        return None
    labels = list(dict.fromkeys(label for bars in groups.values() for label, _, _ in bars))
    colours = _colours(labels)
    fig = _figure(max(6.0, 1.6 * len(groups)), 6.5)
    ax_acc, ax_time = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(labels)
    unit, seconds = time_unit([t.mean for bars in groups.values() for _, _, t in bars if t is not None])
    for g, bars in enumerate(groups.values()):
        for label, acc, time in bars:
            x = g + (labels.index(label) - (len(labels) - 1) / 2) * width
            ax_acc.bar(x, acc.mean, width, yerr=acc.std, color=colours[label], capsize=2)
            if time is not None:
                err = None if time.std is None else time.std / seconds
                ax_time.bar(x, time.mean / seconds, width, yerr=err, color=colours[label], capsize=2)
    # Bars are read by their length, so the accuracy axis starts at zero (a cut axis makes tenths
    # of a point look like a landslide); differences have their own figure, the gain plot.
    ax_acc.set_ylim(ACC_AXIS_FROM, 100.0)
    ax_acc.set_ylabel(f"final test accuracy (%; axis from {ACC_AXIS_FROM:g})")
    ax_time.set_ylabel(f"wall time ({unit})")
    ax_time.set_xticks(range(len(groups)), list(groups), rotation=20)
    ax_acc.set_title(f"{study.name}: with and without KD")
    handles = [_patch(colours[label], label) for label in labels]
    ax_acc.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def time_unit(seconds: list[float]) -> tuple[str, float]:
    """('s', 1), ('min', 60) or ('h', 3600): the unit in which the longest time reads best."""
    longest = max(seconds, default=0.0)
    if longest < 120:
        return "s", 1.0
    if longest < 2 * 3600:
        return "min", 60.0
    return "h", 3600.0


def _patch(colour: Any, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(color=colour, label=label)


def _bar_groups(study: Study) -> dict[str, list[tuple[str, Any, Any]]]:
    """model -> [(bar label, accuracy summary, time summary)]: 'no KD' first, then each KD cell."""
    groups: dict[str, list[tuple[str, Any, Any]]] = {}
    for row in study.table1:
        groups.setdefault(row.model, []).append(("no KD", row.acc, row.time))
    for c in study.cells:
        label = f"{c.method} <- {c.teacher}" if c.teacher else c.method
        groups.setdefault(c.student, []).append((label, c.acc, c.time))
    return groups


def curves(study: Study) -> Figure | None:
    """Test accuracy per epoch (mean over seeds), one panel per model family."""
    lines: dict[str, list[tuple[str, list[tuple[int, float]], str]]] = {}
    for row in study.table1:
        if row.curve:
            style = "-" if row.role == "T" else "--"
            lines.setdefault(row.family, []).append((f"{row.model} (no KD)", row.curve, style))
    for c in study.cells:
        if c.curve:
            label = f"{c.student} <- {c.teacher} ({c.method})" if c.teacher else f"{c.student} ({c.method})"
            lines.setdefault(c.student_model, []).append((label, c.curve, ":"))
    if not lines:
        return None
    cols = min(3, len(lines))
    rows = -(-len(lines) // cols)
    fig = _figure(5.0 * cols, 3.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (family, series) in zip(axes, lines.items(), strict=False):
        for label, curve, style in series:
            epochs, accs = [p[0] for p in curve], [p[1] for p in curve]
            ax.plot(epochs, accs, style, label=label, marker="." if len(epochs) < 20 else None)
        ax.set_title(family)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylim(ACC_AXIS_FROM, 100.0)
        ax.set_ylabel(f"test accuracy (%; axis from {ACC_AXIS_FROM:g})")
        ax.legend(fontsize=6)
    for ax in axes[len(lines):]:
        ax.set_visible(False)
    fig.suptitle(f"{study.name}: learning curves (mean over seeds)")
    return fig
