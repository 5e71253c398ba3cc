"""TensorBoard: event files under ``RUNS_DIR/tb/<label>.<run id>/``, so that
``tensorboard --logdir RUNS_DIR`` shows every run of a grid side by side.

On by default when the ``tensorboard`` package is installed (``pip install 'kdlab[tb]'``); off
with ``--set tensorboard=false``. Per epoch: ``train/loss``, ``train/acc``, ``test/loss``,
``test/acc``, ``lr``, ``time/epoch_s`` and each loss term as ``terms/<name>`` (the names MLflow
gets too); the config as text at the start; at the end the report as text and the
hyperparameters with ``final/acc``, ``final/best_acc`` and ``final/wall_s``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.loggers.base import (
    Logger,
    RunStart,
    available,
    epoch_scalars,
    final_scalars,
    flat_params,
    register_logger,
    run_summary,
)

if TYPE_CHECKING:
    from kdlab.config import Config
    from kdlab.store import RunRecord

@register_logger
class TensorBoardLogger(Logger):
    """Per-epoch scalars, the config and the report in TensorBoard event files."""

    name = "tensorboard"
    package = "tensorboard"
    extra = "tb"

    @classmethod
    def wanted(cls, cfg: Config) -> bool:
        return cfg.tensorboard and available(cls.package)

    @classmethod
    def logged(cls, run: RunStart) -> str | None:
        # Its folder under any label (a grid's, or the one a plain command gets), or by id alone as before.
        found = [p for p in (run.runs_dir / "tb").glob(f"*{run.run_id}")
                 if p.name == run.run_id or p.name.endswith(f".{run.run_id}")]
        return str(found[0]) if found else None

    def __init__(self, run: RunStart):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(run)
        self.log_dir = run.runs_dir / "tb" / run.folder_name
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        header = f"run `{run.run_id}` ({run.label}), teacher `{run.teacher or '-'}`\n\n"
        self.writer.add_text("config", header + "```\n" + json.dumps(run.config, indent=2, sort_keys=True) + "\n```")

    def epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        for tag, value in epoch_scalars(metrics).items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def finish(self, record: RunRecord, artefacts: dict[str, Path]) -> None:
        self.writer.add_text("report", run_summary(record), record.epochs_done)
        # run_name "." keeps the hyperparameters beside the scalars instead of in a new sub-run.
        self.writer.add_hparams(flat_params(record.config), final_scalars(record), run_name=".")

    def close(self) -> None:
        self.writer.close()
