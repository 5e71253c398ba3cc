"""The report's deployment table and its accuracy-vs-latency plot (the Pareto front).

One row per served model (every ONNX run of the store: fp32 exports and int8 models), grouped by
dataset and preset as the study's tables are: parameters, FLOPs per image, size on disk, ONNX
Runtime latency on the CPU at batch 1 and 64 with one thread (the latest measurement), test
accuracy through ONNX Runtime, and its change against the unpruned fp32 model it came from (that
model's own fp32 export). The plot puts accuracy against batch-1 latency, one colour per kind of
model (teacher, student, int8, pruned, pruned + int8), and joins the models no other model beats
on both: the Pareto front.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdlab.deploy.files import file_problem, problem_line
from kdlab.deploy.latency import load_latency
from kdlab.deploy.runs import deploy_info, fp32_export, lineage
from kdlab.errors import warn
from kdlab.store import RunRecord, Store

COLUMNS = ("model", "kind", "precision", "params", "mflops", "size_mb", "b1_ms", "b64_ms", "acc", "delta", "run_id",
           "file")
HEADER = ("Model", "Kind", "Precision", "Params", "MFLOPs", "Size (MB)", "Latency b1 (ms)", "Latency b64 (ms)",
          "Acc (%)", "Δ vs fp32", "Run")
NOTE = ("Served models: accuracy through ONNX Runtime on the test set; latency in ONNX Runtime on the CPU, one "
        "thread, median (`kdlab latency` for more threads and p90); Δ: top-1 points against the unpruned fp32 "
        "model it came from. FLOPs: one image, multiply-add = 2.")


@dataclass
class Row:
    """One served model."""

    model: str
    kind: str
    precision: str
    params: int | None
    mflops: float | None
    size_mb: float | None
    b1_ms: float | None
    b64_ms: float | None
    acc: float
    delta: float | None
    run_id: str
    cpu: str | None = None
    file: str = "ok"  # or what is wrong with the model's file: its measured results stand, the file does not


@dataclass
class Deployment:
    """The deployment rows of each (dataset, preset)."""

    groups: dict[str, list[Row]]

    @property
    def rows(self) -> list[Row]:
        return [r for rows in self.groups.values() for r in rows]


def build_deployment(store: Store, dataset: str | None = None, preset: str | None = None) -> Deployment:
    """Read every finished ONNX run of the store (of one dataset and/or preset if given) into rows."""
    from kdlab.reporting.naming import study_teacher_width

    runs = store.runs()
    by_id = {r.run_id: r for r in runs}
    referenced = {str(r.config.get("teacher")) for r in runs}
    served: dict[str, list[RunRecord]] = defaultdict(list)
    for r in runs:
        if ("deploy" in r.config and r.status == "done" and r.final_acc is not None
                and dataset in (None, r.config.get("dataset")) and preset in (None, r.config.get("preset"))):
            served[f"{r.config.get('dataset')} / {r.config.get('preset')}"].append(r)
    groups = {}
    for key, members in sorted(served.items()):
        # Names as the report gives them: relative to the width of the group's teachers.
        tw = study_teacher_width([lineage(r, by_id)[-1] for r in members], by_id)
        rows = [_row(store.root, r, by_id, referenced, tw) for r in members]
        for r, row in zip(members, rows, strict=True):
            problem = file_problem(store.root, r)
            if problem is not None:
                row.file = f"{'missing' if problem.endswith('missing') else 'damaged'}: {problem}"
                warn(problem_line(by_id, r, problem))
        groups[key] = sorted(rows, key=lambda row: (row.model, kind_rank(row.kind), row.precision))
    return Deployment(groups)


def deployment_over(runs_dirs: Sequence[str | Path], dataset: str | None = None,
                    preset: str | None = None) -> Deployment:
    """The deployment rows of several runs dirs together (`kdlab report --runs-dir A --runs-dir B`);
    a run found in several is shown once, from the first."""
    groups: dict[str, list[Row]] = defaultdict(list)
    seen: set[str] = set()
    for runs_dir in runs_dirs:
        store = Store(runs_dir, readonly=True)
        try:
            table = build_deployment(store, dataset, preset)
        finally:
            store.close()
        for key, rows in table.groups.items():
            groups[key] += [r for r in rows if r.run_id not in seen]
            seen.update(r.run_id for r in rows)
    for rows in groups.values():
        rows.sort(key=lambda row: (row.model, kind_rank(row.kind), row.precision))
    return Deployment(dict(sorted(groups.items())))


def kind_rank(kind: str) -> float:
    """teacher, student, int8, pruned, pruned + int8; a QAT variant just after its kind."""
    base = next((i for i, k in enumerate(("teacher", "student", "int8")) if kind.startswith(k)), 3)
    return base + ("+ int8" in kind) + 0.5 * ("(qat)" in kind)


def _row(root: Path, r: RunRecord, by_id: dict[str, RunRecord], referenced: set[str], tw: float | None) -> Row:
    from kdlab.models.registry import display_name

    chain = lineage(r, by_id)
    origin = chain[-1]
    cfg = origin.config
    name = display_name(str(cfg["model"]), float(cfg["width"]), tw)
    if cfg.get("teacher"):
        teacher = by_id.get(str(cfg["teacher"]).partition("@")[0])
        if teacher is not None:
            name += f" <- {display_name(teacher.config['model'], teacher.config['width'], tw)}"
    pruned = next((c.config["model_args"] for c in chain if str(c.config.get("model", "")).startswith("pruned:")),
                  None)
    int8 = bool(r.config["deploy"].get("quantize"))
    is_teacher = cfg.get("method") == "ce" and (origin.run_id in referenced or origin.role == "teacher")
    kind = ("teacher" if is_teacher else "student") if pruned is None else f"pruned {pruned['ratio']:g}"
    if int8:
        kind = "int8" if pruned is None else f"{kind} + int8"
    if any(c.config.get("method") == "qat" for c in chain):
        kind += " (qat)"
    info = deploy_info(root, r.run_id)
    latency = {e["batch"]: e for e in load_latency(root, r.run_id)
               if e["runtime"] == "onnxruntime" and e["threads"] == 1}
    reference = _fp32_acc(origin, by_id)
    return Row(name, kind, "int8" if int8 else "fp32", r.params,
               info["flops"] / 1e6 if info.get("flops") else None,
               info["size_bytes"] / 1e6 if "size_bytes" in info else None,
               latency[1]["median_ms"] if 1 in latency else None,
               latency[64]["median_ms"] if 64 in latency else None,
               r.final_acc, None if reference is None else r.final_acc - reference, r.run_id,
               (latency.get(1) or latency.get(64) or {}).get("cpu"))


def _fp32_acc(origin: RunRecord, by_id: dict[str, RunRecord]) -> float | None:
    """Accuracy of a trained run's fp32 ONNX export (else of the run itself, in PyTorch)."""
    export = fp32_export(list(by_id.values()), origin.run_id)
    return export.final_acc if export is not None else origin.final_acc


