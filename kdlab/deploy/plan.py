"""What `kdlab compress` will make for a run, and how much of it is made (for `grid --compress --dry-run`).

Read only: each step's run is found as `compress` finds it, never made: an ONNX run by the id its
source and settings give, a pruning recovery or a QAT run by its parent and settings. Under
`qat=auto`, whether QAT follows an int8 model is known only once that model's accuracy is.
"""

from __future__ import annotations

import math
from typing import Any

from kdlab.deploy.export import export_settings
from kdlab.deploy.quantize import int8_settings
from kdlab.deploy.runs import RECOVERY_LR, deploy_id, lineage, recovery_defaults
from kdlab.store import RunRecord

QAT_THRESHOLD = 1.0  # points of top-1 an int8 model may lose before QAT is tried

Steps = list[tuple[str, RunRecord | None]]


def planned_steps(by_id: dict[str, RunRecord], record: RunRecord, spec: Any) -> tuple[Steps, bool]:
    """(what, its finished run or None) for every model `compress` would make for `record` under the
    CompressSpec `spec`, in its order; and whether more may follow (QAT under qat=auto, undecided)."""

    default_epochs, default_lr = recovery_defaults(lineage(record, by_id)[-1].config)
    epochs, lr = spec.epochs or default_epochs, spec.lr or default_lr
    steps: Steps = []
    undecided = False

    def done(run_id: str) -> RunRecord | None:
        found = by_id.get(run_id)
        return found if found is not None and found.status == "done" else None

    def export(run: RunRecord | None, what: str) -> RunRecord | None:
        found = done(deploy_id(run.run_id, export_settings(spec.opset))) if run is not None else None
        steps.append((f"{what} fp32", found))
        return found

    def int8(run: RunRecord | None, what: str) -> RunRecord | None:
        found = done(deploy_id(run.run_id, int8_settings(spec.opset, spec.calibration))) if run is not None else None
        steps.append((f"{what} int8", found))
        return found

    def quantize(run: RunRecord | None, fp32: RunRecord | None, what: str) -> None:
        nonlocal undecided
        q = int8(run, what)
        if spec.qat == "never":
            return
        if spec.qat == "auto":
            if q is None or fp32 is None:
                undecided = True
                return
            if fp32.final_acc - q.final_acc <= QAT_THRESHOLD:
                return
        tuned = _qat(by_id, run, epochs, lr * RECOVERY_LR) if run is not None else None
        steps.append((f"{what} qat (trained)", tuned))
        export(tuned, f"{what} qat")
        int8(tuned, f"{what} qat")

    teacher = by_id.get(str(record.config.get("teacher") or ""))
    if teacher is not None and teacher.status == "done" and "deploy" not in teacher.config:
        export(teacher, "teacher")
    fp32 = export(record, "student")
    if spec.int8:
        quantize(record, fp32, "student")
    if spec.prune is not None:
        pruned = _recovery(by_id, record, spec, epochs, lr)
        steps.append(("pruned (trained)", pruned))
        pruned_fp32 = export(pruned, "pruned")
        if spec.int8:
            quantize(pruned, pruned_fp32, "pruned")
    return steps, undecided


def _newest(by_id: dict[str, RunRecord], match: Any) -> RunRecord | None:
    found = [r for r in by_id.values() if r.status == "done" and "deploy" not in r.config and match(r.config)]
    return found[-1] if found else None


def _recovery(by_id: dict[str, RunRecord], parent: RunRecord, spec: Any, epochs: int, lr: float) -> RunRecord | None:
    """The finished pruning recovery of `parent` with these settings, if there is one."""
    model = f"pruned:{parent.config['model'].removeprefix('pruned:')}"

    def match(cfg: dict[str, Any]) -> bool:
        args = cfg.get("model_args") or {}
        return (cfg.get("model") == model and args.get("parent") == parent.run_id and args.get("ratio") == spec.prune
                and args.get("criterion") == spec.criterion and cfg.get("epochs") == epochs
                and math.isclose(float(cfg.get("lr", 0)), lr, rel_tol=1e-9))

    return _newest(by_id, match)


def _qat(by_id: dict[str, RunRecord], source: RunRecord, epochs: int, lr: float) -> RunRecord | None:
    """The finished quantization-aware copy of `source` with these settings, if there is one."""
    return _newest(by_id, lambda cfg: cfg.get("method") == "qat" and cfg.get("teacher") == source.run_id
                   and cfg.get("epochs") == epochs and math.isclose(float(cfg.get("lr", 0)), lr, rel_tol=1e-9))


def progress_text(by_id: dict[str, RunRecord], run_id: str, spec: Any,
                  config: dict[str, Any] | None = None) -> tuple[str, str]:
    """(the settings as they come to for the run, how much is made) for a `grid --dry-run` line; `config`
    is the planned run's, for a run not trained yet."""

    record = by_id.get(run_id)
    if record is None or record.status != "done":
        if config is None:
            return spec.describe(), "waits for its run"
        return spec.describe(*recovery_defaults(config)), "waits for its run"
    settings = spec.describe(*recovery_defaults(lineage(record, by_id)[-1].config))
    steps, undecided = planned_steps(by_id, record, spec)
    made = sum(run is not None for _, run in steps)
    text = f"{made} of {len(steps)} steps made"
    if undecided:
        text += ", then QAT if int8 loses more than 1 point"
    elif made == len(steps):
        text += ": done"
    return settings, text
