"""The studio's SQLite connection: WAL (readers never block the writer), foreign keys on, one connection per
thread, `BEGIN IMMEDIATE` for every read-modify-write so two requests can never both pass a check (MU-1)."""
from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Iterator

from engine.core.errors import ConfigError


class StudioDB:
    """Thread-safe access to one database file; each thread gets its own connection."""

    def __init__(self, path: str | Path, component: str, schema_version: int, schema: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self.write() as con:
            con.execute("CREATE TABLE IF NOT EXISTS studio_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            row = con.execute("SELECT version FROM studio_schema WHERE component = ?", (component,)).fetchone()
            if row and row[0] > schema_version:
                raise ConfigError(f"{self.path.name} was written by a newer Stylebooth ({component} schema {row[0]}, "
                                  f"this version reads {schema_version}); upgrade Stylebooth or use another data dir")
            if row is None:  # executescript would COMMIT our transaction: run the statements one by one
                for stmt in _statements(schema):
                    con.execute(stmt)
            con.execute("INSERT OR REPLACE INTO studio_schema VALUES (?, ?)", (component, schema_version))

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            # isolation_level=None: we issue BEGIN ourselves, so every transaction is explicit.
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=True)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA synchronous=FULL")  # a committed charge survives a power cut
            self._local.con = con
        return con

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A transaction that takes the write lock up front (BEGIN IMMEDIATE): check-then-act is atomic."""
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def read(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._con().execute(sql, args).fetchall()


def _statements(script: str) -> list[str]:
    """Split a schema into complete statements (a trigger's body holds ';' of its own)."""
    out, buf = [], ""
    for part in script.split(";"):
        buf += part + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n;"):
                out.append(buf.strip())
            buf = ""
    return out
