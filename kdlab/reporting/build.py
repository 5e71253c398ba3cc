"""The report's tables from the runs store: runs grouped into studies, one run per slot, what is missing.

`build_report` reads every run of a store and groups them into *studies* (same data, preset and
recipe; the data is its fingerprint, so one folder given by two paths is one study and two
folders of one name are two). Within a study a finished `ce` run fills a Table 1 row and any
other method's run a Tables 2-3 cell (`statistics.py` computes both); runs that are unfinished,
diverged, duplicated or lack a baseline or a known teacher are listed as missing, never averaged in.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from kdlab.data.checks import describe_data
from kdlab.errors import UserError
from kdlab.health import is_diverged
from kdlab.reporting.model import Cell, Missing, ModelRow, Report, Study
from kdlab.reporting.naming import RunInfo, describe, family_rank, is_deployment_run, recipe, study_teacher_width
from kdlab.reporting.statistics import Alone, Rows, cell, link_to_kd, model_row, noise_rows, usable, verdict
from kdlab.reporting.text import DASH

if TYPE_CHECKING:
    from kdlab.store import RunRecord, Store


def build_report(store: Store, dataset: str | None = None, preset: str | None = None) -> Report:
    """Read every run in `store` (optionally one dataset and/or preset) and arrange the studies.

    `dataset` matches a study's dataset name, the location its runs were given (a built-in name or
    a folder), or the start of its fingerprint."""
    runs = store.runs()
    chosen = [r for r in runs if (dataset is None or _data_matches(r.config, dataset))
              and (preset is None or r.config.get("preset") == preset) and not is_deployment_run(r.config)]
    if runs and not chosen:
        held = sorted({f"{data_name(r.config)}/{r.config.get('preset')}" for r in runs})
        raise UserError(f"no runs with {_filter_text(dataset, preset)} in {store.path}; "
                        f"it holds dataset/preset {', '.join(held)}")
    by_id = {r.run_id: r for r in runs}
    groups: dict[tuple[str, str, str], list[RunRecord]] = defaultdict(list)
    for r in chosen:
        groups[(data_key(r.config), str(r.config.get("preset")), recipe(r.config))].append(r)
    names = _data_names(groups)
    studies = [_build_study(names[key[0]], key, groups[key], by_id) for key in sorted(groups, key=_study_order(names))]
    notes = []
    if not any(usable(r) for r in chosen):
        where = f" with {_filter_text(dataset, preset)}" if dataset or preset else ""
        notes.append(f"No finished runs{where} in {store.root}: train some with `kdlab train` or "
                     "`kdlab grid`.")
    return Report(studies, notes, str(store.root))


def data_key(cfg: dict[str, Any]) -> str:
    """What a run's data is: its fingerprint, or for a run from before fingerprints, its dataset name."""
    return cfg.get("data_fingerprint") or f"name:{cfg.get('dataset')}"


def data_name(cfg: dict[str, Any]) -> str:
    """The data's name for people: the dataset's name, or a folder's name."""
    return str((cfg.get("data_info") or {}).get("name") or cfg.get("dataset"))


def _data_matches(cfg: dict[str, Any], wanted: str) -> bool:
    fingerprint = cfg.get("data_fingerprint") or ""
    return wanted in (cfg.get("dataset"), data_name(cfg)) or (len(wanted) >= 4 and fingerprint.startswith(wanted))


def _data_names(groups: dict[tuple[str, str, str], list[RunRecord]]) -> dict[str, str]:
    """A name per dataset; two different datasets of one name get their fingerprints added."""
    names = {key[0]: data_name(runs[0].config) for key, runs in groups.items()}
    clashing = {n for n in names.values() if sum(v == n for v in names.values()) > 1}
    return {k: f"{n} [{k[:8]}]" if n in clashing and not k.startswith("name:") else n for k, n in names.items()}


