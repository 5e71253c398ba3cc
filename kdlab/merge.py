"""Results from many machines in one place: a report over several runs dirs, and `kdlab merge`.

A run's id is the hash of its config, so the same id in two runs dirs is the same experiment,
trained twice (seeds split across GPUs, a study split across a cluster's allocations, a run
finished on another day). What the runs gave, their *result*, is the status, the final and best
accuracies and every epoch's losses and accuracies, compared exactly; times, device and library
versions say where and how fast a run trained, not what it gave. Across the sources, in order:

- same id, same result: one run (the first source's copy);
- same id, finished in some sources only: the first finished copy (the others were interrupted);
- same id, finished with different results: a *conflict*, reported; the first finished copy is
  kept, and nothing already in the destination is overwritten by a different result;
- an id in one source only: *unmatched*, listed by source.

A conflict names what differs (the field, and both values with the digits it takes to tell them
apart). A copied run brings its files along: checkpoint and snapshots, its run card (the Markdown
summary beside the checkpoint), its TensorBoard folder and what the deploy layer keeps for it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.deploy.files import file_problem, problem_line
from kdlab.deploy.runs import copy_run_files
from kdlab.errors import UserError
from kdlab.store import RunRecord, Store

if TYPE_CHECKING:
    from kdlab.reporting import Report


@dataclass
class Conflict:
    """One run id finished with different results in several sources."""

    run_id: str
    what: str
    kept: tuple[str, float | None]  # (source, final accuracy) of the copy kept
    others: list[tuple[str, float | None]]  # the differing copies
    differences: list[list[str]] = field(default_factory=list)  # per differing copy: what differs from the kept


@dataclass
class Combined:
    """Several stores' runs as one: each id once, with what could not be made one."""

    sources: list[str]
    records: dict[str, tuple[int, RunRecord]] = field(default_factory=dict)  # id -> (source index, copy kept)
    conflicts: list[Conflict] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)  # ids in several sources, no conflict
    unmatched: dict[str, list[RunRecord]] = field(default_factory=dict)  # source -> its runs no other has


RESULT_FIELDS = ("status", "final_acc", "best_acc", "best_epoch")  # a run's own fields that are its result
EPOCH_FIELDS = ("train_loss", "train_acc", "test_loss", "test_acc")  # and each epoch's
SHOWN_DIFFERENCES = 3  # in a conflict's line; the rest are counted


def result(r: RunRecord) -> tuple[Any, ...]:
    """What a run gave, for comparing two copies of it."""
    epochs = tuple(tuple(e[name] for name in EPOCH_FIELDS) for e in r.history)
    return (*(getattr(r, name) for name in RESULT_FIELDS), epochs)


def differences(kept: RunRecord, other: RunRecord) -> list[str]:
    """What differs between two copies' results, each as 'FIELD KEPT vs OTHER' ('epoch E FIELD ...' for
    an epoch's value), in the order `result` compares them."""
    out = [f"{name} {_pair(getattr(kept, name), getattr(other, name))}" for name in RESULT_FIELDS
           if getattr(kept, name) != getattr(other, name)]
    if len(kept.history) != len(other.history):
        out.append(f"epochs recorded {len(kept.history)} vs {len(other.history)}")
    for a, b in zip(kept.history, other.history, strict=False):
        out += [f"epoch {a['epoch']} {name} {_pair(a[name], b[name])}" for name in EPOCH_FIELDS if a[name] != b[name]]
    return out


def _pair(x: Any, y: Any) -> str:
    """Two values that differ, numbers with as many digits as it takes to see that they do."""
    if isinstance(x, float) and isinstance(y, float):
        for digits in (4, 6, 8, 10, 12, 14, 17):
            a, b = f"{x:.{digits}g}", f"{y:.{digits}g}"
            if a != b:
                return f"{a} vs {b}"
    return f"{x} vs {y}"


def describe(r: RunRecord) -> str:
    """A run in a few words: its grid label, or its model, method and seed."""
    cfg = r.config
    return r.label or f"{cfg['model']}@{cfg['width']:g} {cfg['method']} s{cfg['seed']}"


