"""Paths the user gives kdlab to write (`export --out`, `report --out`, `merge --into`, `bench --out`,
`demo --runs-dir`): checked before any work, so that a folder without write permission, a folder where
a file is expected or a file where a folder is expected is one line (exit 2) and nothing is written.
The copy itself goes through a temporary file, so a failure half-way leaves nothing behind either.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kdlab.errors import UserError


def _can_write_in(folder: Path, flag: str, path: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {folder} (no permission)")


def writable_file(path: str | Path, flag: str) -> Path:
    """A file kdlab will write (or overwrite): its folder exists and can be written in."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{flag} {p} is a folder: give a file name (e.g. {p / 'model.onnx'})")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {p}: cannot overwrite it (no permission)")
    folder = p.parent
    if not folder.exists():
        raise UserError(f"{flag} {p}: folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{flag} {p}: {folder} is not a folder")
    _can_write_in(folder, flag, p)
    return p


def writable_dir(path: str | Path, flag: str) -> Path:
    """A folder kdlab will write files into, made if missing: it is a folder (or can be made in the nearest
    existing one above it), and can be written in."""
    p = Path(path).expanduser()
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == p else f" ({existing} is a file)"
        raise UserError(f"{flag} {p} is not a folder{where}")
    _can_write_in(existing, flag, p)
    return p


def copy_to(src: Path, dst: Path, flag: str) -> None:
    """Copy a file to a checked user path, whole or not at all."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{flag} {dst}: cannot write it ({e.strerror})") from None
