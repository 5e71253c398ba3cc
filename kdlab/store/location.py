"""Where runs are kept by default, and opening a runs directory to read it."""

from __future__ import annotations

import os
from pathlib import Path

from kdlab.store.database import DB_NAME, Store


def default_runs_dir() -> Path:
    """$KDLAB_RUNS_DIR if set, else ./runs."""
    return Path(os.environ.get("KDLAB_RUNS_DIR", "runs"))


def runs_dir_or_default(runs_dir: str | Path | None) -> Path:
    """`runs_dir` as a path, or the default runs directory when None."""
    return Path(runs_dir) if runs_dir else default_runs_dir()


def has_store(runs_dir: str | Path | None) -> bool:
    """Whether the runs directory holds a runs database (a reader can open it)."""
    return (runs_dir_or_default(runs_dir) / DB_NAME).exists()


def open_store(runs_dir: str | Path | None = None, *, readonly: bool = True) -> Store:
    """The store of `runs_dir` (default: `default_runs_dir()`). Read-only by default: nothing is
    created or migrated, the directory may be read-only, and a missing database is a UserError."""
    return Store(runs_dir_or_default(runs_dir), create=not readonly, readonly=readonly)