def combine(stores: Sequence[Store]) -> Combined:
    """Every run of `stores`, each id once, chosen as the module's docstring says."""
    sources = [str(s.root) for s in stores]
    copies: dict[str, list[tuple[int, RunRecord]]] = {}
    for i, store in enumerate(stores):
        for r in store.runs():
            copies.setdefault(r.run_id, []).append((i, r))
    out = Combined(sources, unmatched={s: [] for s in sources})
    for run_id, found in copies.items():
        finished = [c for c in found if c[1].status == "done"]
        kept = finished[0] if finished else found[0]
        out.records[run_id] = kept
        differing = [c for c in finished if result(c[1]) != result(kept[1])]
        if differing:
            out.conflicts.append(Conflict(run_id, describe(kept[1]), (sources[kept[0]], kept[1].final_acc),
                                          [(sources[i], r.final_acc) for i, r in differing],
                                          [differences(kept[1], r) for _, r in differing]))
        elif len(found) > 1:
            out.shared.append(run_id)
        if len(found) == 1:
            out.unmatched[sources[kept[0]]].append(kept[1])
    return out


def conflict_line(c: Conflict) -> str:
    """One line: the run, the copy kept, and each differing copy with what differs (kept vs that copy)."""
    others = ", ".join(f"{_acc(acc)} in {src}{_what_differs(diff)}"
                       for (src, acc), diff in zip(c.others, c.differences or [[]] * len(c.others), strict=True))
    return (f"Conflict: run {c.run_id} ({c.what}) finished with different results: kept {_acc(c.kept[1])} from "
            f"{c.kept[0]}; differs: {others}")


def unmatched_lines(combined: Combined) -> list[str]:
    return [f"Only in {src} ({len(runs)} runs): " + ", ".join(f"{r.run_id[:8]} {describe(r)}" for r in runs)
            for src, runs in combined.unmatched.items() if runs]


def _what_differs(diff: list[str]) -> str:
    if not diff:
        return ""
    more = len(diff) - SHOWN_DIFFERENCES
    return f" ({'; '.join(diff[:SHOWN_DIFFERENCES])}{f'; and {more} more' if more > 0 else ''})"


def _acc(acc: float | None) -> str:
    return "no accuracy" if acc is None else f"{acc:.2f}%"


def _open(runs_dirs: Sequence[str | Path]) -> list[Store]:
    resolved = [Path(d).expanduser().resolve() for d in runs_dirs]
    if len(set(resolved)) < len(resolved):
        raise UserError("the same runs dir is given twice")
    stores: list[Store] = []
    try:
        for d in runs_dirs:
            stores.append(Store(d, readonly=True))  # reading only: a read-only runs dir is fine
    except UserError:
        for s in stores:
            s.close()
        raise
    return stores


# ---- a report over several runs dirs -----------------------------------------------------------


class CombinedRuns:
    """Several stores read as one by `kdlab.reporting.build_report` (which calls `runs()`)."""

    def __init__(self, combined: Combined):
        self.combined = combined
        self.root = self.path = " + ".join(combined.sources)

    def runs(self, status: str | None = None) -> list[RunRecord]:
        return [r for _, r in self.combined.records.values() if status is None or r.status == status]

    def notes(self) -> list[str]:
        """What the report's reader must know about the combination."""
        c = self.combined
        counts = ", ".join(f"{src} ({sum(i == k for i, _ in c.records.values())} runs kept)"
                           for k, src in enumerate(c.sources))
        lines = [f"Runs combined from {len(c.sources)} runs dirs: {counts}; {len(c.shared)} runs found in "
                 f"several count once; {len(c.conflicts)} conflicts."]
        return lines + [conflict_line(x) for x in c.conflicts] + unmatched_lines(c)


def report_over(runs_dirs: Sequence[str | Path], dataset: str | None = None, preset: str | None = None) -> Report:
    """The report of one runs dir, or of several combined (with notes on conflicts and unmatched runs)."""
    from kdlab.reporting import build_report

    stores = _open(runs_dirs)
    try:
        if len(stores) == 1:
            return build_report(stores[0], dataset=dataset, preset=preset)
        runs = CombinedRuns(combine(stores))
        report = build_report(runs, dataset=dataset, preset=preset)  # type: ignore[arg-type]
        report.notes += runs.notes()
        return report
    finally:
        for s in stores:
            s.close()


