"""The report's tables from the runs store: runs grouped into studies, one run per slot, what is missing.

`build_report` reads every run of a store and groups them into *studies* (same dataset, preset and
recipe). Within a study a finished `ce` run fills a Table 1 row and any other method's run a
Tables 2-3 cell (`statistics.py` computes both); runs that are unfinished, duplicated or lack a
baseline or a known teacher are listed as missing, never averaged in.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from kdlab.errors import UserError
from kdlab.report.model import Cell, Missing, ModelRow, Report, Study
from kdlab.report.naming import RunInfo, describe, display_name, family_rank, recipe, slot_text, study_teacher_width
from kdlab.report.statistics import Alone, Rows, cell, link_to_kd, model_row, noise_rows, usable

if TYPE_CHECKING:
    from kdlab.store import RunRecord, Store


def build_report(store: Store, dataset: str | None = None, preset: str | None = None) -> Report:
    """Read every run in `store` (optionally one dataset and/or preset) and arrange the studies."""
    runs = store.runs()
    chosen = [r for r in runs if (dataset is None or r.config.get("dataset") == dataset)
              and (preset is None or r.config.get("preset") == preset)]
    if runs and not chosen:
        held = sorted({f"{r.config.get('dataset')}/{r.config.get('preset')}" for r in runs})
        raise UserError(f"no runs with {_filter_text(dataset, preset)} in {store.path}; "
                        f"it holds dataset/preset {', '.join(held)}")
    by_id = {r.run_id: r for r in runs}
    groups: dict[tuple[str, str, str], list[RunRecord]] = defaultdict(list)
    for r in chosen:
        groups[(str(r.config.get("dataset")), str(r.config.get("preset")), recipe(r.config))].append(r)
    studies = [_build_study(key, groups[key], by_id) for key in sorted(groups)]
    notes = []
    if not any(usable(r) for r in chosen):
        where = f" with {_filter_text(dataset, preset)}" if dataset or preset else ""
        notes.append(f"No finished runs{where} in {store.root}: train some with `kdlab train` or "
                     "`kdlab grid`.")
    return Report(studies, notes, str(store.root))


def _filter_text(dataset: str | None, preset: str | None) -> str:
    parts = [f"dataset {dataset!r}" if dataset else "", f"preset {preset!r}" if preset else ""]
    return " and ".join(p for p in parts if p)


def _build_study(key: tuple[str, str, str], runs: list[RunRecord], by_id: dict[str, RunRecord]) -> Study:
    dataset, preset, recipe_text = key
    tw = study_teacher_width(preset, (r.config["width"] for r in runs))
    infos = [describe(r, tw, by_id) for r in runs]
    seeds = sorted({i.seed for i in infos})
    missing: list[Missing] = []
    chosen = _one_per_slot([i for i in infos if usable(i.record)], missing)
    referenced = {r.config.get("teacher") for r in runs}
    table1 = _table1([i for i in chosen if i.is_ce], tw, referenced)
    alone = {(i.model, i.width, i.seed): i.record for i in chosen if i.is_ce}
    rows = {(row.model_name, row.width): row for row in table1}
    cells = _cells([i for i in chosen if not i.is_ce], alone, rows, seeds, missing)
    link_to_kd(cells)
    missing = [*_unfinished(infos), *_absent(infos, tw, preset, seeds), *missing, *_unknown_teachers(infos)]
    return Study(dataset, preset, recipe_text, tw, seeds, table1, cells, missing, noise_rows(table1, cells))


def _one_per_slot(infos: list[RunInfo], missing: list[Missing]) -> list[RunInfo]:
    """One finished run per (model, teacher, method, seed): the newest; the others are reported."""
    kept: dict[tuple[str, str | None, str, int], RunInfo] = {}
    for info in infos:  # the store lists runs oldest first
        old = kept.get(info.slot)
        if old is not None:
            missing.append(Missing("duplicate", old.what, old.seed, "ignored: a newer run fills this slot",
                                   old.record.run_id))
        kept[info.slot] = info
    return list(kept.values())


def _table1(infos: list[RunInfo], tw: float, referenced: set[str | None]) -> list[ModelRow]:
    groups: dict[tuple[str, float], list[RunInfo]] = defaultdict(list)
    for i in infos:
        groups[(i.model, i.width)].append(i)
    rows = [model_row(sorted(g, key=lambda i: i.seed), tw, referenced) for g in groups.values()]
    return sorted(rows, key=lambda r: (family_rank(r.model_name), r.role != "T", -r.width))


def _cells(infos: list[RunInfo], alone: Alone, rows: Rows, seeds: list[int],
           missing: list[Missing]) -> list[Cell]:
    groups: dict[tuple[str, str | None, str], list[RunInfo]] = defaultdict(list)
    for i in infos:
        groups[(i.name, i.teacher, i.method)].append(i)
    cells = [cell(sorted(g, key=lambda i: i.seed), alone, rows, seeds, missing) for g in groups.values()]
    return sorted(cells, key=_cell_order)


def _cell_order(c: Cell) -> tuple[Any, ...]:
    teacher_rank = family_rank(c.teacher_model) if c.teacher_model else (99, c.teacher or "")
    return (c.online, family_rank(c.student_model), -c.student_width, c.method != "kd", c.method,
            teacher_rank, -(c.teacher_width or 0.0), c.teacher or "")


def _unfinished(infos: list[RunInfo]) -> list[Missing]:
    def status(r: RunRecord) -> str:
        return r.status if r.status != "done" else "done without an accuracy"

    return [Missing("unfinished", i.what, i.seed, status(i.record), i.record.run_id, i.record.error)
            for i in infos if not usable(i.record)]


def _unknown_teachers(infos: list[RunInfo]) -> list[Missing]:
    status = "teacher run not in this store: no teacher size, so no compression"
    return [Missing("teacher", i.what, i.seed, status, i.record.run_id)
            for i in infos if i.teacher and i.teacher.startswith("run:")]


def _absent(infos: list[RunInfo], tw: float, preset: str, seeds: list[int]) -> list[Missing]:
    """Runs the grid's shape expects, for every seed in the study, that the store does not hold at all.

    Shape: every model seen, trained alone at W and at each student width (those below W, and the
    preset's student width); every student distilled with `kd` from every model at W (the
    paper's grid). Other methods are ablations: only the pairs they were run on are expected.
    """
    from kdlab.config import PRESET_WIDTHS

    present = {i.slot for i in infos}
    models = sorted({i.model for i in infos}, key=family_rank)
    widths = {i.width for i in infos if i.width < tw and not math.isclose(i.width, tw)}
    if preset in PRESET_WIDTHS:
        widths.add(PRESET_WIDTHS[preset][1])
    student_widths = sorted(widths, reverse=True)
    expected = [(display_name(m, w, tw), None, "ce") for m in models for w in [tw, *student_widths]]
    expected += [(display_name(m, w, tw), display_name(t, tw, tw), "kd")
                 for m in models for w in student_widths for t in models]
    expected += [i.slot[:3] for i in infos if not i.is_ce and i.method != "kd"]
    expected = list(dict.fromkeys(expected))
    return [Missing("absent", slot_text(*slot), seed, "absent") for slot in expected for seed in seeds
            if (*slot, seed) not in present]
