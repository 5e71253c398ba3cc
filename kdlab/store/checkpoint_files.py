"""Checkpoint files as the store writes and reads them: whole (written, then renamed) and checked
against the sha256 of their content written inside them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kdlab.digests import state_sha256
from kdlab.errors import UserError

CHECKPOINT_DIGEST = "sha256"  # the key of a checkpoint's digest of its own content (kdlab.digests)
# What to do about a damaged checkpoint: of a run still training, and of a finished run.
RESUME_ADVICE = "delete it to train the run again from its start, or put back a copy"
FINISHED_ADVICE = ("a trained run's weights come back only from a copy of the file (`kdlab merge` copies "
                   "checkpoints) or by training the run again in another runs dir")


def write_checkpoint_file(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a temporary file, flushed to disk, then renamed over the old one. The
    checkpoint carries the digest of its content, checked whenever it is read."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({**state, CHECKPOINT_DIGEST: state_sha256(state)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint_file(path: str | Path, advice: str = FINISHED_ADVICE) -> dict[str, Any]:
    """A kdlab checkpoint, checked against the digest written inside it: one line naming the file, what
    is wrong and `advice` when it cannot be read or its content changed since it was written."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # the file could not be read at all (a folder in its place, permissions): not damage
        raise
    except Exception as e:  # noqa: BLE001 (a damaged zip or pickle fails in many ways)
        why = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is damaged ({why}): {advice}") from None
    check_checkpoint(state, path, advice)
    return state


def check_checkpoint(state: Any, path: str | Path, advice: str = FINISHED_ADVICE) -> None:
    """Raise a UserError when a loaded checkpoint's content is not what was written (checkpoints written
    before kdlab kept digests are taken as they are)."""
    if isinstance(state, dict) and CHECKPOINT_DIGEST in state:
        content = {k: v for k, v in state.items() if k != CHECKPOINT_DIGEST}
        if state_sha256(content) != state[CHECKPOINT_DIGEST]:
            raise UserError(f"checkpoint {path} is damaged (its content's sha256 differs from the one written "
                            f"with it): {advice}")
