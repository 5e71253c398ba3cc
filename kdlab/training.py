"""One resolved run against a runs directory: the config from preset, file and overrides, then
`execute`, which checks everything it can before it writes, and trains, resumes or returns the run.
Used by the API (train, distill) and by the deploy layer's fine-tuning runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kdlab.config import Config, load_yaml
from kdlab.configure import bind_dataset, build_config
from kdlab.data import DataIdentity, Dataset, dataset_for
from kdlab.data.checks import check_unchanged
from kdlab.data.residency import input_size
from kdlab.errors import warn
from kdlab.job import prepare_teacher
from kdlab.loggers.base import log_finished
from kdlab.loop import run as run_training
from kdlab.models import input_size_note
from kdlab.preflight import preflight
from kdlab.progress import live_session
from kdlab.store import RunRecord, Store, has_store, open_store, runs_dir_or_default


def resolve_config(preset: str, model: str, config: str | Path | None, overrides: dict[str, Any],
                   identity: DataIdentity | None = None) -> Config:
    """Preset, then the YAML file, then explicit overrides (None values mean 'not given'); then the
    dataset is identified by its content (`bind_dataset`; `identity` when already known), which the
    run's id covers."""
    file_values = load_yaml(config) if config else {}
    cfg = build_config(preset, model, file_values, {k: v for k, v in overrides.items() if v is not None})
    return bind_dataset(cfg, identity)


def execute(cfg: Config, runs_dir: str | Path | None, *, teacher_model: nn.Module | None = None,
            dataset: Dataset | None = None, quiet: bool = True, silent: bool = False,
            label: str | None = None) -> RunRecord:
    """Run a resolved config against a runs directory; a finished run returns at once."""
    runs = runs_dir_or_default(runs_dir)
    if has_store(runs):
        existing = open_store(runs)
        done = existing.get(cfg.run_hash())
        existing.close()
        if done is not None and done.status == "done":
            log_finished(cfg, done, label, runs)  # e.g. --mlflow on a run finished before: its stored record
            return done
    # Load the data and check the models before touching the database: a bad data dir, a teacher for
    # other classes or a model without the features its method needs must leave it unchanged.
    if dataset is None:
        dataset = dataset_for(cfg)
    check_unchanged(dataset, cfg)
    note = input_size_note(cfg.model, input_size(cfg, dataset.train.images.shape[1:3]))
    if note:
        warn(note)
    preflight(cfg, dataset, teacher_model)
    store = Store(runs)
    teacher = prepare_teacher(teacher_model, cfg, cfg.teacher) if teacher_model is not None else None
    try:
        with live_session():
            record = run_training(cfg, store, teacher=teacher, dataset=dataset, quiet=quiet, silent=silent,
                                  label=label)
    finally:
        store.close()
    return record
