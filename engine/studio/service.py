"""The studio as the app and the admin command line see it: accounts and quotas on one database, with every
admin operation checked against the caller's role (server side; hiding a tab is not a check, GR-9)."""
from __future__ import annotations

import time
from pathlib import Path

from engine.core.caller import LOCAL, Caller
from engine.core.errors import AccessDenied, ConfigError
from engine.studio.accounts import Accounts, User, normalize_username
from engine.studio.quota import Balance, Policy, Quotas

ADMIN_CLI = Caller("command line", admin=True)  # `python launcher.py users ...`: whoever can open the database


class Studio:
    """Accounts + quotas in <data_dir>/stylebooth.db."""

    def __init__(self, db_path: str | Path, *, lockout_s: float = 15 * 60, policy: Policy = Policy(),
                 clock=time.time):
        self.accounts = Accounts(db_path, lockout_s=lockout_s, clock=clock)
        self.quotas = Quotas(db_path, policy, clock=clock)

    # ---- who is asking -------------------------------------------------------------------------------------
    def caller(self, username: str | None) -> Caller:
        """The logged-in account behind a request's username; AccessDenied when there is none (removed, never)."""
        user = self.accounts.get(username) if isinstance(username, str) and username else None
        if user is None:
            raise AccessDenied("you are not logged in (or your account was removed); log in again")
        return Caller(user.name, user.is_admin)

    @staticmethod
    def require_admin(caller: Caller) -> None:
        if not (isinstance(caller, Caller) and caller.admin):
            raise AccessDenied("only a studio admin can do this")

    # ---- admin ---------------------------------------------------------------------------------------------
    def users(self, caller: Caller) -> list[dict]:
        """Every account with its role and balance (never a hash)."""
        self.require_admin(caller)
        out = []
        for u in self.accounts.list():
            b = self.quotas.balance(u.name)
            out.append({"name": u.name, "role": u.role, "monthly_free": b.monthly_free, "free_left": b.free_left,
                        "credits": b.credits, "renews_on": b.renews_on.isoformat(),
                        "locked_s": round(self.accounts.locked_for(u.name))})
        return out

    def add_user(self, caller: Caller, name: str, password: str, role: str = "user") -> User:
        self.require_admin(caller)
        if normalize_username(name) == LOCAL:
            raise ConfigError(f"{LOCAL!r} names the single user of an app without accounts; pick another name")
        return self.accounts.add(name, password, role)

    def remove_user(self, caller: Caller, name: str) -> None:
        self.require_admin(caller)
        if normalize_username(name) == caller.name:
            raise ConfigError("you cannot remove your own account while logged in with it")
        self.accounts.remove(name)

    def set_password(self, caller: Caller, name: str, password: str) -> None:
        if caller.name != normalize_username(name):
            self.require_admin(caller)
        self.accounts.set_password(name, password)

    def set_monthly_free(self, caller: Caller, name: str, n: int) -> Balance:
        self.require_admin(caller)
        user = self._existing(name)
        self.quotas.set_monthly_free(user, _whole(n))
        return self.quotas.balance(user)

    def add_credits(self, caller: Caller, name: str, n: int) -> Balance:
        self.require_admin(caller)
        user = self._existing(name)
        self.quotas.add_credits(user, _whole(n), reason=f"added by {caller.name}")
        return self.quotas.balance(user)

    def usage(self, caller: Caller) -> list[dict]:
        """Per user, from the ledger: images and training runs charged (net of refunds), credits added."""
        self.require_admin(caller)
        report: dict[str, dict] = {}
        for e in self.quotas.ledger():
            r = report.setdefault(e["user"], {"user": e["user"], "free_used": 0, "credits_spent": 0,
                                              "credits_added": 0, "refunds": 0, "entries": 0})
            r["entries"] += 1
            if e["request_id"] is None:
                r["credits_added"] += e["delta_credits"]
                continue
            r["free_used"] -= e["delta_free"]
            r["credits_spent"] -= e["delta_credits"]
            r["refunds"] += e["reason"].startswith("refund")
        return sorted(report.values(), key=lambda r: r["user"])

    def _existing(self, name: str) -> str:
        user = self.accounts.get(name)
        if user is None:
            raise ConfigError(f"no user {str(name)[:40]!r}; add the account first")
        return user.name


def _whole(n) -> int:
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if isinstance(n, str) and n.strip().isdigit():
        n = int(n.strip())
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"give a whole number >= 0, not {str(n)[:20]!r}")
    return n
