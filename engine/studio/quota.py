"""Quotas and credits: monthly free generations plus a credit balance, charged through reservations.

Every piece of GPU work is *reserved* before it starts, *committed* when it succeeds and *refunded* exactly once
when it fails or is cancelled, keyed by the request id (MU-1, MU-2): the same request id reserved twice is charged
once, and a refund or commit of a request that is already settled changes nothing. Each check-and-charge runs in
one `BEGIN IMMEDIATE` transaction, so concurrent requests can never both pass the same check. Every change is also
written to an append-only ledger (MU-9; triggers refuse UPDATE and DELETE on it), so the balance can be audited:
credits == sum of ledger credit deltas, and free generations used this month == -sum of its free deltas.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import ConfigError
from engine.studio.db import StudioDB

SCHEMA_VERSION = 1
KINDS = ("generate", "train")
_SCHEMA = """
CREATE TABLE quotas (
    user TEXT PRIMARY KEY,
    monthly_free INTEGER NOT NULL DEFAULT 0 CHECK (monthly_free >= 0),
    period TEXT NOT NULL DEFAULT '',
    used_free INTEGER NOT NULL DEFAULT 0 CHECK (used_free >= 0),
    credits INTEGER NOT NULL DEFAULT 0 CHECK (credits >= 0)
);
CREATE TABLE reservations (
    request_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    kind TEXT NOT NULL,
    period TEXT NOT NULL,
    free_part INTEGER NOT NULL,
    credit_part INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'committed', 'refunded')),
    created REAL NOT NULL
);
CREATE TABLE ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    user TEXT NOT NULL,
    request_id TEXT,
    period TEXT NOT NULL,
    delta_free INTEGER NOT NULL,
    delta_credits INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END
