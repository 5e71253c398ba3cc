"""What a logger is, and the one object the training loop calls.

The loop calls `RunLoggers` at four points: `start_loggers` when a run starts (its config, id,
label and teacher), `epoch` after each epoch (train/test loss and accuracy, the lr, each loss
term, seconds), `finish` when it is done (the stored result, the checkpoint and a short report)
and `close`. Each logger is one file with one `@register_logger` class, imported lazily with its
library. A logger that fails (server down, disk full) warns once on stderr and is dropped:
training goes on, and the runs database stays the source of truth.

Every logger names its numbers the same way (`epoch_scalars`, `final_scalars`): ``train/loss``,
``test/acc``, ``terms/ce``, ``final/acc``..., so a chart in TensorBoard and one in MLflow have one
name. A run that finished before and is asked for again with a logger that lacks it
(``--mlflow`` on a finished run) is logged from its stored record (`log_finished`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kdlab.errors import UserError

if TYPE_CHECKING:
    from kdlab.config import Config
    from kdlab.store import RunRecord, Store

LOGGERS: dict[str, type[Logger]] = {}


def register_logger(cls: type[Logger]) -> type[Logger]:
    """Class decorator: make a logger available under its ``name``."""
    if not cls.name or cls.name in LOGGERS:
        raise ValueError(f"logger {cls.name!r} is unnamed or registered twice")
    LOGGERS[cls.name] = cls
    return cls


def default_label(config: dict[str, Any]) -> str:
    """A label for a run started without one (``kdlab train``, ``kdlab distill``, the Python API), in
    the grid's style: ``resnet18@0.5 <- 1a2b3c4d kd s0``, so that a list of runs reads by what they are."""
    teacher = config.get("teacher")
    source = f" <- {str(teacher)[:8]}" if teacher else ""
    return f"{config['model']}@{config['width']:g}{source} {config['method']} s{config['seed']}"


@dataclass
class RunStart:
    """What a logger knows of its run from the start."""

    run_id: str
    label: str
    config: dict[str, Any]
    runs_dir: Path

    @property
    def teacher(self) -> str | None:
        return self.config.get("teacher")

    @property
    def folder_name(self) -> str:
        """``<label>.<run id>`` (or the id alone), safe as a file name: runs sort by label."""
        if self.label == self.run_id:
            return self.run_id
        return f"{re.sub(r'[^A-Za-z0-9@._=-]+', '_', self.label).strip('_')[:80]}.{self.run_id}"


class Logger:
    """Base class: subclasses set ``name``, ``package`` and ``extra`` and override what they log."""

    name: ClassVar[str] = ""
    package: ClassVar[str] = ""  # the module it needs
    extra: ClassVar[str] = ""  # the kdlab extra that installs it
    asked: ClassVar[bool] = False  # only on the user's request (--mlflow): say what happens to a finished run

    @classmethod
    def wanted(cls, cfg: Config) -> bool:
        """Whether this run logs here."""
        return False

    @classmethod
    def logged(cls, run: RunStart) -> str | None:
        """Where a run that finished before is logged here already (None: it is not, log it now)."""
        return None

    def __init__(self, run: RunStart):
        self.run = run

    def epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """One finished epoch (1-based): train_loss, train_acc, test_loss, test_acc, lr, time_s, terms."""

    def finish(self, record: RunRecord, artefacts: dict[str, Path]) -> None:
        """The run is done: its stored record and files to attach (checkpoint, report)."""

    def close(self) -> None:
        """Flush and release; called once, finished or not."""


def available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_available(name: str) -> None:
    """A logger the user asked for by name must be installed: say in one line how."""
    cls = LOGGERS[name]
    if not available(cls.package):
        raise UserError(f"logging to {name} needs the {cls.package} package: pip install 'kdlab[{cls.extra}]'")


