"""The library database: <data_dir>/stylebooth.db (SQLite, WAL, foreign keys on) and its migrations.

The folders under styles/<id>/v<N>/ stay the truth for weights; the database indexes them (names, tags, trash,
versions, file hashes). It can be rebuilt from the folders (see library.adopt), so a lost or refused database never
loses a style.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Callable

from engine.core.errors import LibraryError

DB_NAME = "stylebooth.db"

_V1 = """
CREATE TABLE styles (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    preset      TEXT NOT NULL DEFAULT 'style',
    archived    INTEGER NOT NULL DEFAULT 0,
    deleted_at  TEXT,              -- set: in the trash (undo until the trash is emptied)
    created     TEXT NOT NULL
);
CREATE TABLE versions (
    style_id               TEXT NOT NULL REFERENCES styles(id) ON DELETE CASCADE,
    version                INTEGER NOT NULL CHECK (version >= 1),
    kind                   TEXT NOT NULL CHECK (kind IN ('lora', 'embedding', 'instant', 'blend')),
    folder                 TEXT NOT NULL,   -- relative to the data dir: styles/<id>/v<N>
    lora_file              TEXT NOT NULL DEFAULT '',
    trigger_words          TEXT NOT NULL DEFAULT '[]',  -- JSON list: the first one is inserted into prompts
    base_model_fingerprint TEXT NOT NULL DEFAULT '',
    base_model             TEXT NOT NULL DEFAULT '',
    prompt_template        TEXT NOT NULL DEFAULT '',
    class_noun             TEXT NOT NULL DEFAULT '',
    recommended_strength   REAL NOT NULL DEFAULT 1.0,
    training_config        TEXT NOT NULL DEFAULT '{}',  -- JSON
    provenance             TEXT NOT NULL DEFAULT '[]',  -- JSON: training images (name + sha256) or import source
    preview_grid           TEXT NOT NULL DEFAULT '',
    source                 TEXT NOT NULL DEFAULT 'trained',  -- 'trained' | 'imported'
    created                TEXT NOT NULL,
    PRIMARY KEY (style_id, version)
);
CREATE TABLE tags (
    style_id TEXT NOT NULL REFERENCES styles(id) ON DELETE CASCADE,
    tag      TEXT NOT NULL,
    PRIMARY KEY (style_id, tag)
);
CREATE INDEX tags_by_tag ON tags(tag);
CREATE TABLE file_hashes (
    style_id TEXT NOT NULL,
    version  INTEGER NOT NULL,
    file     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    bytes    INTEGER NOT NULL,
    PRIMARY KEY (style_id, version, file),
    FOREIGN KEY (style_id, version) REFERENCES versions(style_id, version) ON DELETE CASCADE
);
"""

def _script(sql: str) -> Callable[[sqlite3.Connection], None]:
    # Not executescript(): it commits first, which would split a migration step over two transactions.
    return lambda con: [con.execute(stmt) for stmt in sql.split(";") if stmt.strip()]


# Studio mode: every style has an owner (existing rows: the local user) and may be shared with the whole studio
# (readable by everyone, changed only by its owner or an admin); training runs have an owner too.
_V2 = """
ALTER TABLE styles ADD COLUMN owner TEXT NOT NULL DEFAULT 'local';
ALTER TABLE styles ADD COLUMN shared INTEGER NOT NULL DEFAULT 0;
CREATE INDEX styles_by_owner ON styles(owner);
CREATE TABLE run_owners (
    run_id TEXT PRIMARY KEY,
    owner  TEXT NOT NULL
)
"""

# MIGRATIONS[n] takes a database at schema n-1 to schema n. Append; never edit a released step.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _script(_V1), 2: _script(_V2)}


def latest_version() -> int:
    return max(MIGRATIONS)


def schema_version(con: sqlite3.Connection) -> int:
    """The database's schema version; 0 for an empty (new) database."""
    has = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
    if not has:
        return 0
    row = con.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(con: sqlite3.Connection, path: Path) -> int:
    """Bring the database to the latest schema, one step per transaction; refuse one from a newer Stylebooth."""
    latest = latest_version()
    current = schema_version(con)
    if current > latest:
        raise LibraryError(
            f"{path.name} has library schema {current}, but this Stylebooth knows schema {latest} at most: it was "
            f"written by a newer Stylebooth. Update Stylebooth, or move {path.name} away to rebuild the library from "
            "the styles/ folders (tags, names and the trash would be lost).")
    for n in range(current + 1, latest + 1):
        # one transaction per step: a failed step leaves the database at the previous schema
        con.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[n](con)
            con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            con.execute("DELETE FROM schema_version")
            con.execute("INSERT INTO schema_version (version) VALUES (?)", (n,))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
    return latest


class Database:
    """One connection shared by the engine's threads behind a lock (SQLite objects are not thread-safe)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE), so a writer never upgrades
            # a read lock halfway and deadlocks against another process (a CLI run publishing a style).
            self.con = sqlite3.connect(str(self.path), timeout=15.0, isolation_level=None, check_same_thread=False)
            self.con.row_factory = sqlite3.Row
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("PRAGMA foreign_keys=ON")
            self.con.execute("PRAGMA synchronous=FULL")  # a committed style survives a power cut (TR-10)
        except sqlite3.DatabaseError as e:
            raise LibraryError(f"cannot open the library database {self.path}: {e}. Move it away to rebuild the "
                               "library from the styles/ folders.") from e
        self.lock = threading.RLock()
        with self.lock:
            try:
                migrate(self.con, self.path)
            except BaseException:
                self.con.close()
                raise

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.con.execute(sql, args).fetchall()

    def transaction(self):
        """`with db.transaction() as con:` runs statements in one IMMEDIATE transaction, under the lock."""
        return _Tx(self)

    def close(self) -> None:
        with self.lock:
            self.con.close()


class _Tx:
    def __init__(self, db: Database):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.lock.acquire()
        try:
            self.db.con.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.db.lock.release()
            raise
        return self.db.con

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.con.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.db.lock.release()
