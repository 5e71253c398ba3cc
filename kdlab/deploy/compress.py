"""`kdlab compress` and `kdlab grid --compress`: a trained run to deployable models, step by step.

For a run R (usually a distilled student), in order, each step a run of the store:

1. its teacher's and its own fp32 ONNX exports (the references: accuracy, size, latency);
2. with int8: R quantized (post-training, static QDQ);
3. with prune=RATIO: R pruned and recovered by KD (a training run), its fp32 export, and with
   int8 its int8 model.

After each int8 model: if it lost more than `QAT_THRESHOLD` points against the fp32 model it was
made from (both measured in ONNX Runtime), quantization-aware fine-tuning with KD from that fp32
model (`qat=auto`, the default; `always` or `never` also), then that model quantized.

Every step returns at once when its run is finished already, resumes when it was interrupted, and
is left to another process that holds it (`kdlab grid --workers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdlab.deploy.export import DEFAULT_OPSET, check_opset, export_run
from kdlab.deploy.plan import QAT_THRESHOLD, progress_text
from kdlab.deploy.prune import (
    CRITERIA,
    check_prunable,
    check_ratio,
    check_trained,
    prune_run,
    resolve_teacher,
)
from kdlab.deploy.quantize import DEFAULT_CALIBRATION, int8_run, qat_run
from kdlab.deploy.runs import RECOVERY_LR, derived_config, lineage, recovery_defaults
from kdlab.deploy.runtime import calibration_loader, dataset_of
from kdlab.errors import RunBusy, UserError
from kdlab.store import RunRecord, Store

QAT_MODES = ("auto", "always", "never")


@dataclass
class CompressSpec:
    """What to do to a run: the options of `kdlab compress` (and of `grid --compress`)."""

    prune: float | None = None
    criterion: str = "l1"
    int8: bool = False
    epochs: int | None = None  # recovery and QAT epochs (default: a tenth of the original run's)
    lr: float | None = None  # recovery lr (default: a tenth of the original run's); QAT at a tenth of it
    calibration: int = DEFAULT_CALIBRATION
    qat: str = "auto"
    opset: int = DEFAULT_OPSET
    teacher: str | None = None  # recovery teacher (default: the run's own teacher, else the run itself)
    overrides: dict[str, Any] = field(default_factory=dict)  # settings of the fine-tuning runs (--set)
    given: frozenset[str] = frozenset()  # the settings the user gave: one that would change nothing is refused
    grid: bool = False  # written as `grid --compress KEY=VALUE,...`: errors name the settings that way

    def _name(self, key: str, value: Any) -> str:
        return f"--compress {key}={value}: {key}" if self.grid else f"--{key}"

    def check(self) -> None:
        """Refuse bad settings, and settings that would be dropped, before anything is done."""
        if self.prune is None and not self.int8:
            raise UserError("nothing to do: give --prune RATIO and/or --quantize int8 (grid: --compress "
                            "prune=0.5,int8)")
        unused = ([k for k in ("criterion",) if self.prune is None and k in self.given]
                  + [k for k in ("calibration", "qat") if not self.int8 and k in self.given])
        if unused:
            needs = "int8" if unused[0] in ("calibration", "qat") else "prune=RATIO"
            flag = needs if self.grid else {"int8": "--quantize int8", "prune=RATIO": "--prune RATIO"}[needs]
            raise UserError(f"{' and '.join(unused)} would change nothing: {unused[0]} is a setting of "
                            f"{'int8 models' if needs == 'int8' else 'pruning'}; add {flag}")
        tuned = [k for k in ("epochs", "lr") if k in self.given]
        if tuned and self.prune is None and not (self.int8 and self.qat != "never"):
            raise UserError(f"{' and '.join(tuned)} would change nothing: they are the fine-tuning's (pruning "
                            "recovery, QAT), and nothing is fine-tuned here")
        if self.prune is not None:
            check_ratio(self.prune)
        if self.criterion not in CRITERIA:
            raise UserError(f"unknown pruning criterion {self.criterion!r}: choose one of {', '.join(CRITERIA)}")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"{self._name('epochs', self.epochs)} must be >= 1, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"{self._name('lr', self.lr)} must be > 0, got {self.lr}")
        if self.calibration < 1:
            raise UserError(f"{self._name('calibration', self.calibration)} must be >= 1, got {self.calibration}")
        if self.qat not in QAT_MODES:
            raise UserError(f"{self._name('qat', self.qat)} must be one of {', '.join(QAT_MODES)}, got {self.qat!r}")
        check_opset(self.opset)

    def describe(self, epochs: int | None = None, lr: float | None = None) -> str:
        """Every setting that applies, defaults included (`epochs`, `lr`: what they come to for the run)."""
        tuned = self.prune is not None or (self.int8 and self.qat != "never")
        epochs, lr = self.epochs or epochs, self.lr or lr
        parts = [f"prune={self.prune:g}", f"criterion={self.criterion}"] if self.prune is not None else []
        if tuned:
            parts += [f"epochs={epochs if epochs else 'auto'}", f"lr={lr:g}" if lr else "lr=auto"]
        if self.int8:
            parts += ["int8", f"calibration={self.calibration}", f"qat={self.qat}"]
        return ",".join([*parts, f"opset={self.opset}"])


_KEYS = {"prune": float, "criterion": str, "epochs": int, "lr": float, "calibration": int, "qat": str, "opset": int}


def parse_compress(text: str) -> CompressSpec:
    """`prune=0.5,int8` (and criterion=, epochs=, lr=, calibration=, qat=, opset=) as a CompressSpec."""
    spec = CompressSpec(grid=True)
    given = set()
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key, sep, value = item.partition("=")
        if item == "int8":
            spec.int8 = True
            continue
        if not sep or key not in _KEYS:
            raise UserError(f"--compress takes int8 and KEY=VALUE items ({', '.join(_KEYS)}), got {item!r}")
        parsed = yaml.safe_load(value)
        kind = _KEYS[key]
        if kind is float and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)
        if not isinstance(parsed, kind) or isinstance(parsed, bool):
            raise UserError(f"--compress {key} must be {kind.__name__}, got {value!r}")
        setattr(spec, key, parsed)
        given.add(key)
    spec.given = frozenset(given)
    spec.check()
    return spec


@dataclass
class Step:
    """One model made by `compress`: what it is and its run."""

    what: str
    record: RunRecord


def compress(store: Store, record: RunRecord, spec: CompressSpec, *, data_dir: str | None = None,
             quiet: bool = True, silent: bool = False, log: Callable[[str], None] = lambda _: None) -> list[Step]:
    """Every step of `spec` for the finished run `record`; returns the models made (or found)."""
    spec.check()
    check_trained(record)
    if spec.prune is not None:
        check_prunable(record)
    if spec.int8:
        calibration_loader(record.config, dataset_of(record.config, data_dir), spec.calibration)  # count check
    if spec.overrides:  # the fine-tuning runs are this run's config with these: a bad one fails here, not later
        derived_config(record, {}, spec.overrides, data_dir)
    if spec.prune is not None and spec.teacher:
        resolve_teacher(store, record, spec.teacher)
    default_epochs, default_lr = recovery_defaults(lineage(record, {r.run_id: r for r in store.runs()})[-1].config)
    epochs, lr = spec.epochs or default_epochs, spec.lr or default_lr
    train = {"quiet": quiet, "silent": silent, "data_dir": data_dir, "overrides": spec.overrides}
    steps: list[Step] = []

    def export(run: RunRecord, what: str) -> RunRecord:
        log(f"export {what}: {run.run_id[:8]}")
        out = export_run(store, run, spec.opset, data_dir=data_dir)
        steps.append(Step(f"{what} fp32", out))
        return out

    def quantize(run: RunRecord, fp32: RunRecord, what: str) -> None:
        log(f"int8 {what}: {run.run_id[:8]}")
        q = int8_run(store, run, fp32, spec.calibration, data_dir=data_dir)
        steps.append(Step(f"{what} int8", q))
        loss = fp32.final_acc - q.final_acc
        if spec.qat == "always" or (spec.qat == "auto" and loss > QAT_THRESHOLD):
            log(f"qat {what}: int8 lost {loss:.2f} points; quantization-aware KD for {epochs} epochs")
            tuned = _finished(qat_run(store, run, epochs=epochs, lr=lr * RECOVERY_LR, **train))
            steps.append(Step(f"{what} qat (trained)", tuned))
            q = int8_run(store, tuned, export(tuned, f"{what} qat"), spec.calibration, data_dir=data_dir)
            steps.append(Step(f"{what} qat int8", q))

    teacher = store.get(str(record.config.get("teacher") or ""))
    if teacher is not None and teacher.status == "done" and "deploy" not in teacher.config:
        export(teacher, "teacher")
    fp32 = export(record, "student")
    if spec.int8:
        quantize(record, fp32, "student")
    if spec.prune is not None:
        log(f"prune {spec.prune:g} ({spec.criterion}) and recover with KD for {epochs} epochs: {record.run_id[:8]}")
        pruned = _finished(prune_run(store, record, spec.prune, spec.criterion, epochs=epochs, lr=lr,
                                     teacher=spec.teacher, **train))
        steps.append(Step("pruned (trained)", pruned))
        pruned_fp32 = export(pruned, "pruned")
        if spec.int8:
            quantize(pruned, pruned_fp32, "pruned")
    return steps


def _finished(run: RunRecord) -> RunRecord:
    """A fine-tuning run that failed (a loss that became NaN) stops the steps that need it."""
    if run.status != "done":
        raise UserError(f"fine-tuning run {run.run_id} ({run.config['method']}) failed: {run.error}")
    return run


def format_steps(steps: Sequence[Step], root: Path) -> str:
    """The models `compress` made, one line each, with what the deployment table shows."""
    from kdlab.deploy.latency import load_latency
    from kdlab.deploy.runs import deploy_info

    reference = next((s.record.final_acc for s in steps if s.what == "student fp32"), None)
    lines = [f"{'model':<24} {'run':<16} {'acc %':>7} {'vs stud.':>8} {'MB':>8} {'MFLOPs':>9} {'ms b1':>8}"]
    for s in steps:
        info = deploy_info(root, s.record.run_id)
        b1 = next((e["median_ms"] for e in load_latency(root, s.record.run_id)
                   if e["runtime"] == "onnxruntime" and e["batch"] == 1 and e["threads"] == 1), None)
        delta = "" if reference is None or "deploy" not in s.record.config else f"{s.record.final_acc - reference:+.2f}"
        size = f"{info['size_bytes'] / 1e6:.3f}" if "size_bytes" in info else ""
        flops = f"{info['flops'] / 1e6:.1f}" if info.get("flops") else ""
        lines.append(f"{s.what:<24} {s.record.run_id:<16} {s.record.final_acc:>7.2f} {delta:>8} {size:>8} "
                     f"{flops:>9} {'' if b1 is None else f'{b1:.3f}':>8}".rstrip())
    lines.append("acc: ONNX Runtime on the test set for ONNX models, PyTorch for trained runs; vs stud.: points "
                 "against the student's fp32 ONNX model; ms b1: ONNX Runtime, batch 1, one thread")
    return "\n".join(lines)


# ---- in the grid ------------------------------------------------------------------------------


def grid_targets(planned: Sequence[Any]) -> list[Any]:
    """The planned runs `grid --compress` compresses: every distilled student."""
    return [r for r in planned if r.role == "distill"]


def plan_lines(planned: Sequence[Any], spec: CompressSpec, store: Store | None) -> list[str]:
    """`grid --dry-run` lines for the compress steps: every setting (defaults as they come to for the run)
    and how many of the steps are made."""
    by_id = {r.run_id: r for r in store.runs()} if store is not None else {}
    lines = []
    for r in grid_targets(planned):
        cfg = getattr(r, "cfg", None)
        settings, state = progress_text(by_id, r.run_id, spec, cfg.to_dict() if cfg is not None else None)
        lines.append(f"{'':16}  {'after':<8} {'compress':<8} {r.label} ({settings}): {state}")
    return lines


def compress_grid(planned: Sequence[Any], runs_dir: Path, spec: CompressSpec, *, quiet: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, int]:
    """After the grid has trained: compress every distilled student that finished. Steps another process
    holds are left to it; one student's failure does not stop the others."""
    counts = {"compressed": 0, "compress failed": 0}
    store = Store(runs_dir, create=False)
    try:
        for r in grid_targets(planned):
            record = store.get(r.run_id)
            if record is None or record.status != "done":
                continue
            try:
                compress(store, record, spec, quiet=quiet, silent=True, log=lambda m, r=r: log(f"{m} ({r.label})"))
                counts["compressed"] += 1
            except RunBusy:
                log(f"compress {r.label}: another process is on it")
            except UserError as e:
                counts["compress failed"] += 1
                log(f"compress {r.label} failed: {e}")
    finally:
        store.close()
    return counts
