"""What a report is made of: Table 1 rows, Tables 2-3 cells, missing runs, noise rows, studies.

Plain dataclasses, built by `build.py` from the runs store and rendered by the `to_*` modules;
nothing here reads the store or formats text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdlab.stats import PairedResult, Summary


@dataclass
class ModelRow:
    """A Table 1 row: one model trained without KD (ce), over its seeds."""

    family: str
    role: str  # "T" (teacher), "S" (student alone), "T/S" (both) or "—" (neither), from the runs
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
    flops: int | None = None  # per image at the data's size (kdlab.models.profile)


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
    """A run the study planned but cannot use: unfinished, diverged, without baseline, or a duplicate."""

    kind: str  # unfinished | diverged | baseline | teacher | duplicate
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

    dataset: str  # the data's name (with its fingerprint when two datasets share a name)
    preset: str
    recipe: str  # settings that differ from the preset ("" when none)
    teacher_width: float | None  # the width of the study's teachers; None when no run is a teacher
    seeds: list[int]
    table1: list[ModelRow]
    cells: list[Cell]
    missing: list[Missing]
    noise: list[NoiseRow]
    data: str = ""  # what the runs were trained on: name, image size, classes, counts, fingerprint

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