# ---- kdlab merge -------------------------------------------------------------------------------


@dataclass
class MergeResult:
    copied: list[str]  # run ids written into the destination
    combined: Combined
    busy: list[str]  # runs a live process is training in the destination: left alone


def merge(sources: Sequence[str | Path], into: str | Path, log: Callable[[str], Any] = print) -> MergeResult:
    """Copy the runs of `sources` (rows, epochs and checkpoint files) into the runs dir `into`.

    The destination comes first: a run it already holds is replaced only by a finished copy when
    its own is unfinished. Conflicts are kept as they are and reported.
    """
    if Path(into).expanduser().resolve() in {Path(s).expanduser().resolve() for s in sources}:
        raise UserError(f"{into} is both a source and the destination")
    srcs = _open(sources)  # every source is checked before the destination is created
    try:
        dst = Store(into)
    except UserError:
        for s in srcs:
            s.close()
        raise
    stores = [dst, *srcs]
    try:
        combined = combine(stores)
        copied, busy = [], []
        for run_id, (i, record) in combined.records.items():
            if i == 0:
                continue
            here = dst.get(run_id)
            if here is not None and here.status == "running":
                busy.append(run_id)
                continue
            dst.import_run(stores[i].export_run(run_id))
            _copy_checkpoints(stores[i].root, dst.root, run_id)
            _copy_tensorboard(stores[i].root, dst.root, run_id)
            copy_run_files(stores[i].root, dst.root, record)  # ONNX files, pruned weights (kdlab.deploy)
            copied.append(run_id)
        by_id = {run_id: record for run_id, (_, record) in combined.records.items()}
        damaged = [problem_line(by_id, by_id[r], p) for r in copied if "deploy" in by_id[r].config
                   and (p := file_problem(dst.root, by_id[r])) is not None]
    finally:
        for s in stores:
            s.close()
    out = MergeResult(copied, combined, busy)
    _say(out, into, log)
    for line in damaged:  # copied as they were: the run's results stand, its file is to be made again
        log(f"warning: {line}")
    return out


def _copy_checkpoints(src: Path, dst: Path, run_id: str) -> None:
    """The run's latest checkpoint, its snapshots (RUN@EPOCH) and its run card (RUN.md, the summary the
    loggers write beside the checkpoint), each written whole, then renamed."""
    folder = src / "checkpoints"
    for path in sorted([*folder.glob(f"{run_id}*.pt"), *folder.glob(f"{run_id}.md")]):
        target = dst / "checkpoints" / path.name
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)


def _tensorboard_folders(root: Path, run_id: str) -> list[Path]:
    """The run's TensorBoard folders under tb/: `<label>.<run id>`, or the id alone (kdlab.loggers)."""
    return sorted(p for p in (root / "tb").glob(f"*{run_id}")
                  if p.is_dir() and (p.name == run_id or p.name.endswith(f".{run_id}")))


def _copy_tensorboard(src: Path, dst: Path, run_id: str) -> None:
    """The copied run's TensorBoard event files, in place of any the destination had for that run (they
    were of the copy the merge replaced, not of this one)."""
    found = _tensorboard_folders(src, run_id)
    if not found:
        return
    for old in _tensorboard_folders(dst, run_id):
        shutil.rmtree(old)
    for folder in found:
        tmp = dst / "tb" / f".tmp-{os.getpid()}-{folder.name}"
        shutil.copytree(folder, tmp)
        os.replace(tmp, dst / "tb" / folder.name)


def _say(out: MergeResult, into: str | Path, log: Callable[[str], Any]) -> None:
    c = out.combined
    log(f"merged {', '.join(c.sources[1:])} into {into}: {len(out.copied)} runs copied, {len(c.shared)} found in "
        f"several, {len(c.conflicts)} conflicts")
    for x in c.conflicts:
        log(conflict_line(x))
    for run_id in out.busy:
        log(f"busy: run {run_id} is training in {into}; left as it is (merge again when it is done)")
    for line in unmatched_lines(c):
        log(line)
