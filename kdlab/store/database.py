"""The runs database: one SQLite file (and one checkpoint folder) per runs directory.

SQLite in WAL mode keeps the database readable after a `kill -9` at any moment; checkpoints are
written to a temporary file and renamed, so a checkpoint on disk is always whole. Runs are claimed
in a transaction so that several `kdlab grid` processes can share one runs directory without
running anything twice. `Store` is the writer (and, opened with `readonly=True`, a reader) of
`kdlab.store.protocol`.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdlab.errors import UserError
from kdlab.store.checkpoint_files import RESUME_ADVICE, read_checkpoint_file, write_checkpoint_file
from kdlab.store.claims import STALE_AFTER_S, owner_is_dead
from kdlab.store.records import RunRecord

SCHEMA_VERSION = 3
DB_NAME = "kdlab.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    model TEXT NOT NULL, width REAL NOT NULL, method TEXT NOT NULL, teacher TEXT,
    dataset TEXT NOT NULL, seed INTEGER NOT NULL, label TEXT,
    status TEXT NOT NULL,              -- pending | running | done | failed
    owner TEXT, heartbeat REAL,
    created REAL NOT NULL, started REAL, finished REAL,
    epochs_done INTEGER NOT NULL DEFAULT 0,
    final_acc REAL, best_acc REAL, best_epoch INTEGER,
    wall_s REAL, timing_json TEXT, device TEXT, versions_json TEXT,
    params INTEGER, paper_params INTEGER, peak_mem_bytes INTEGER, error TEXT,
    health TEXT,                       -- schema 2: 'ok', or 'diverged: why' (kdlab.health)
    role TEXT,                         -- schema 2: what a grid planned it as (teacher, student, ...)
    flops INTEGER                      -- schema 3: per image at the data's size (kdlab.models.profile)
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    train_loss REAL, train_acc REAL, test_loss REAL, test_acc REAL,
    lr REAL, time_s REAL, terms_json TEXT,
    PRIMARY KEY (run_id, epoch)
);
"""


# Columns added after schema 1, in the order migrations add them: (name, SQL type).
_LATER_COLUMNS = {2: [("health", "TEXT"), ("role", "TEXT")], 3: [("flops", "INTEGER")]}


