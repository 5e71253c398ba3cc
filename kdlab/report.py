"""The study's report: the paper's Tables 1-3 from the runs store, with statistics over seeds.

A *study* is the runs of one store that share dataset, preset and recipe (any setting that differs
from the preset's value for that model, such as `epochs=5`, starts a study of its own, so runs
trained differently are never averaged together). Within a study:

- The study's *teacher width* W is the preset's teacher width (`config.PRESET_WIDTHS`: 1.0 for
  paper and fast, 0.125 for smoke). Display names are relative to it: `resnet18` at W,
  `resnet18_half` at W/2, `resnet18@0.25` otherwise.
- A finished cross-entropy (`ce`) run is a *teacher* (role T) if some run names it as its
  teacher or its width is at least W; otherwise it is a *student-alone baseline* (role S). Using
  the preset's width rather than the largest width found keeps the roles right in a partial
  store that holds only students.
- A run of any other method is a distillation run. With a teacher (a run id, looked up in the
  store for its model and width, or `file:<sha>` for an external checkpoint) it fills the cell
  (student, teacher, method) of Tables 2-3; without one (online or self-distillation) it fills
  (student, method). Method labels carry non-default hyperparameters: `kd(T=4, alpha=0.5)`.
- A distillation run of seed s is paired with the ce run of the same student model, width and
  seed: accuracy gain = KD final_acc - alone final_acc, tested with a paired t-test over seeds.

Headline accuracy is always the last epoch's test accuracy (final_acc); best_acc selects on the
test set and only appears as an extra. Runs that are not finished never enter a table; they are
listed under `missing`, with the runs the grid's shape expects but the store does not hold.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab import paper, stats
from kdlab.errors import UserError
from kdlab.stats import PairedResult, Summary

if TYPE_CHECKING:
    from kdlab.store import RunRecord, Store

FORMATS = ("md", "csv", "json", "latex")
FILE_NAMES = {"md": "report.md", "csv": "report.csv", "json": "report.json", "latex": "report.tex"}
TIMING_PARTS = (("data_s", "Data"), ("teacher_s", "Teacher fwd"), ("student_s", "Student step"),
                ("eval_s", "Eval"), ("other_s", "Other"))
DASH = "—"

# Config fields that name a run (or say where it ran) rather than how it was trained.
_IDENTITY_FIELDS = frozenset({"preset", "model", "width", "dataset", "data_dir", "method", "teacher",
                              "teacher_path", "device", "seed", "eval_batch_size"})
_METHOD_FIELDS = ("temperature", "alpha", "method_args")  # only distillation runs use these
_SHORT = {"temperature": "T"}

PAPER_NOTE = (f"Paper values: {paper.SOURCE}; one run per cell on NCSU VCL and on Google Colab. "
              "Our data is the JPEG copy of CIFAR-10 (or synthetic data) trained with kdlab's code and "
              "recipe, so absolute numbers are not a reproduction: compare directions and sizes of "
              "differences. The paper's Table 1 gives one time per row (taken as VCL). Its Colab gains "
              "for resnet18_half are 0.03 below Colab acc minus Table 1's student acc; they are shown as "
              "printed.")


# ---- the data model ---------------------------------------------------------------------------


@dataclass
class ModelRow:
    """A Table 1 row: one model trained without KD (ce), over its seeds."""

    family: str
    role: str  # "T" (teacher) or "S" (student alone)
    model: str  # display name
    model_name: str  # registry name
    width: float
    params: int | None
    paper_params: int | None
    acc: Summary
    best_acc: Summary
    time: Summary | None
    timing: dict[str, float]
    seeds: list[int]
    acc_by_seed: dict[int, float]
    run_ids: list[str]
    curve: list[tuple[int, float]]  # (epoch, mean test accuracy over seeds)


@dataclass
class Cell:
    """A Tables 2-3 cell: one student trained with one method (and teacher), over its seeds."""

    student: str
    teacher: str | None  # display name, "file:<sha>", or None for methods without a teacher
    method: str
    student_model: str
    student_width: float
    teacher_model: str | None
    teacher_width: float | None
    acc: Summary
    best_acc: Summary
    acc_by_seed: dict[int, float]
    gain: PairedResult | None  # over the student alone, paired by seed
    gain_by_seed: dict[int, float]
    time: Summary | None
    alone_time: Summary | None
    teacher_time: Summary | None  # training the teacher(s) this cell used
    compression: float | None
    timing: dict[str, float]  # mean seconds per part of the wall time
    seeds: list[int]
    seeds_missing: list[int]
    run_ids: list[str]
    curve: list[tuple[int, float]]
    gain_vs_kd: PairedResult | None = None  # over plain "kd" for the same pair

    @property
    def online(self) -> bool:
        return self.teacher is None

    @property
    def pair(self) -> str:
        return self.student if self.teacher is None else f"{self.student} <- {self.teacher}"

    @property
    def time_ratio(self) -> float | None:
        """Mean KD wall time over mean student-alone wall time."""
        if self.time is None or self.alone_time is None or not self.alone_time.mean:
            return None
        return self.time.mean / self.alone_time.mean


@dataclass
class Missing:
    """A run the study lacks or cannot use: absent, unfinished, without baseline, or a duplicate."""

    kind: str  # absent | unfinished | baseline | teacher | duplicate
    what: str
    seed: int | None
    status: str
    run_id: str | None = None
    error: str | None = None


@dataclass
class NoiseRow:
    """Is the paper's VCL-vs-Colab difference in one cell within our seed-to-seed spread?"""

    student: str
    teacher: str | None  # None: a Table 1 model
    n: int
    acc_std: float | None
    paper_acc_diff: float  # |VCL - Colab| accuracy
    acc_bound: float | None  # two single runs differ by up to this in 95% of cases
    acc_within: bool | None
    gain_n: int = 0
    gain_std: float | None = None
    paper_gain_diff: float | None = None
    gain_bound: float | None = None
    gain_within: bool | None = None


