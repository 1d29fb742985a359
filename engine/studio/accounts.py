"""Studio accounts: who may log in, with which role.

Passwords are stored only as salted scrypt hashes (RFC 7914; hashlib.scrypt, n=2^14, r=8, p=1) and compared in
constant time. Usernames are NFKC-normalised and case-folded before any lookup, so "Ａdmin" and "admin" are the
same account (MU-8). Ten wrong passwords in a row lock the account for `lockout_s` seconds (GR-8); a locked
account refuses the right password too, and an unknown name costs the same hashing work as a known one, so the
answer time does not tell which names exist.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import ConfigError
from engine.studio.db import StudioDB

SCHEMA_VERSION = 1
ROLES = ("user", "admin")
MIN_PASSWORD = 8
MAX_FAILED = 10
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
_SCHEMA = """
CREATE TABLE users (
    name TEXT PRIMARY KEY,            -- NFKC + casefold
    display TEXT NOT NULL,            -- as typed when the account was made
    role TEXT NOT NULL CHECK (role IN ('user', 'admin')),
    pw_hash TEXT NOT NULL,
    failed INTEGER NOT NULL DEFAULT 0,
    locked_until REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class User:
    """An account as the rest of the app sees it: never its hash."""

    name: str
    display: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def normalize_username(name: str) -> str:
    """NFKC + casefold (MU-8); 1-32 of a-z 0-9 . _ -, starting with a letter or digit."""
    if not isinstance(name, str):
        raise ConfigError("the username must be text")
    norm = unicodedata.normalize("NFKC", name).casefold().strip()
    if not _NAME.match(norm):
        raise ConfigError(f"username {name[:40]!r} is not allowed: use 1-32 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return norm


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt${n}${r}${p}${salt}${hash}".format(**_SCRYPT, salt=base64.b64encode(salt).decode(),
                                                       hash=base64.b64encode(digest).decode())


def check_password(password: str, stored: str) -> bool:
    """Constant-time comparison of scrypt(password) with the stored hash."""
    try:
        _, n, r, p, salt, want = stored.split("$")
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), dklen=32, n=int(n), r=int(r),
                             p=int(p))
        return hmac.compare_digest(got, base64.b64decode(want))
    except (ValueError, TypeError):
        return False


_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))  # checked for unknown names: same work, same timing


class Accounts:
    """The users table. Thread-safe; every method validates its input."""

    def __init__(self, db_path: str | Path, *, lockout_s: float = 15 * 60, clock=time.time):
        self.db = StudioDB(db_path, "accounts", SCHEMA_VERSION, _SCHEMA)
        self.lockout_s = float(lockout_s)
        self._clock = clock

    # ---- admin ---------------------------------------------------------------------------------------------
    def add(self, name: str, password: str, role: str = "user") -> User:
        norm = normalize_username(name)
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        _check_password_policy(password)
        with self.db.write() as con:
            if con.execute("SELECT 1 FROM users WHERE name = ?", (norm,)).fetchone():
                raise ConfigError(f"user {norm!r} exists already; pick another name or remove that user first")
            con.execute("INSERT INTO users (name, display, role, pw_hash, created) VALUES (?, ?, ?, ?, ?)",
                        (norm, name.strip(), role, hash_password(password), self._clock()))
        return User(norm, name.strip(), role)

    def remove(self, name: str) -> None:
        norm = normalize_username(name)
        with self.db.write() as con:
            if con.execute("DELETE FROM users WHERE name = ?", (norm,)).rowcount == 0:
                raise ConfigError(f"no user {norm!r}")

    def set_password(self, name: str, password: str) -> None:
        norm = normalize_username(name)
        _check_password_policy(password)
        with self.db.write() as con:
            if con.execute("UPDATE users SET pw_hash = ?, failed = 0, locked_until = 0 WHERE name = ?",
                           (hash_password(password), norm)).rowcount == 0:
                raise ConfigError(f"no user {norm!r}")

    def list(self) -> list[User]:
        return [User(*row) for row in self.db.read("SELECT name, display, role FROM users ORDER BY name")]

    def get(self, name: str) -> User | None:
        try:
            norm = normalize_username(name)
        except ConfigError:
            return None
        rows = self.db.read("SELECT name, display, role FROM users WHERE name = ?", (norm,))
        return User(*rows[0]) if rows else None

    def ensure_admin(self) -> str | None:
        """With no admin yet, create 'admin' with a random one-time password and return it (else None)."""
        if any(u.is_admin for u in self.list()):
            return None
        password = secrets.token_urlsafe(12)
        if self.get("admin"):
            self.set_password("admin", password)
            with self.db.write() as con:
                con.execute("UPDATE users SET role = 'admin' WHERE name = 'admin'")
        else:
            self.add("admin", password, role="admin")
        return password

    # ---- login ---------------------------------------------------------------------------------------------
    def authenticate(self, name: str, password: str) -> User | None:
        """The user for a correct name and password on an unlocked account, else None (failures are counted)."""
        try:
            norm = normalize_username(name)
        except ConfigError:
            check_password(str(password), _DUMMY_HASH)
            return None
        rows = self.db.read("SELECT display, role, pw_hash, locked_until FROM users WHERE name = ?", (norm,))
        if not rows:
            check_password(str(password), _DUMMY_HASH)
            return None
        display, role, stored, locked_until = rows[0]
        ok = check_password(str(password), stored)  # always hash, even when locked: no timing difference
        now = self._clock()
        with self.db.write() as con:
            if locked_until > now:
                return None
            if ok:
                con.execute("UPDATE users SET failed = 0, locked_until = 0 WHERE name = ?", (norm,))
                return User(norm, display, role)
            failed = con.execute("UPDATE users SET failed = failed + 1 WHERE name = ? RETURNING failed",
                                 (norm,)).fetchone()[0]
            if failed >= MAX_FAILED:
                con.execute("UPDATE users SET failed = 0, locked_until = ? WHERE name = ?",
                            (now + self.lockout_s, norm))
        return None

    def locked_for(self, name: str) -> float:
        """Seconds until the account unlocks (0 when it is not locked)."""
        rows = self.db.read("SELECT locked_until FROM users WHERE name = ?", (normalize_username(name),))
        return max(0.0, rows[0][0] - self._clock()) if rows else 0.0

    def gradio_auth(self, username: str, password: str) -> bool:
        """For `launch(auth=...)`: Gradio calls it with what the login form sent."""
        return self.authenticate(username, password) is not None


def _check_password_policy(password: str) -> None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise ConfigError(f"the password must have at least {MIN_PASSWORD} characters")
