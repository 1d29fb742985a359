"""Studio accounts and quotas (issue "Studio mode"): hashes, normalised names, lockout, exact charging under load."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from engine.core.errors import ConfigError
from engine.studio.accounts import MAX_FAILED, Accounts, check_password, hash_password, normalize_username
from engine.studio.quota import Policy, QuotaExceeded, Quotas


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):  # 2027-01-15
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def db(tmp_path):
    return tmp_path / "stylebooth.db"


# ---- accounts --------------------------------------------------------------------------------------------------

def test_passwords_are_salted_scrypt_hashes_never_stored_or_shown_in_clear(db):
    acc = Accounts(db)
    user = acc.add("alice", "correct horse")
    h1, h2 = hash_password("correct horse"), hash_password("correct horse")
    assert h1 != h2 and h1.startswith("scrypt$") and check_password("correct horse", h1)
    assert not check_password("correct hors", h1) and not check_password("x", "not a hash")
    stored = sqlite3.connect(db).execute("SELECT pw_hash FROM users").fetchone()[0]
    assert "correct horse" not in stored and check_password("correct horse", stored)
    assert "scrypt" not in repr(user) and "scrypt" not in repr(acc.list())  # the app never sees hashes


def test_usernames_are_nfkc_casefolded_so_lookalikes_are_one_account(db):
    """MU-8: fullwidth and case variants name the same account; they can neither register twice nor dodge it."""
    acc = Accounts(db)
    acc.add("Admin", "password1", role="admin")
    assert normalize_username("ＡＤＭＩＮ") == "admin"
    with pytest.raises(ConfigError, match="exists already"):
        acc.add("ａｄｍｉｎ", "password2")
    assert acc.authenticate("ADMIN", "password1").is_admin
    for bad in ("", " ", "a b", "../x", "x" * 33, "é", 5):
        with pytest.raises(ConfigError):
            normalize_username(bad)


def test_ten_wrong_passwords_lock_the_account_for_the_configured_time(db):
    clock = Clock()
    acc = Accounts(db, lockout_s=600, clock=clock)
    acc.add("bob", "the right one")
    for _ in range(MAX_FAILED - 1):
        assert acc.authenticate("bob", "wrong") is None
    assert acc.authenticate("bob", "the right one") is not None  # nine failures: not locked, counter resets
    for _ in range(MAX_FAILED):
        assert acc.authenticate("bob", "wrong") is None
    assert acc.authenticate("bob", "the right one") is None and acc.locked_for("bob") == 600
    clock.t += 599
    assert acc.authenticate("bob", "the right one") is None
    clock.t += 2
    assert acc.authenticate("bob", "the right one").name == "bob"
    assert acc.authenticate("nobody", "x") is None and not acc.gradio_auth("bob", "wrong")


def test_first_start_creates_an_admin_once_with_a_one_time_password(db):
    acc = Accounts(db)
    password = acc.ensure_admin()
    assert password and acc.authenticate("admin", password).is_admin
    assert acc.ensure_admin() is None  # there is an admin now
    with pytest.raises(ConfigError, match="at least 8"):
        acc.add("carol", "short")


def test_a_newer_schema_is_refused_with_a_message(db):
    Accounts(db)
    sqlite3.connect(db).execute("UPDATE studio_schema SET version = 99 WHERE component = 'accounts'").connection.commit()
    with pytest.raises(ConfigError, match="newer Stylebooth"):
        Accounts(db)


# ---- quotas ----------------------------------------------------------------------------------------------------

def ledger_sums(q: Quotas, user: str) -> tuple[int, int]:
    rows = q.ledger(user)
    return sum(r["delta_free"] for r in rows), sum(r["delta_credits"] for r in rows)


def test_500_concurrent_reservations_against_a_quota_of_100_give_exactly_100(db):
    """MU-1: 50 threads x 10 one-image reservations, quota 60 free + 40 credits: exactly 100 succeed."""
    q = Quotas(db)
    q.set_monthly_free("ann", 60)
    q.add_credits("ann", 40)
    ok, refused, errors = [], [], []
    start = threading.Barrier(50)

    def worker(t: int):
        mine = Quotas(db)  # own connection, as a request thread has
        start.wait()
        for k in range(10):
            try:
                (ok if mine.reserve("ann", f"req-{t}-{k}") else errors).append(1)
            except QuotaExceeded:
                refused.append(1)
            except Exception as e:  # noqa: BLE001 - any other outcome fails the test below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(ok), len(refused), errors) == (100, 400, [])
    b = q.balance("ann")
    assert (b.free_left, b.credits) == (0, 0)
    assert ledger_sums(q, "ann") == (-60, 0)  # credits: +40 added, -40 charged; free: 60 used this month


def test_a_failure_after_reservation_refunds_exactly_once_and_a_repeated_request_is_charged_once(db):
    q = Quotas(db)
    q.set_monthly_free("ben", 2)
    q.add_credits("ben", 10)
    assert q.reserve("ben", "r1", count=3) is True  # 2 free + 1 credit
    assert q.reserve("ben", "r1", count=3) is False  # the same request again: no second charge
    assert (q.balance("ben").free_left, q.balance("ben").credits) == (0, 9)
    assert q.refund("r1") is True and q.refund("r1") is False
    q.commit("r1")  # settled already: no effect
    assert (q.balance("ben").free_left, q.balance("ben").credits) == (2, 10)
    with pytest.raises(QuotaExceeded):  # training is paid in credits only (50 by default)
        q.reserve("ben", "r2", kind="train")
    assert ledger_sums(q, "ben") == (0, 10)


def test_training_costs_credits_and_a_too_small_balance_says_what_is_left_and_when_it_renews(db):
    q = Quotas(db, Policy(train_price=5), clock=Clock())
    q.set_monthly_free("cat", 3)
    q.add_credits("cat", 4)
    with pytest.raises(QuotaExceeded, match=r"needs 5 credits; you have 3 free generation\(s\) left this month "
                                            r"\(renews on 2027-02-01\) and 4 credit\(s\)"):
        q.reserve("cat", "t1", kind="train")
    q.add_credits("cat", 1)
    assert q.reserve("cat", "t1", kind="train") and q.balance("cat").credits == 0
    q.commit("t1")
    assert q.refund("t1") is False  # committed work is not refunded
    assert ledger_sums(q, "cat") == (0, 0)


def test_stale_reservations_are_released_at_start_up_and_the_ledger_is_append_only(db):
    q = Quotas(db)
    q.add_credits("dan", 5)
    q.reserve("dan", "a", count=2)
    q.reserve("dan", "b", count=1)
    q.commit("b")
    assert Quotas(db).release_stale() == 1  # "a" was in flight when the app stopped
    assert q.balance("dan").credits == 4 and ledger_sums(q, "dan") == (0, 4)
    con = sqlite3.connect(db)
    for sql in ("DELETE FROM ledger", "UPDATE ledger SET delta_credits = 100"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute(sql)


def test_free_generations_renew_each_month(db):
    clock = Clock()
    q = Quotas(db, clock=clock)
    q.set_monthly_free("eve", 2)
    q.reserve("eve", "x", count=2)
    assert q.balance("eve").free_left == 0
    clock.t += 31 * 86400
    assert q.balance("eve").free_left == 2 and q.balance("eve").renews_on.isoformat() == "2027-03-01"
    assert q.refund("x") and q.balance("eve").free_left == 2  # last month's free images do not come back twice