def _study_order(names: dict[str, str]) -> Any:
    return lambda key: (names[key[0]], key[1], key[2])


def _filter_text(dataset: str | None, preset: str | None) -> str:
    parts = [f"dataset {dataset!r}" if dataset else "", f"preset {preset!r}" if preset else ""]
    return " and ".join(p for p in parts if p)


def _build_study(name: str, key: tuple[str, str, str], runs: list[RunRecord], by_id: dict[str, RunRecord]) -> Study:
    _, preset, recipe_text = key
    tw = study_teacher_width(runs, by_id)
    infos = [describe(r, tw, by_id) for r in runs]
    seeds = sorted({i.seed for i in infos})
    missing: list[Missing] = []
    chosen = _one_per_slot([i for i in infos if usable(i.record)], missing)
    table1 = _table1([i for i in chosen if i.is_ce], _roles(runs, by_id))
    alone = {(i.model, i.width, i.seed): i.record for i in chosen if i.is_ce}
    rows = {(row.model_name, row.width): row for row in table1}
    cells = _cells([i for i in chosen if not i.is_ce], alone, rows, seeds, missing)
    link_to_kd(cells)
    missing = [*_unfinished(infos), *_diverged(infos), *missing, *_unknown_teachers(infos)]
    first = runs[0].config
    data = describe_data(first.get("data_info") or {}, first.get("data_fingerprint"))
    return Study(name, preset, recipe_text, tw, seeds, table1, cells, missing, noise_rows(table1, cells), data)


def _roles(runs: list[RunRecord], by_id: dict[str, RunRecord]) -> dict[tuple[str, float], set[str]]:
    """(model, width) -> {"T", "S"}, from the runs themselves: a teacher is a run some run distils
    from (or one a grid planned as a teacher); a student alone is a run whose model and width some
    distillation run trains (or one a grid planned as a student)."""
    roles: dict[tuple[str, float], set[str]] = defaultdict(set)
    for r in runs:
        cfg = r.config
        if r.role == "teacher":
            roles[(cfg["model"], cfg["width"])].add("T")
        if r.role == "student" or (cfg.get("method") != "ce" and r.role != "assistant"):
            roles[(cfg["model"], cfg["width"])].add("S")
        teacher = by_id.get(str(cfg.get("teacher") or "").partition("@")[0])
        if teacher is not None and teacher.config.get("method") == "ce":
            roles[(teacher.config["model"], teacher.config["width"])].add("T")
    return roles


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


def _table1(infos: list[RunInfo], roles: dict[tuple[str, float], set[str]]) -> list[ModelRow]:
    groups: dict[tuple[str, float], list[RunInfo]] = defaultdict(list)
    for i in infos:
        groups[(i.model, i.width)].append(i)
    rows = [model_row(sorted(g, key=lambda i: i.seed), "/".join(sorted(roles.get(k, ()), reverse=True)) or DASH)
            for k, g in groups.items()]
    return sorted(rows, key=lambda r: (family_rank(r.model_name), "T" not in r.role, -r.width))


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
    """Runs planned or started but not finished (a grid records its whole plan before training)."""
    def status(r: RunRecord) -> str:
        return r.status if r.status != "done" else "done without an accuracy"

    return [Missing("unfinished", i.what, i.seed, status(i.record), i.record.run_id, i.record.error)
            for i in infos if i.record.status != "done" or i.record.final_acc is None]


def _diverged(infos: list[RunInfo]) -> list[Missing]:
    return [Missing("diverged", i.what, i.seed, verdict(i.record), i.record.run_id)
            for i in infos if i.record.status == "done" and is_diverged(verdict(i.record))]


def _unknown_teachers(infos: list[RunInfo]) -> list[Missing]:
    status = "teacher run not in this store: no teacher size, so no compression"
    return [Missing("teacher", i.what, i.seed, status, i.record.run_id)
            for i in infos if i.teacher and i.teacher.startswith("run:")]
