"""Checks that a run's data is what it claims: the teacher's data against the student's, and the
data on disk against what a run was planned with. Plain functions of configs and datasets."""

from __future__ import annotations

from typing import Any

from kdlab.data.datasets import Dataset
from kdlab.errors import UserError, warn


def describe_data(info: dict[str, Any], fingerprint: str | None) -> str:
    """'digits (8x8 px, 10 classes, 1,437 train / 360 test images, fingerprint 3f2a9c0d)'."""
    if not info:
        return "data kdlab did not fingerprint (a run from before kdlab recorded it)"
    h, w = info["image_size"]
    return (f"{info['name']} ({h}x{w} px, {info['classes']} classes, {info['train']:,} train / "
            f"{info['test']:,} test images, fingerprint {(fingerprint or '?')[:8]})")


def check_teacher_data(teacher: dict[str, Any] | None, student: Any, allow_other_data: bool) -> None:
    """Refuse (one line) a teacher trained on other data than the student's, or on images of another
    size, unless `allow_other_data`. `teacher` is the teacher run's config (None for a bare state
    dict, whose data nobody recorded); `student` is the student's bound Config."""
    if teacher is None:
        return
    if not teacher.get("data_fingerprint"):
        warn(f"the teacher's run predates dataset fingerprints (dataset {teacher.get('dataset')!r}): kdlab "
             "cannot check that it was trained on the student's data")
        return
    if teacher["data_fingerprint"] == student.data_fingerprint or allow_other_data:
        return
    t_info, s_info = teacher.get("data_info") or {}, student.data_info
    what = "other data"
    if t_info.get("image_size") and t_info["image_size"] != s_info.get("image_size"):
        what = "images of another size"
    raise UserError(f"the teacher was trained on {what}: {describe_data(t_info, teacher['data_fingerprint'])}, "
                    f"the student would train on {describe_data(s_info, student.data_fingerprint)}; distill on "
                    "the teacher's data, or pass --allow-other-data if this is what you mean")


def check_unchanged(dataset: Dataset, cfg: Any) -> None:
    """The data loaded for a run must be the data its identity was computed from: files changed
    between planning and training would otherwise be recorded under the old fingerprint."""
    if cfg.data_fingerprint and dataset.fingerprint != cfg.data_fingerprint:
        raise UserError(f"dataset {cfg.dataset} changed while kdlab was running (fingerprint "
                        f"{cfg.data_fingerprint[:8]} when planned, {dataset.fingerprint[:8]} now): run the "
                        "command again")