@dataclass
class Study:
    """The runs sharing dataset, preset and recipe, arranged as the paper's tables."""

    dataset: str
    preset: str
    recipe: str  # settings that differ from the preset ("" when none)
    teacher_width: float
    seeds: list[int]
    table1: list[ModelRow]
    cells: list[Cell]
    missing: list[Missing]
    noise: list[NoiseRow]

    @property
    def name(self) -> str:
        return f"{self.dataset} / {self.preset}" + (f" ({self.recipe})" if self.recipe else "")

    @property
    def slug(self) -> str:
        text = f"{self.dataset}-{self.preset}" + (f"-{self.recipe}" if self.recipe else "")
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(c.method for c in self.cells))


@dataclass
class Report:
    """Every study found in a store; `notes` say what is absent (e.g. no finished runs)."""

    studies: list[Study]
    notes: list[str]
    source: str
    files: list[Path] = field(default_factory=list)

    @property
    def has_results(self) -> bool:
        return any(s.table1 or s.cells for s in self.studies)


# ---- naming and roles -------------------------------------------------------------------------


def display_name(model: str, width: float, teacher_width: float) -> str:
    """The paper's names: `model` at the teacher width, `model_half` at half of it, else `model@width`."""
    if math.isclose(width, teacher_width):
        return model
    if math.isclose(width, teacher_width / 2):
        return f"{model}_half"
    return f"{model}@{width:g}"


def _family_rank(model: str) -> tuple[int, str]:
    """The paper's order (vgg16, resnet18, densenet121), then the other models by name."""
    return (paper.FAMILIES.index(model) if model in paper.FAMILIES else len(paper.FAMILIES), model)


def study_teacher_width(preset: str, widths: Iterable[float]) -> float:
    """W: the preset's teacher width; for a preset kdlab does not know, the largest width used."""
    from kdlab.config import PRESET_WIDTHS

    if preset in PRESET_WIDTHS:
        return PRESET_WIDTHS[preset][0]
    return max(widths, default=1.0)


@cache
def _preset_config(preset: str, model: str) -> dict[str, Any]:
    from kdlab.config import build_config

    try:
        return build_config(preset, model).to_dict()
    except UserError:  # a preset or model this kdlab does not know: compare with nothing
        return {}


