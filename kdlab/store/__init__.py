"""The runs store: one SQLite database and one checkpoint folder per runs directory.

It is the one place results are written. One module per job: `records` (RunRecord), `database`
(the SQLite store, its schema and migrations), `checkpoint_files` (writing and checking
checkpoints), `claims` (owners, staleness, the heartbeat), `protocol` (the interface: reader,
writer and follower roles), `location` (the default runs directory, opening one to read).
"""

from kdlab.store.checkpoint_files import (
    CHECKPOINT_DIGEST,
    FINISHED_ADVICE,
    RESUME_ADVICE,
    check_checkpoint,
    read_checkpoint_file,
    write_checkpoint_file,
)
from kdlab.store.claims import HEARTBEAT_S, STALE_AFTER_S, Heartbeat, owner_id, owner_is_dead
from kdlab.store.database import DB_NAME, SCHEMA_VERSION, Store
from kdlab.store.location import default_runs_dir, has_store, open_store, runs_dir_or_default
from kdlab.store.protocol import RunsFollower, RunsReader, RunsWriter
from kdlab.store.records import RunRecord

__all__ = [
    "CHECKPOINT_DIGEST", "DB_NAME", "FINISHED_ADVICE", "HEARTBEAT_S", "RESUME_ADVICE", "SCHEMA_VERSION",
    "STALE_AFTER_S", "Heartbeat", "RunRecord", "RunsFollower", "RunsReader", "RunsWriter", "Store",
    "check_checkpoint", "default_runs_dir", "has_store", "open_store", "owner_id", "owner_is_dead",
    "read_checkpoint_file", "runs_dir_or_default", "write_checkpoint_file",
]