# ---- text ---------------------------------------------------------------------------------------


def _cells(row: Row) -> list[str]:
    def num(x: float | None, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    return [row.model, row.kind, row.precision, num(row.params, ","), num(row.mflops, ".1f"),
            num(row.size_mb, ".3f"), num(row.b1_ms, ".3f"), num(row.b64_ms, ".2f"), f"{row.acc:.2f}",
            num(row.delta, "+.2f"), row.run_id[:8] + ("" if row.file == "ok" else f" ({row.file.split(':')[0]})")]


def render_deployment(table: Deployment, fmt: str = "md") -> str:
    """The deployment table as markdown, LaTeX, CSV or JSON ('' when there is nothing deployed)."""
    if not table.rows:
        return ""
    if fmt == "json":
        return json.dumps(deployment_json(table), indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["group", *COLUMNS, "cpu"])
        for key, rows in table.groups.items():
            for r in rows:
                writer.writerow([key, *(getattr(r, c) for c in COLUMNS), r.cpu])
        return buf.getvalue()
    cpus = sorted({r.cpu for r in table.rows if r.cpu})
    note = NOTE + (f" CPU: {'; '.join(cpus)}." if cpus else "")
    if fmt == "latex":
        from kdlab.reporting import latex_escape

        lines = []
        for key, rows in table.groups.items():
            lines += [r"\begin{table}[ht]", r"\centering", rf"\caption{{Deployment: {latex_escape(key)}}}",
                      r"\begin{tabular}{" + "l" * 3 + "r" * (len(HEADER) - 3) + "}", r"\toprule",
                      " & ".join(map(latex_escape, HEADER)) + r" \\", r"\midrule"]
            lines += [" & ".join(latex_escape(c) for c in _cells(r)) + r" \\" for r in rows]
            lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
        return "\n".join(lines + [f"% {note}"]) + "\n"
    lines = ["## Deployment", "", note, ""]
    for key, rows in table.groups.items():
        lines += [f"### {key}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows] + [""]
    return "\n".join(lines)


def with_deployment(text: str, table: Deployment, fmt: str) -> str:
    """The study report's text with the deployment table added: after it in markdown and LaTeX, under
    "deployment" in JSON; CSV keeps its one set of columns (deployment.csv is written with --out)."""
    if not table.rows or fmt == "csv":
        return text
    if fmt == "json":
        return json.dumps({**json.loads(text), "deployment": deployment_json(table)}, indent=2)
    return text.rstrip("\n") + "\n\n" + render_deployment(table, fmt)


# ---- the plot -----------------------------------------------------------------------------------


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both (lower latency and higher accuracy), by latency."""
    front: list[tuple[float, float]] = []
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((lat, acc))
    return front


def draw_deployment(table: Deployment, out_dir: Path) -> list[Path]:
    """One accuracy-vs-latency PNG per (dataset, preset) with measured latency; returns the files."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for key, rows in table.groups.items():
        rows = [r for r in rows if r.b1_ms is not None]
        if not rows:
            continue
        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        kinds = sorted({r.kind for r in rows}, key=lambda k: (kind_rank(k), k))
        colours = {k: colormaps["tab10"](i % 10) for i, k in enumerate(kinds)}
        for kind in kinds:
            mine = [r for r in rows if r.kind == kind]
            ax.scatter([r.b1_ms for r in mine], [r.acc for r in mine], color=colours[kind], label=kind, zorder=3)
        front = pareto([(r.b1_ms, r.acc) for r in rows])
        ax.plot(*zip(*front, strict=True), color="grey", linestyle="--", linewidth=1, label="Pareto front", zorder=2)
        ax.set_xscale("log")
        ax.set_xlabel("latency, batch 1, one CPU thread, ONNX Runtime (ms)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Accuracy against latency: {key}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"deployment_{key.replace(' / ', '_').replace('/', '_')}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    return written


def write_deployment(table: Deployment, out_dir: Path) -> list[Path]:
    """deployment.md / .csv / .json and the plots into out_dir (nothing when nothing is deployed)."""
    if not table.rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in ("md", "csv", "json"):
        path = out_dir / f"deployment.{fmt}"
        path.write_text(render_deployment(table, fmt), encoding="utf-8")
        written.append(path)
    return written + draw_deployment(table, out_dir)


def deployment_json(table: Deployment) -> dict[str, Any]:
    """The table as a JSON-ready dict (what `kdlab report --format json` adds under "deployment")."""
    return {k: [asdict(r) for r in rows] for k, rows in table.groups.items()}
