"""TensorBoard: event files under ``RUNS_DIR/tb/<label>.<run id>/``, so that
``tensorboard --logdir RUNS_DIR`` shows every run of a grid side by side.

On by default when the ``tensorboard`` package is installed (``pip install 'kdlab[tb]'``); off
with ``--set tensorboard=false``. Per epoch: ``train/loss``, ``train/acc``, ``test/loss``,
``test/acc``, ``lr``, ``time/epoch_s`` and each loss term as ``terms/<name>``; the config as text
at the start; at the end the report as text and the hyperparameters with the final accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.loggers.base import Logger, RunStart, available, flat_params, register_logger, run_summary

if TYPE_CHECKING:
    from kdlab.config import Config
    from kdlab.store import RunRecord

_SCALARS = (("train_loss", "train/loss"), ("train_acc", "train/acc"), ("test_loss", "test/loss"),
            ("test_acc", "test/acc"), ("lr", "lr"), ("time_s", "time/epoch_s"))


@register_logger
class TensorBoardLogger(Logger):
    """Per-epoch scalars, the config and the report in TensorBoard event files."""

    name = "tensorboard"
    package = "tensorboard"
    extra = "tb"

    @classmethod
    def wanted(cls, cfg: Config) -> bool:
        return cfg.tensorboard and available(cls.package)

    def __init__(self, run: RunStart):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(run)
        self.log_dir = run.runs_dir / "tb" / run.folder_name
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        header = f"run `{run.run_id}` ({run.label}), teacher `{run.teacher or '-'}`\n\n"
        self.writer.add_text("config", header + "```\n" + json.dumps(run.config, indent=2, sort_keys=True) + "\n```")

    def epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        for key, tag in _SCALARS:
            if metrics.get(key) is not None:
                self.writer.add_scalar(tag, metrics[key], epoch)
        for term, value in metrics.get("terms", {}).items():
            self.writer.add_scalar(f"terms/{term}", value, epoch)
        self.writer.flush()

    def finish(self, record: RunRecord, artefacts: dict[str, Path]) -> None:
        self.writer.add_text("report", run_summary(record), record.epochs_done)
        # run_name "." keeps the hyperparameters beside the scalars instead of in a new sub-run.
        self.writer.add_hparams(flat_params(record.config), {"hparam/final_acc": record.final_acc,
                                                             "hparam/best_acc": record.best_acc}, run_name=".")

    def close(self) -> None:
        self.writer.close()