def _differences(cfg: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """'key=value' for each of `keys` where the run differs from its preset's value."""
    base = _preset_config(str(cfg.get("preset")), str(cfg.get("model")))
    out = []
    for key in keys:
        value = cfg.get(key)
        if key == "method_args":
            out += [f"{k}={_plain(v)}" for k, v in sorted((value or {}).items())]
        elif key not in base or base[key] != value:
            out.append(f"{_SHORT.get(key, key)}={_plain(value)}")
    return out


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, list) else str(value)


def _recipe(cfg: dict[str, Any]) -> str:
    keys = sorted(k for k in cfg if k not in _IDENTITY_FIELDS and k not in _METHOD_FIELDS)
    return ", ".join(_differences(cfg, keys))


def method_label(cfg: dict[str, Any]) -> str:
    """The method's name, with its hyperparameters where they differ from the preset: `kd(T=4)`."""
    method = str(cfg.get("method"))
    if method == "ce":
        return method
    diffs = _differences(cfg, _METHOD_FIELDS)
    return f"{method}({', '.join(diffs)})" if diffs else method


@dataclass
class _Info:
    """What a run is within its study: its names, method label and teacher."""

    record: RunRecord
    name: str
    model: str
    width: float
    method: str
    seed: int
    teacher: str | None = None
    teacher_model: str | None = None
    teacher_width: float | None = None
    teacher_run: RunRecord | None = None

    @property
    def is_ce(self) -> bool:
        return self.method == "ce"

    @property
    def slot(self) -> tuple[str, str | None, str, int]:
        return (self.name, self.teacher, self.method, self.seed)

    @property
    def what(self) -> str:
        return _what(self.name, self.teacher, self.method)


def _what(name: str, teacher: str | None, method: str) -> str:
    if method == "ce":
        return f"{name} (ce, no KD)"
    return f"{name} <- {teacher} ({method})" if teacher else f"{name} ({method}, no teacher)"


def _describe(r: RunRecord, tw: float, by_id: dict[str, RunRecord]) -> _Info:
    cfg = r.config
    info = _Info(r, display_name(cfg["model"], cfg["width"], tw), cfg["model"], cfg["width"],
                 method_label(cfg), int(cfg["seed"]))
    ident = cfg.get("teacher")
    if info.is_ce or not ident:
        return info
    if ident.startswith("file:"):
        info.teacher = ident[:13]  # "file:" and 8 hex digits of the checkpoint's hash
        return info
    run_id, _, epoch = ident.partition("@")  # RUN@EPOCH: an early-stopped snapshot of that run (ESKD)
    t = by_id.get(run_id)
    if t is None:
        info.teacher = f"run:{ident[:8]}"
        return info
    name = display_name(t.config["model"], t.config["width"], tw) + (f"@ep{epoch}" if epoch else "")
    # A distilled teacher (a teacher assistant) is named with its method, so it never looks like a ce model.
    info.teacher = name if t.config["method"] == "ce" else f"{name}[{method_label(t.config)}]"
    info.teacher_model, info.teacher_width, info.teacher_run = t.config["model"], t.config["width"], t
    return info


# ---- building ---------------------------------------------------------------------------------


def build_report(store: Store, dataset: str | None = None, preset: str | None = None) -> Report:
    """Read every run in `store` (optionally one dataset and/or preset) and arrange the studies."""
    from kdlab.deploy.runs import is_deployment_run  # exported, pruned, QAT models: the deployment table's

    runs = store.runs()
    chosen = [r for r in runs if (dataset is None or r.config.get("dataset") == dataset)
              and (preset is None or r.config.get("preset") == preset) and not is_deployment_run(r.config)]
    if runs and not chosen:
        held = sorted({f"{r.config.get('dataset')}/{r.config.get('preset')}" for r in runs})
        raise UserError(f"no runs with {_filter_text(dataset, preset)} in {store.path}; "
                        f"it holds dataset/preset {', '.join(held)}")
    by_id = {r.run_id: r for r in runs}
    groups: dict[tuple[str, str, str], list[RunRecord]] = defaultdict(list)
    for r in chosen:
        groups[(str(r.config.get("dataset")), str(r.config.get("preset")), _recipe(r.config))].append(r)
    studies = [_build_study(key, groups[key], by_id) for key in sorted(groups)]
    notes = []
    if not any(_usable(r) for r in chosen):
        where = f" with {_filter_text(dataset, preset)}" if dataset or preset else ""
        notes.append(f"No finished runs{where} in {store.root}: train some with `kdlab train` or "
                     "`kdlab grid`.")
    return Report(studies, notes, str(store.root))


