"""The paper's results as data: Patel & Obeid, "Knowledge Distillation (KD) Final Paper", Tables 1-3.

Two platforms, one run per cell: NCSU VCL (Ubuntu 22, a CUDA GPU; Table 2) and Google Colab (T4;
Table 3). Names follow kdlab's display names: the teachers `vgg16`, `resnet18`, `densenet121` and
their half-width students `vgg16_half`, `resnet18_half`, `densenet121_half`.

Transcription notes (checked by tests/test_report.py and `inconsistent_gains`):
- Table 1 has Time columns for VCL and Colab but gives one time per row; it is recorded as the VCL
  time and the Colab time is None.
- The paper's "Acc Gain" is the KD accuracy minus the same platform's student accuracy from
  Table 1. That holds to the hundredth in 15 of the 18 cells. The exception is Table 3's
  resnet18_half row: its gains (+0.41, +0.42, +0.26) are 0.03 below Colab acc - 93.16 (+0.44,
  +0.45, +0.29), as if the Colab student had reached 93.19. The values are kept as printed.
- Compression is student Params / teacher Params of Table 1, printed with two digits (".4" for
  resnet18_half / densenet121 = 0.406).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FAMILIES = ("vgg16", "resnet18", "densenet121")
PLATFORMS = ("vcl", "colab")
SOURCE = "Patel & Obeid, Knowledge Distillation (KD) Final Paper, NCSU CSC591, Tables 1-3"


def parse_time(text: str) -> int:
    """Seconds in a time written as the paper does: "20m 19s" -> 1219, "104m 3s" -> 6243."""
    match = re.fullmatch(r"\s*(?:(\d+)h\s*)?(?:(\d+)m\s*)?(?:(\d+)s)?\s*", text)
    if not match or not any(match.groups()):
        raise ValueError(f"not a time like '20m 19s': {text!r}")
    h, m, s = (int(g) if g else 0 for g in match.groups())
    return 3600 * h + 60 * m + s


@dataclass(frozen=True)
class PaperModel:
    """One row of Table 1: a model trained without KD."""

    name: str  # display name: "vgg16" (teacher) or "vgg16_half" (student)
    family: str
    role: str  # "T" or "S"
    params: int
    acc_vcl: float
    acc_colab: float
    time_vcl_s: int
    time_colab_s: int | None = None  # not given in the paper

    def acc(self, platform: str) -> float:
        return self.acc_vcl if platform == "vcl" else self.acc_colab

    def time_s(self, platform: str) -> int | None:
        return self.time_vcl_s if platform == "vcl" else self.time_colab_s


@dataclass(frozen=True)
class PaperKD:
    """One cell of Table 2 (VCL) or Table 3 (Colab): a student distilled from a teacher."""

    platform: str
    student: str
    teacher: str
    acc: float
    time_s: int
    gain: float
    compression: float


def _t1(family: str, role: str, params: int, vcl: float, colab: float, time: str) -> PaperModel:
    name = family if role == "T" else f"{family}_half"
    return PaperModel(name, family, role, params, vcl, colab, parse_time(time))


TABLE1: tuple[PaperModel, ...] = (
    _t1("vgg16", "T", 15239872, 92.72, 93.4, "20m 19s"),
    _t1("vgg16", "S", 3811680, 91.52, 92.12, "17m 4s"),
    _t1("resnet18", "T", 11164352, 94.49, 94.36, "30m 4s"),
    _t1("resnet18", "S", 2792800, 93.31, 93.16, "19m 16s"),
    _t1("densenet121", "T", 6880448, 88.36, 88.30, "51m 48s"),
    _t1("densenet121", "S", 1725024, 86.46, 86.48, "50m 49s"),
)

# Tables 2 and 3 as printed, by student row; within a row the teachers are vgg16, resnet18, densenet121.
# Each entry: (acc, time, gain, compression).
_TABLE2 = {
    "vgg16_half": [(91.98, "17m 57s", +0.46, 0.25), (91.86, "19m 45s", +0.34, 0.34),
                   (91.55, "25m 29s", +0.03, 0.55)],
    "resnet18_half": [(93.48, "23m 15s", +0.17, 0.18), (93.61, "25m 44s", +0.30, 0.25),
                      (93.14, "30m 30s", -0.17, 0.4)],
    "densenet121_half": [(87.05, "53m 49s", +0.59, 0.11), (86.86, "53m 44s", +0.40, 0.15),
                         (86.79, "60m 55s", +0.33, 0.25)],
}
_TABLE3 = {
    "vgg16_half": [(91.63, "50m 22s", -0.49, 0.25), (91.87, "52m 35s", -0.25, 0.34),
                   (91.68, "61m 41s", -0.44, 0.55)],
    "resnet18_half": [(93.60, "59m 24s", +0.41, 0.18), (93.61, "65m 18s", +0.42, 0.25),
                      (93.45, "69m 22s", +0.26, 0.4)],
    "densenet121_half": [(86.56, "86m 28s", +0.08, 0.11), (86.34, "89m 56s", -0.14, 0.15),
                         (86.31, "104m 3s", -0.17, 0.25)],
}


_Row = list[tuple[float, str, float, float]]


def _kd_table(platform: str, rows: dict[str, _Row]) -> dict[tuple[str, str], PaperKD]:
    return {
        (student, teacher): PaperKD(platform, student, teacher, acc, parse_time(time), gain, comp)
        for student, cells in rows.items()
        for teacher, (acc, time, gain, comp) in zip(FAMILIES, cells, strict=True)
    }


TABLE2 = _kd_table("vcl", _TABLE2)  # (student, teacher) -> cell, NCSU VCL
TABLE3 = _kd_table("colab", _TABLE3)  # Google Colab

# The paper's own summary sentences, for checks: average gain per platform.
AVERAGE_GAIN = {"vcl": 0.27, "colab": -0.04}


def table1(name: str) -> PaperModel | None:
    """Table 1's row for a display name ("resnet18", "resnet18_half"), or None if the paper has none."""
    return next((row for row in TABLE1 if row.name == name), None)


def kd_cell(student: str, teacher: str, platform: str) -> PaperKD | None:
    """A KD cell of Table 2 (platform "vcl") or Table 3 ("colab"), or None if the paper has none."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    return (TABLE2 if platform == "vcl" else TABLE3).get((student, teacher))


def inconsistent_gains(tolerance: float = 0.005) -> list[PaperKD]:
    """Cells whose printed gain differs from acc minus the same platform's Table 1 student accuracy."""
    out = []
    for table in (TABLE2, TABLE3):
        for cell in table.values():
            student = table1(cell.student)
            if student is not None and abs(cell.acc - student.acc(cell.platform) - cell.gain) > tolerance:
                out.append(cell)
    return out