"""


class QuotaExceeded(ConfigError):
    """Not enough free generations or credits left; the message says what is left and when it renews."""


@dataclass(frozen=True)
class Balance:
    user: str
    monthly_free: int
    free_left: int
    credits: int
    renews_on: dt.date


@dataclass(frozen=True)
class Policy:
    """Prices in units of one generated image; a training run costs `train_price` (set by the studio admin)."""

    train_price: int = 50

    def price(self, kind: str, count: int) -> int:
        if kind not in KINDS:
            raise ConfigError(f"unknown kind of work {kind!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"`count` must be a positive whole number, not {count!r}")
        return count if kind == "generate" else count * self.train_price


def _period(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m")


def _renews_on(period: str) -> dt.date:
    y, m = map(int, period.split("-"))
    return dt.date(y + m // 12, m % 12 + 1, 1)


class Quotas:
    """Balances, reservations and the ledger in <data_dir>/stylebooth.db. Thread- and process-safe."""

    def __init__(self, db_path: str | Path, policy: Policy = Policy(), *, clock=time.time):
        self.db = StudioDB(db_path, "quotas", SCHEMA_VERSION, _SCHEMA)
        self.policy = policy
        self._clock = clock

    # ---- admin ---------------------------------------------------------------------------------------------
    def set_monthly_free(self, user: str, n: int) -> None:
        _check_int("monthly free generations", n)
        with self.db.write() as con:
            self._row(con, user)
            con.execute("UPDATE quotas SET monthly_free = ? WHERE user = ?", (n, user))

    def add_credits(self, user: str, n: int, reason: str = "added by an admin") -> None:
        _check_int("credits", n)
        with self.db.write() as con:
            period = self._row(con, user)
            con.execute("UPDATE quotas SET credits = credits + ? WHERE user = ?", (n, user))
            self._log(con, user, None, period, 0, n, reason)

    # ---- charging ------------------------------------------------------------------------------------------
    def reserve(self, user: str, request_id: str, kind: str = "generate", count: int = 1) -> bool:
        """Hold the price of the work before the GPU starts. True if charged now, False if this request id was
        reserved before (charged once). Raises QuotaExceeded, saying what is left, when it does not fit."""
        if not isinstance(request_id, str) or not request_id:
            raise ConfigError("every charged request needs a request id")
        price = self.policy.price(kind, count)
        with self.db.write() as con:
            if con.execute("SELECT 1 FROM reservations WHERE request_id = ?", (request_id,)).fetchone():
                return False
            period = self._row(con, user)
            monthly, used, credits = con.execute("SELECT monthly_free, used_free, credits FROM quotas WHERE user = ?",
                                                 (user,)).fetchone()
            free = min(max(0, monthly - used), price) if kind == "generate" else 0  # free images, not free training
            paid = price - free
            if paid > credits:
                raise QuotaExceeded(
                    f"this needs {price} {'image' if kind == 'generate' else 'credit'}{'s' * (price != 1)}; you have "
                    f"{max(0, monthly - used)} free generation(s) left this month (renews on "
                    f"{_renews_on(period).isoformat()}) and {credits} credit(s). Ask your studio admin for credits.")
            con.execute("UPDATE quotas SET used_free = used_free + ?, credits = credits - ? WHERE user = ?",
                        (free, paid, user))
            con.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, 'reserved', ?)",
                        (request_id, user, kind, period, free, paid, self._clock()))
            self._log(con, user, request_id, period, -free, -paid, f"reserve {kind} x{count}")
        return True

    def commit(self, request_id: str) -> None:
        """The work succeeded: the reservation becomes a charge (idempotent)."""
        with self.db.write() as con:
            con.execute("UPDATE reservations SET state = 'committed' WHERE request_id = ? AND state = 'reserved'",
                        (request_id,))

    def refund(self, request_id: str, reason: str = "failed or cancelled") -> bool:
        """The work failed or was cancelled: give the reservation back, exactly once. True if refunded now."""
        with self.db.write() as con:
            return self._refund(con, request_id, reason)

    def release_stale(self) -> int:
        """At start-up no job runs yet, so every open reservation belongs to work that died: refund them all."""
        with self.db.write() as con:
            ids = [r[0] for r in con.execute("SELECT request_id FROM reservations WHERE state = 'reserved'")]
            return sum(self._refund(con, rid, "released at start-up (the app stopped mid-job)") for rid in ids)

    # ---- reading -------------------------------------------------------------------------------------------
    def balance(self, user: str) -> Balance:
        with self.db.write() as con:  # rolls the month over if needed
            period = self._row(con, user)
            monthly, used, credits = con.execute("SELECT monthly_free, used_free, credits FROM quotas WHERE user = ?",
                                                 (user,)).fetchone()
        return Balance(user, monthly, max(0, monthly - used), credits, _renews_on(period))

    def ledger(self, user: str | None = None) -> list[dict]:
        sql = "SELECT time, user, request_id, period, delta_free, delta_credits, reason FROM ledger"
        rows = self.db.read(sql + (" WHERE user = ?" if user else "") + " ORDER BY id", (user,) if user else ())
        keys = ("time", "user", "request_id", "period", "delta_free", "delta_credits", "reason")
        return [dict(zip(keys, r)) for r in rows]

    # ---- inside a transaction ------------------------------------------------------------------------------
    def _row(self, con, user: str) -> str:
        """Make sure the user has a quota row in the current month; returns the month ("YYYY-MM")."""
        if not isinstance(user, str) or not user:
            raise ConfigError("a quota needs a user")
        period = _period(self._clock())
        con.execute("INSERT OR IGNORE INTO quotas (user, period) VALUES (?, ?)", (user, period))
        if con.execute("SELECT period FROM quotas WHERE user = ?", (user,)).fetchone()[0] != period:
            con.execute("UPDATE quotas SET period = ?, used_free = 0 WHERE user = ?", (period, user))
        return period

    def _refund(self, con, request_id: str, reason: str) -> bool:
        row = con.execute("SELECT user, period, free_part, credit_part FROM reservations "
                          "WHERE request_id = ? AND state = 'reserved'", (request_id,)).fetchone()
        if row is None:
            return False
        user, period, free, paid = row
        current = self._row(con, user)
        # Free images go back only into the month they were taken from; credits always come back.
        back_free = free if period == current else 0
        con.execute("UPDATE quotas SET used_free = used_free - ?, credits = credits + ? WHERE user = ?",
                    (back_free, paid, user))
        con.execute("UPDATE reservations SET state = 'refunded' WHERE request_id = ?", (request_id,))
        self._log(con, user, request_id, period, back_free, paid, f"refund: {reason}")
        return True

    def _log(self, con, user, request_id, period, delta_free, delta_credits, reason) -> None:
        con.execute("INSERT INTO ledger (time, user, request_id, period, delta_free, delta_credits, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", (self._clock(), user, request_id, period, delta_free,
                                                      delta_credits, reason))


def _check_int(what: str, n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"{what} must be a whole number >= 0, not {n!r}")