def _filter_text(dataset: str | None, preset: str | None) -> str:
    parts = [f"dataset {dataset!r}" if dataset else "", f"preset {preset!r}" if preset else ""]
    return " and ".join(p for p in parts if p)


def _usable(r: RunRecord) -> bool:
    return r.status == "done" and r.final_acc is not None


def _build_study(key: tuple[str, str, str], runs: list[RunRecord], by_id: dict[str, RunRecord]) -> Study:
    dataset, preset, recipe = key
    tw = study_teacher_width(preset, (r.config["width"] for r in runs))
    infos = [_describe(r, tw, by_id) for r in runs]
    seeds = sorted({i.seed for i in infos})
    missing: list[Missing] = []
    chosen = _one_per_slot([i for i in infos if _usable(i.record)], missing)
    referenced = {r.config.get("teacher") for r in runs}
    table1 = _table1([i for i in chosen if i.is_ce], tw, referenced)
    alone = {(i.model, i.width, i.seed): i.record for i in chosen if i.is_ce}
    rows = {(row.model_name, row.width): row for row in table1}
    cells = _cells([i for i in chosen if not i.is_ce], alone, rows, seeds, missing)
    _link_to_kd(cells)
    missing = [*_unfinished(infos), *_absent(infos, tw, preset, seeds), *missing, *_unknown_teachers(infos)]
    return Study(dataset, preset, recipe, tw, seeds, table1, cells, missing, _noise(table1, cells))


_Alone = dict[tuple[str, float, int], "RunRecord"]  # (model, width, seed) -> finished ce run
_Rows = dict[tuple[str, float], ModelRow]  # (model, width) -> Table 1 row


def _one_per_slot(infos: list[_Info], missing: list[Missing]) -> list[_Info]:
    """One finished run per (model, teacher, method, seed): the newest; the others are reported."""
    kept: dict[tuple[str, str | None, str, int], _Info] = {}
    for info in infos:  # the store lists runs oldest first
        old = kept.get(info.slot)
        if old is not None:
            missing.append(Missing("duplicate", old.what, old.seed, "ignored: a newer run fills this slot",
                                   old.record.run_id))
        kept[info.slot] = info
    return list(kept.values())


def _summary(values: Iterable[float | None]) -> Summary | None:
    present = [v for v in values if v is not None]
    return stats.summarize(present) if present else None


def _mean_timing(records: Sequence[RunRecord]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in records for k in r.timing)
    return {k: sum(r.timing[k] for r in records if k in r.timing) / sum(k in r.timing for r in records)
            for k in keys}


def _curve(records: Sequence[RunRecord]) -> list[tuple[int, float]]:
    """Mean test accuracy per epoch over the runs that reached that epoch."""
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in records:
        for e in r.history:
            if e.get("test_acc") is not None:
                per_epoch[int(e["epoch"])].append(e["test_acc"])
    return [(epoch, sum(v) / len(v)) for epoch, v in sorted(per_epoch.items())]


def _first(values: Iterable[Any]) -> Any:
    return next((v for v in values if v is not None), None)


def _table1(infos: list[_Info], tw: float, referenced: set[str | None]) -> list[ModelRow]:
    groups: dict[tuple[str, float], list[_Info]] = defaultdict(list)
    for i in infos:
        groups[(i.model, i.width)].append(i)
    rows = [_model_row(sorted(g, key=lambda i: i.seed), tw, referenced) for g in groups.values()]
    return sorted(rows, key=lambda r: (_family_rank(r.model_name), r.role != "T", -r.width))