class RunLoggers:
    """The loggers of one run, each behind a guard: the first failure warns once and drops it."""

    def __init__(self, loggers: list[Logger] | None = None):
        self.loggers = list(loggers or [])
        self._closed = False

    def epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        self._each("epoch", epoch, metrics)

    def finish(self, record: RunRecord, checkpoint: Path | None) -> None:
        if not self.loggers:
            return
        report = record.checkpoint and Path(record.checkpoint).with_suffix(".md")
        artefacts = {}
        if checkpoint is not None and checkpoint.exists():
            artefacts["checkpoint"] = checkpoint
        if report:
            try:
                report.write_text(run_summary(record))
                artefacts["report"] = report
            except Exception as e:  # noqa: BLE001 (the report is for the loggers: never fail the run)
                _warn("report", e)
        self._each("finish", record, artefacts)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._each("close")

    def _each(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as e:  # noqa: BLE001 (a logger must never fail the run)
                self.loggers.remove(logger)
                _warn(logger.name, e)
                if method != "close":
                    with contextlib.suppress(Exception):  # already warned about this logger
                        logger.close()


def _warn(name: str, e: BaseException) -> None:
    detail = str(e).splitlines()[0][:200] if str(e) else ""
    print(f"kdlab: warning: {name} logging failed ({type(e).__name__}: {detail}); training goes on without it, "
          "and the runs database keeps everything", file=sys.stderr)


def start_loggers(cfg: Config, run_id: str, label: str, store: Store) -> RunLoggers:
    """The loggers this run asked for, started (one that cannot start warns and is left out). In a
    run on several processes only the one that writes the store logs."""
    if not store.is_writer:
        return RunLoggers()
    # A run started without a label (kdlab train / distill, the Python API) is shown by what it is.
    run = RunStart(run_id, default_label(cfg.to_dict()) if label == run_id else label, cfg.to_dict(),
                   Path(store.root))
    loggers = []
    for cls in LOGGERS.values():
        if cls.wanted(cfg):
            loggers += start_one(cls, run).loggers
    return RunLoggers(loggers)


def log_finished(cfg: Config, record: RunRecord, label: str | None, runs_dir: Path) -> None:
    """A run that finished before, asked for again: log its stored epochs and result to each logger
    the config asks for that does not have it yet, and say so in one line (for a logger asked for by
    name, such as MLflow, also when it has the run already). Nothing here can fail the command."""
    if record.status != "done":
        return
    run = RunStart(record.run_id, label or default_label(record.config), cfg.to_dict(), Path(runs_dir))
    for cls in LOGGERS.values():
        if not cls.wanted(cfg):
            continue
        try:
            where = cls.logged(run)
        except Exception as e:  # noqa: BLE001 (a logger must never fail the command)
            _warn(cls.name, e)
            continue
        if where is not None:
            if cls.asked:
                _note(f"run {record.run_id} finished before and is in {cls.name} already ({where}): nothing to log")
            continue
        loggers = start_one(cls, run)
        for epoch in record.history:
            loggers.epoch(epoch["epoch"], epoch)
        loggers.finish(record, Path(record.checkpoint) if record.checkpoint else None)
        loggers.close()
        if loggers.loggers:  # still there: nothing failed
            _note(f"run {record.run_id} finished before: its {record.epochs_done} stored epochs and result are now "
                  f"logged to {cls.name}")


def start_one(cls: type[Logger], run: RunStart) -> RunLoggers:
    """One logger behind the guard (none when it cannot start: warned)."""
    try:
        return RunLoggers([cls(run)])
    except Exception as e:  # noqa: BLE001 (a logger must never fail the run)
        _warn(cls.name, e)
        return RunLoggers()


def _note(message: str) -> None:
    print(f"kdlab: {message}", file=sys.stderr)


def epoch_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """One epoch's numbers under the names every logger uses: ``train/loss``, ``train/acc``,
    ``test/loss``, ``test/acc``, ``lr``, ``time/epoch_s`` and ``terms/<term>`` for each loss term."""
    out = {tag: float(metrics[key]) for key, tag in _EPOCH_TAGS if metrics.get(key) is not None}
    out.update({f"terms/{term}": float(value) for term, value in (metrics.get("terms") or {}).items()})
    return out


def final_scalars(record: RunRecord) -> dict[str, float]:
    """A finished run's result under the names every logger uses: ``final/acc`` (last epoch),
    ``final/best_acc`` and ``final/wall_s``."""
    values = {"final/acc": record.final_acc, "final/best_acc": record.best_acc, "final/wall_s": record.wall_s}
    return {k: float(v) for k, v in values.items() if v is not None}


_EPOCH_TAGS = (("train_loss", "train/loss"), ("train_acc", "train/acc"), ("test_loss", "test/loss"),
               ("test_acc", "test/acc"), ("lr", "lr"), ("time_s", "time/epoch_s"))


def flat_params(config: dict[str, Any]) -> dict[str, str | float | int | bool]:
    """The config as flat scalar values (lists, dicts and None as text): hyperparameters for a UI."""
    return {k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in sorted(config.items())}


def run_summary(record: RunRecord) -> str:
    """A short Markdown report of one finished run: what it was, how it ended, its epochs."""
    cfg = record.config
    lines = [f"# kdlab run {record.run_id}", "",
             f"{cfg['model']} width {cfg['width']:g}, method {cfg['method']}, teacher {cfg.get('teacher') or '-'}, "
             f"dataset {cfg['dataset']}, seed {cfg['seed']}", "",
             f"Final test accuracy {_num(record.final_acc, '.2f')}% (last epoch; best {_num(record.best_acc, '.2f')}% "
             f"at epoch {record.best_epoch}), {record.epochs_done} epochs in {_num(record.wall_s, '.1f')}s on "
             f"{record.device}.", "",
             "| epoch | train loss | train acc | test loss | test acc | lr | s |", "|---|---|---|---|---|---|---|"]
    for e in record.history:
        cells = [_num(e.get(k), f) for k, f in (("train_loss", ".4f"), ("train_acc", ".2f"), ("test_loss", ".4f"),
                                                 ("test_acc", ".2f"), ("lr", ".4g"), ("time_s", ".1f"))]
        lines.append(f"| {e['epoch']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)