class Store:
    """The runs database and checkpoints under one runs directory.

    `readonly=True` only reads (reports, dry runs, finding a teacher): the database is opened
    read-only, nothing is created or migrated, and the directory may be read-only.
    """

    readonly = False

    def __init__(self, runs_dir: str | Path, create: bool = True, readonly: bool = False):
        self.root = Path(runs_dir).expanduser()
        self.path = self.root / DB_NAME
        self.readonly = readonly
        if not self.path.exists() and (readonly or not create):
            raise UserError(f"no kdlab runs database at {self.path}: run `kdlab train` or `kdlab grid` first")
        if readonly:
            self._conn = self._connect_readonly()
            self._check_schema()
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "checkpoints").mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create runs directory {self.root}: {e.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise UserError(f"runs directory {self.root} is not writable: choose another with --runs-dir")
        self._conn = self._connect()
        self._check_schema()
        # WAL only once the file is known to be ours: switching rewrites the header of a foreign file.
        # In WAL mode readers never block the writer and a killed writer leaves the database whole.
        self._conn.execute("PRAGMA journal_mode=WAL")

    @property
    def is_writer(self) -> bool:
        """True: this store writes the database (False when opened read-only)."""
        return not self.readonly

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a usable kdlab database ({e}): move it away or use "
                            "another --runs-dir") from None
        conn.row_factory = sqlite3.Row
        return conn

    def _connect_readonly(self) -> sqlite3.Connection:
        # mode=ro still needs the WAL index (-shm) beside the database, which a read-only directory
        # cannot get: there, immutable=1 reads the file as it is (no writer can be at work in it).
        uri = self.path.resolve().as_uri() + "?mode=ro"
        if not os.access(self.root, os.W_OK):
            uri += "&immutable=1"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            raise UserError(f"cannot read {self.path} ({e}): check its permissions, or use another "
                            "--runs-dir") from None
        conn.row_factory = sqlite3.Row
        return conn

    def _check_schema(self) -> None:
        try:
            if self.readonly:
                found = self._schema_version(self._conn, create=False)
            else:
                with self.transaction() as c:  # one process creates the tables; the others then see them
                    found = self._schema_version(c, create=True)
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a usable kdlab database ({e}): use another --runs-dir") from None
        if not found.isdigit() or not 1 <= int(found) <= SCHEMA_VERSION:
            raise UserError(f"{self.path} was written by an incompatible kdlab (schema {found}, this kdlab "
                            f"reads 1 to {SCHEMA_VERSION}): use another --runs-dir")
        if int(found) < SCHEMA_VERSION and not self.readonly:
            self._migrate(int(found))

    def _schema_version(self, c: sqlite3.Connection, create: bool) -> str:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables and tables:
            raise UserError(f"{self.path} is not a kdlab runs database: use another --runs-dir")
        if not tables and create:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif not tables:
            return "none"
        row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return row[0] if row else "none"

    def _migrate(self, version: int) -> None:
        """Bring an older database up to SCHEMA_VERSION by adding columns; rows keep their ids.

        Runs from schema 1 have no dataset fingerprint in their config, so no run planned now has
        their id: they stay readable, usable as teachers by id and in reports (marked as such), and
        are never mistaken for a run on data kdlab has fingerprinted.
        """
        with self.transaction() as c:
            # Another process may have migrated between our check and this transaction's lock.
            current = int(c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
            for step in range(current + 1, SCHEMA_VERSION + 1):
                for name, kind in _LATER_COLUMNS.get(step, []):
                    c.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
            c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            c.execute("INSERT OR IGNORE INTO meta VALUES ('migrated_from', ?)", (str(version),))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: the write lock is taken up front, so claims cannot race."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()

    def reopen(self) -> Store:
        """The same store on a connection of its own, for another thread (the heartbeat's)."""
        return Store(self.root, create=False)

    # ---- runs ---------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord | None:
        row = self._conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return self._record(row) if row else None

    def find(self, prefix: str) -> RunRecord | None:
        """A run by its id or an unambiguous prefix of it."""
        rows = self._conn.execute("SELECT * FROM runs WHERE run_id LIKE ?", (prefix + "%",)).fetchall()
        if len(rows) > 1:
            raise UserError(f"run id prefix {prefix!r} matches {len(rows)} runs: give more characters")
        return self._record(rows[0]) if rows else None

    def runs(self, status: str | None = None) -> list[RunRecord]:
        query, args = "SELECT * FROM runs", ()
        if status:
            query, args = query + " WHERE status=?", (status,)
        return [self._record(r) for r in self._conn.execute(query + " ORDER BY created", args)]

    def _record(self, row: sqlite3.Row) -> RunRecord:
        history = []
        for e in self._conn.execute("SELECT * FROM epochs WHERE run_id=? ORDER BY epoch", (row["run_id"],)):
            epoch = dict(zip(e.keys(), tuple(e), strict=True))
            epoch.pop("run_id")
            epoch["terms"] = json.loads(epoch.pop("terms_json") or "{}")
            history.append(epoch)
        ckpt = self.checkpoint_path(row["run_id"])
        return RunRecord(
            run_id=row["run_id"], config=json.loads(row["config_json"]), status=row["status"], label=row["label"],
            epochs_done=row["epochs_done"], final_acc=row["final_acc"], best_acc=row["best_acc"],
            best_epoch=row["best_epoch"], wall_s=row["wall_s"], timing=json.loads(row["timing_json"] or "{}"),
            device=row["device"], versions=json.loads(row["versions_json"] or "{}"), params=row["params"],
            paper_params=row["paper_params"], peak_mem_bytes=row["peak_mem_bytes"], error=row["error"],
            history=history, checkpoint=str(ckpt) if ckpt.exists() else None,
            # A schema-1 database read without migrating (read-only) lacks the later columns.
            **{name: row[name] for cols in _LATER_COLUMNS.values() for name, _ in cols if name in row.keys()}  # noqa: SIM118,
        )

    def ensure(self, run_id: str, config: dict[str, Any], label: str | None = None, role: str | None = None) -> None:
        """Record a run as pending unless it is already known (a grid also records the role it planned)."""
        with self.transaction() as c:
            c.execute(
                "INSERT OR IGNORE INTO runs (run_id, config_json, model, width, method, teacher, dataset, seed,"
                " label, status, created, role) VALUES (?,?,?,?,?,?,?,?,?,'pending',?,?)",
                (run_id, json.dumps(config, sort_keys=True), config["model"], config["width"], config["method"],
                 config.get("teacher"), config["dataset"], config["seed"], label, time.time(), role),
            )
            if role is not None:
                c.execute("UPDATE runs SET role=? WHERE run_id=? AND role IS NULL", (role, run_id))

    def claim(self, run_id: str, owner: str) -> str:
        """Try to take a run: returns 'claimed', 'done' (nothing to do) or 'busy' (someone alive has it)."""
        with self.transaction() as c:
            row = c.execute("SELECT status, owner, heartbeat FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            if row["status"] == "done":
                return "done"
            if row["status"] == "running" and row["owner"] != owner:
                stale = time.time() - (row["heartbeat"] or 0) > STALE_AFTER_S
                if not stale and not owner_is_dead(row["owner"]):
                    return "busy"
            c.execute("UPDATE runs SET status='running', owner=?, heartbeat=?, error=NULL, "
                      "started=COALESCE(started, ?) WHERE run_id=?", (owner, time.time(), time.time(), run_id))
            return "claimed"

    def heartbeat(self, run_id: str, owner: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET heartbeat=? WHERE run_id=? AND owner=?", (time.time(), run_id, owner))

    def release(self, run_id: str, owner: str) -> None:
        """Give back a claim without finishing (e.g. on Ctrl-C): the run can be resumed later."""
        with self.transaction() as c:
            c.execute("UPDATE runs SET status='pending', owner=NULL WHERE run_id=? AND owner=? AND status='running'",
                      (run_id, owner))

    def set_info(self, run_id: str, **values: Any) -> None:
        """Static facts about a run known when it starts: device, versions, params."""
        cols = {k: json.dumps(v) if k in ("versions_json",) else v for k, v in values.items()}
        with self.transaction() as c:
            c.execute(f"UPDATE runs SET {', '.join(f'{k}=?' for k in cols)} WHERE run_id=?", (*cols.values(), run_id))

    def record_epoch(self, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        """Store one finished epoch (1-based) and advance the run's progress, atomically."""
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO epochs (run_id, epoch, train_loss, train_acc, test_loss, test_acc, lr,"
                " time_s, terms_json) VALUES (?,?,?,?,?,?,?,?,?)",
                (run_id, epoch, metrics.get("train_loss"), metrics.get("train_acc"), metrics.get("test_loss"),
                 metrics.get("test_acc"), metrics.get("lr"), metrics.get("time_s"),
                 json.dumps(metrics.get("terms", {}))),
            )
            c.execute("UPDATE runs SET epochs_done=?, heartbeat=? WHERE run_id=?", (epoch, time.time(), run_id))

    def truncate_epochs(self, run_id: str, keep: int) -> None:
        """Forget epochs after `keep` (their checkpoint was never completed)."""
        with self.transaction() as c:
            c.execute("DELETE FROM epochs WHERE run_id=? AND epoch>?", (run_id, keep))
            c.execute("UPDATE runs SET epochs_done=? WHERE run_id=?", (keep, run_id))

    def finish(self, run_id: str, result: dict[str, Any]) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status='done', owner=NULL, finished=?, final_acc=?, best_acc=?, best_epoch=?,"
                " wall_s=?, timing_json=?, peak_mem_bytes=?, error=NULL, health=? WHERE run_id=?",
                (time.time(), result["final_acc"], result["best_acc"], result["best_epoch"], result["wall_s"],
                 json.dumps(result["timing"]), result.get("peak_mem_bytes"), result.get("health"), run_id),
            )

    def fail(self, run_id: str, error: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET status='failed', owner=NULL, finished=?, error=? WHERE run_id=?",
                      (time.time(), error, run_id))

    def export_run(self, run_id: str) -> dict[str, Any] | None:
        """The run's row and epoch rows exactly as stored, to copy it into another store (kdlab merge)."""
        row = self._conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            return None
        epochs = self._conn.execute("SELECT * FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,)).fetchall()
        return {"run": dict(row), "epochs": [dict(e) for e in epochs]}

    def import_run(self, data: dict[str, Any]) -> None:
        """Write a run exported from another store over this store's row of that id, if any.

        No process of this store holds the copy, so a run that was training there is pending here.
        """
        run = {**data["run"], "owner": None, "heartbeat": None}
        if run["status"] == "running":
            run["status"] = "pending"
        with self.transaction() as c:
            c.execute("DELETE FROM epochs WHERE run_id=?", (run["run_id"],))
            c.execute(f"INSERT OR REPLACE INTO runs ({', '.join(run)}) VALUES ({', '.join('?' * len(run))})",
                      tuple(run.values()))
            for e in data["epochs"]:
                c.execute(f"INSERT INTO epochs ({', '.join(e)}) VALUES ({', '.join('?' * len(e))})", tuple(e.values()))

    # ---- checkpoints --------------------------------------------------------------------------

    def checkpoint_path(self, run_id: str, epoch: int | None = None) -> Path:
        """The run's latest checkpoint, or its snapshot after `epoch` (kept when asked for)."""
        suffix = "" if epoch is None else f"@{epoch}"
        return self.root / "checkpoints" / f"{run_id}{suffix}.pt"

    def save_snapshot(self, run_id: str, epoch: int) -> None:
        """Keep a copy of the checkpoint just written, as it stands after `epoch`."""
        src, dst = self.checkpoint_path(run_id), self.checkpoint_path(run_id, epoch)
        tmp = dst.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

    def save_checkpoint(self, run_id: str, state: dict[str, Any]) -> None:
        """Write atomically: a temporary file, flushed to disk, then renamed over the old one. The
        checkpoint carries the digest of its content, checked whenever it is read."""
        write_checkpoint_file(self.checkpoint_path(run_id), state)

    def load_checkpoint(self, run_id: str) -> dict[str, Any] | None:
        """The run's latest checkpoint (to resume it), None if it has none; a damaged one is a UserError."""
        path = self.checkpoint_path(run_id)
        if not path.exists():
            return None
        return read_checkpoint_file(path, RESUME_ADVICE)