def _model_row(infos: list[_Info], tw: float, referenced: set[str | None]) -> ModelRow:
    first, records = infos[0], [i.record for i in infos]
    at_teacher_width = first.width >= tw or math.isclose(first.width, tw)
    is_teacher = at_teacher_width or any(r.run_id in referenced for r in records)
    return ModelRow(
        family=first.model, role="T" if is_teacher else "S", model=first.name, model_name=first.model,
        width=first.width, params=_first(r.params for r in records),
        paper_params=_first(r.paper_params for r in records),
        acc=stats.summarize([r.final_acc for r in records]),
        best_acc=stats.summarize([r.best_acc if r.best_acc is not None else r.final_acc for r in records]),
        time=_summary(r.wall_s for r in records), timing=_mean_timing(records), seeds=[i.seed for i in infos],
        acc_by_seed={i.seed: i.record.final_acc for i in infos}, run_ids=[r.run_id for r in records],
        curve=_curve(records),
    )


def _cells(infos: list[_Info], alone: _Alone, rows: _Rows, seeds: list[int],
           missing: list[Missing]) -> list[Cell]:
    groups: dict[tuple[str, str | None, str], list[_Info]] = defaultdict(list)
    for i in infos:
        groups[(i.name, i.teacher, i.method)].append(i)
    cells = [_cell(sorted(g, key=lambda i: i.seed), alone, rows, seeds, missing) for g in groups.values()]
    return sorted(cells, key=_cell_order)


def _cell_order(c: Cell) -> tuple[Any, ...]:
    teacher_rank = _family_rank(c.teacher_model) if c.teacher_model else (99, c.teacher or "")
    return (c.online, _family_rank(c.student_model), -c.student_width, c.method != "kd", c.method,
            teacher_rank, -(c.teacher_width or 0.0), c.teacher or "")


def _cell(infos: list[_Info], alone: _Alone, rows: _Rows, study_seeds: list[int],
          missing: list[Missing]) -> Cell:
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
    student_pp = _first(r.paper_params for r in records)
    teacher_pp = _first(t.paper_params for t in teachers.values())
    alone_row = rows.get((first.model, first.width))
    return Cell(
        student=first.name, teacher=first.teacher, method=first.method, student_model=first.model,
        student_width=first.width, teacher_model=first.teacher_model, teacher_width=first.teacher_width,
        acc=stats.summarize(list(accs.values())),
        best_acc=stats.summarize([r.best_acc if r.best_acc is not None else r.final_acc for r in records]),
        acc_by_seed=accs, gain=_paired(accs, base), gain_by_seed=gains,
        time=_summary(r.wall_s for r in records),
        alone_time=alone_row.time if alone_row else None,
        teacher_time=_summary(t.wall_s for t in teachers.values()),
        compression=student_pp / teacher_pp if student_pp and teacher_pp else None,
        timing=_mean_timing(records),
        seeds=sorted(accs), seeds_missing=[s for s in study_seeds if s not in accs],
        run_ids=[r.run_id for r in records], curve=_curve(records),
    )


def _link_to_kd(cells: list[Cell]) -> None:
    """Pair each other offline method's accuracy with plain `kd` on the same pair, seed by seed."""
    kd = {(c.student, c.teacher): c for c in cells if c.method == "kd"}
    for c in cells:
        ref = kd.get((c.student, c.teacher))
        if c.method == "kd" or c.online or ref is None:
            continue
        c.gain_vs_kd = _paired(c.acc_by_seed, ref.acc_by_seed)


def _paired(a: dict[int, float], b: dict[int, float]) -> PairedResult | None:
    """Paired test of a - b over the seeds both have; None when they share no seed."""
    common = [s for s in a if s in b]
    return stats.paired_test([a[s] for s in common], [b[s] for s in common]) if common else None


def _unfinished(infos: list[_Info]) -> list[Missing]:
    def status(r: RunRecord) -> str:
        return r.status if r.status != "done" else "done without an accuracy"

    return [Missing("unfinished", i.what, i.seed, status(i.record), i.record.run_id, i.record.error)
            for i in infos if not _usable(i.record)]


def _unknown_teachers(infos: list[_Info]) -> list[Missing]:
    status = "teacher run not in this store: no teacher size, so no compression"
    return [Missing("teacher", i.what, i.seed, status, i.record.run_id)
            for i in infos if i.teacher and i.teacher.startswith("run:")]


def _absent(infos: list[_Info], tw: float, preset: str, seeds: list[int]) -> list[Missing]:
    """Runs the grid's shape expects, for every seed in the study, that the store does not hold at all.

    Shape: every model seen, trained alone at W and at each student width (those below W, and the
    preset's student width); every student distilled with `kd` from every model at W (the
    paper's grid). Other methods are ablations: only the pairs they were run on are expected.
    """
    from kdlab.config import PRESET_WIDTHS

    present = {i.slot for i in infos}
    models = sorted({i.model for i in infos}, key=_family_rank)
    widths = {i.width for i in infos if i.width < tw and not math.isclose(i.width, tw)}
    if preset in PRESET_WIDTHS:
        widths.add(PRESET_WIDTHS[preset][1])
    student_widths = sorted(widths, reverse=True)
    expected = [(display_name(m, w, tw), None, "ce") for m in models for w in [tw, *student_widths]]
    expected += [(display_name(m, w, tw), display_name(t, tw, tw), "kd")
                 for m in models for w in student_widths for t in models]
    expected += [i.slot[:3] for i in infos if not i.is_ce and i.method != "kd"]
    expected = list(dict.fromkeys(expected))
    return [Missing("absent", _what(*slot), seed, "absent") for slot in expected for seed in seeds
            if (*slot, seed) not in present]


def _noise(table1: list[ModelRow], cells: list[Cell]) -> list[NoiseRow]:
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


# ---- formatting helpers -----------------------------------------------------------------------


def _num(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return DASH
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def fmt_summary(s: Summary | None, digits: int = 2) -> str:
    """`91.52` for one seed; `91.52 ± 0.21 [91.00, 92.00]` (mean ± std [95% CI]) for several."""
    if s is None:
        return DASH
    if s.std is None:
        return _num(s.mean, digits)
    interval = f"[{_num(s.ci_low, digits)}, {_num(s.ci_high, digits)}]"
    return f"{_num(s.mean, digits)} ± {_num(s.std, digits)} {interval}"


def fmt_p(p: float | None) -> str:
    return DASH if p is None else "p<0.001" if p < 0.001 else f"p={p:.2g}"


def fmt_gain(g: PairedResult | None, ci: bool = False) -> str:
    """`+0.46 ± 0.12 (p=0.01, significant)` or `(p=0.4, n.s.)`; one seed: `+0.46 (n=1)`."""
    if g is None:
        return DASH
    if g.std_diff is None:
        return f"{_num(g.mean_diff, sign=True)} (n={g.n})"
    interval = f" [{_num(g.ci_low, sign=True)}, {_num(g.ci_high, sign=True)}]" if ci else ""
    verdict = "significant" if g.significant else "n.s."
    return f"{_num(g.mean_diff, sign=True)} ± {_num(g.std_diff)}{interval} ({fmt_p(g.p)}, {verdict})"


def fmt_duration(seconds: float | None) -> str:
    """The paper's style: `20m 19s`; under a minute `12.3s`."""
    if seconds is None or not math.isfinite(seconds):
        return DASH
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs}s"


def fmt_time(s: Summary | None) -> str:
    if s is None:
        return DASH
    return fmt_duration(s.mean) + ("" if s.std is None else f" ± {fmt_duration(s.std)}")


# ---- sections: one table model, rendered as markdown or LaTeX ---------------------------------


@dataclass
class _Section:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def _sections(study: Study, compare: bool) -> list[_Section]:
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


def _table1_section(study: Study, compare: bool) -> _Section:
    header = ["Family", "Role", "Model", "Width", "Params (paper)", "Params (all)", "Acc (%)", "Time",
              "Seeds"]
    if compare:
        header += ["Paper VCL acc", "Paper Colab acc", "Paper VCL time"]
    rows = []
    for r in study.table1:
        row = [r.family, r.role, r.model, f"{r.width:g}", _int(r.paper_params), _int(r.params),
               fmt_summary(r.acc), fmt_time(r.time), ",".join(map(str, r.seeds))]
        if compare:
            ref = paper.table1(r.model)
            row += [DASH] * 3 if ref is None else [_num(ref.acc_vcl), _num(ref.acc_colab),
                                                   fmt_duration(ref.time_vcl_s)]
        rows.append(row)
    return _Section("Table 1: training without KD (T = teacher, S = student alone)", header, rows)


def _int(x: int | None) -> str:
    return DASH if x is None else f"{x:,}"


def _kd_section(study: Study, method: str, compare: bool) -> _Section:
    cells = [c for c in study.cells if c.method == method and not c.online]
    teachers = list(dict.fromkeys(c.teacher for c in cells))
    students = list(dict.fromkeys(c.student for c in cells))
    index = {(c.student, c.teacher): c for c in cells}
    metrics = [("Acc (%)", lambda c: fmt_summary(c.acc), "acc", _num),
               ("Time", lambda c: fmt_time(c.time), "time_s", fmt_duration),
               ("Acc gain", lambda c: fmt_gain(c.gain), "gain", lambda x: _num(x, sign=True)),
               ("Comp", lambda c: _num(c.compression), "compression", _num)]
    rows = []
    for s in students:
        for label, show, attr, paper_fmt in metrics:
            rows.append([s, label, *(show(index[(s, t)]) if (s, t) in index else DASH for t in teachers)])
            if compare and method == "kd":  # the paper ran plain KD (T=3, alpha=0.7) only
                rows.append(["", f"{label}, paper", *(_paper_kd(s, t, attr, paper_fmt) for t in teachers)])
    title = f"Tables 2-3 layout, method {method}: rows student, columns teacher"
    return _Section(title, ["Student", "Metric", *[t or DASH for t in teachers]], rows)


def _paper_kd(student: str, teacher: str | None, attr: str, fmt: Any) -> str:
    vcl, colab = (paper.kd_cell(student, teacher or "", p) for p in paper.PLATFORMS)
    if vcl is None or colab is None:
        return DASH
    a, b = getattr(vcl, attr), getattr(colab, attr)
    return f"VCL/Colab {fmt(a)}" if a == b else f"VCL {fmt(a)} / Colab {fmt(b)}"


def _methods_section(study: Study) -> _Section:
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
    return _Section("Methods by pair", ["Method", "Metric", *pairs], rows, notes)


def _timing_section(study: Study) -> _Section:
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
    return _Section("Timing: where the time goes", header, rows, notes)


def _noise_section(study: Study) -> _Section:
    header = ["Model / cell", "n", "Our acc std", "Paper |VCL-Colab| acc", "Two-run bound", "Within noise",
              "Our gain std", "Paper |VCL-Colab| gain", "Two-run bound (gain)", "Within noise (gain)"]
    rows = [[r.student if r.teacher is None else f"{r.student} <- {r.teacher}", str(r.n), _num(r.acc_std),
             _num(r.paper_acc_diff), _num(r.acc_bound), _yes_no(r.acc_within), _num(r.gain_std),
             _num(r.paper_gain_diff), _num(r.gain_bound), _yes_no(r.gain_within)] for r in study.noise]
    notes = ["Two-run bound: t(0.975, n-1) x std x sqrt(2), the difference two single runs that differ "
             "only by their seed stay within 95% of the time (stats.within_noise).",
             noise_summary(study.noise)]
    return _Section("Noise: are the paper's VCL-vs-Colab differences larger than seed-to-seed spread?",
                    header, rows, notes)


def _yes_no(x: bool | None) -> str:
    return DASH if x is None else "yes" if x else "no"


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


def _missing_section(study: Study) -> _Section:
    rows = [[m.what, DASH if m.seed is None else str(m.seed), m.status, (m.run_id or DASH)[:12],
             _one_line(m.error) if m.error else DASH] for m in study.missing]
    return _Section("Missing or unusable runs", ["What", "Seed", "Status", "Run", "Error"], rows)


def _one_line(text: str, limit: int = 120) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---- renderers --------------------------------------------------------------------------------


def render(report: Report, fmt: str = "md", compare_paper: bool = False) -> str:
    """The report as text: "md" (markdown), "csv", "json" or "latex" (booktabs)."""
    renderers = {"md": _render_md, "csv": _render_csv, "json": _render_json, "latex": _render_latex}
    if fmt not in renderers:
        raise UserError(f"unknown report format {fmt!r}: choose from {', '.join(FORMATS)}")
    return renderers[fmt](report, compare_paper)


def _intro(report: Report, compare: bool) -> list[str]:
    lines = [f"Runs: {report.source}. Accuracy is the test accuracy after the last epoch (%), never the "
             "best epoch. With several seeds: mean ± std [95% CI]; gains are per-seed differences from the "
             "student trained alone, with a paired t-test (significant at p < 0.05)."]
    if compare:
        lines.append(PAPER_NOTE)
    return lines + report.notes


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]


def _study_line(study: Study) -> str:
    tw = study.teacher_width
    seeds = ", ".join(map(str, study.seeds)) or DASH
    return (f"Seeds: {seeds}. Teacher width {tw:g}: `resnet18` means width {tw:g}, `resnet18_half` "
            f"width {tw / 2:g}, `model@w` any other width.")


def _render_md(report: Report, compare: bool) -> str:
    lines = ["# kdlab report", "", *[p + "\n" for p in _intro(report, compare)]]
    for study in report.studies:
        lines += [f"## {study.name}", "", _study_line(study), ""]
        for sec in _sections(study, compare):
            lines += [f"### {sec.title}", "", *_md_table(sec.header, sec.rows), ""]
            lines += [n + "\n" for n in sec.notes]
    return "\n".join(lines).rstrip() + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "—": "--", "<-": r"$\leftarrow$", "|": r"$|$"}


def latex_escape(text: str) -> str:
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


def _render_latex(report: Report, compare: bool) -> str:
    lines = ["% kdlab report: needs \\usepackage{booktabs}", *("% " + p for p in _intro(report, compare)), ""]
    for study in report.studies:
        lines += [f"% {study.name}", ""]
        for sec in _sections(study, compare):
            lines += _latex_table(f"{study.name}: {sec.title}", sec.header, sec.rows)
            lines += [latex_escape(n) + "\n" for n in sec.notes]
    return "\n".join(lines)


CSV_COLUMNS = ("dataset", "preset", "recipe", "section", "student", "teacher", "method", "metric", "seed",
               "n", "mean", "std", "ci_low", "ci_high", "p", "significant", "paper_vcl", "paper_colab",
               "detail")


def _render_csv(report: Report, compare: bool) -> str:
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
        for metric, value, vcl, colab in (("acc", r.acc, *_pp(ref, "acc_vcl", "acc_colab")),
                                          ("best_acc", r.best_acc, None, None),
                                          ("time_s", r.time, *_pp(ref, "time_vcl_s", "time_colab_s")),
                                          ("paper_params", r.paper_params, *_pp(ref, "params", "params")),
                                          ("params", r.params, None, None)):
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
               "detail": _one_line(m.error or m.run_id or "", 300)}


def _pp(ref: paper.PaperModel | None, vcl: str, colab: str) -> tuple[Any, Any]:
    return (None, None) if ref is None else (getattr(ref, vcl), getattr(ref, colab))


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: such values become null."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _render_json(report: Report, compare: bool) -> str:
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
           "paper_params": r.paper_params, "acc": r.acc.mean, "best_acc": r.best_acc.mean,
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


# ---- writing ----------------------------------------------------------------------------------


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
        from kdlab.plots import draw_all

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
    from kdlab.api import default_runs_dir
    from kdlab.store import Store

    store = Store(runs_dir if runs_dir is not None else default_runs_dir(), create=False)
    try:
        result = build_report(store, dataset=dataset, preset=preset)
    finally:
        store.close()
    if out_dir is not None:
        write_report(result, out_dir, formats=formats, compare_paper=compare_paper, plots=plots)
    return result
