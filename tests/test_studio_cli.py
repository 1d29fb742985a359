"""Studio mode, point 1: the admin command line (`python launcher.py users ...`) and what --listen/--share print
and pass to Gradio. In-process and torch-free except the last test, which builds the app."""
from __future__ import annotations

import io
import sqlite3
import sys

import pytest

import launcher
from engine.studio.accounts import Accounts
from engine.studio.quota import Quotas


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STYLEBOOTH_CONFIG_DIR", str(tmp_path / "cfg"))
    data = tmp_path / "data"

    def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = launcher.main(["users", "--data-dir", str(data), *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    run.db = data / "stylebooth.db"
    return run


def test_users_add_list_passwd_remove_on_the_apps_database(cli):
    assert cli("add", "Ann", stdin="ann-password\n")[0] == 0
    assert cli("add", "boss", "--admin", stdin="boss-password\n")[0] == 0
    acc = Accounts(cli.db)
    assert acc.authenticate("ann", "ann-password").role == "user"
    assert acc.authenticate("BOSS", "boss-password").is_admin
    code, out, _ = cli("list")
    assert code == 0 and "ann" in out and "boss" in out and "admin" in out
    assert "scrypt" not in out and "ann-password" not in out  # never a hash or a password
    assert cli("passwd", "ann", stdin="new-password\n")[0] == 0
    assert acc.authenticate("ann", "new-password") and not acc.authenticate("ann", "ann-password")
    assert cli("remove", "ann")[0] == 0
    assert acc.get("ann") is None


def test_users_quota_and_credits_go_through_the_ledger(cli):
    cli("add", "ann", stdin="ann-password\n")
    code, out, _ = cli("set-quota", "ann", "20")
    assert code == 0 and "20 free generations a month" in out
    code, out, _ = cli("add-credits", "ann", "7")
    assert code == 0 and "7 credits" in out
    q = Quotas(cli.db)
    b = q.balance("ann")
    assert (b.monthly_free, b.free_left, b.credits) == (20, 20, 7)
    assert [e["delta_credits"] for e in q.ledger("ann")] == [7]


def test_users_command_refuses_bad_input_with_messages(cli):
    assert cli("add", "ann", stdin="short\n")[2].count("at least 8 characters") == 1
    code, _, err = cli("add", "local", stdin="long-enough\n")
    assert code == 2 and "single user of an app without accounts" in err
    code, _, err = cli("set-quota", "nobody", "3")
    assert code == 2 and "no user 'nobody'" in err
    cli("add", "ann", stdin="long-enough\n")
    for bad in ("-1", "x", "1.5"):
        code, _, err = cli("add-credits", "ann", bad)
        assert code == 2 and "whole number" in err, bad
    code, _, err = cli("add")
    assert code == 2 and "needs a NAME" in err
    with pytest.raises(SystemExit):  # no password on the command line: there is no such argument
        cli("add", "bob", "--password", "x")


def test_auth_flags_were_replaced_by_accounts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STYLEBOOTH_CONFIG_DIR", str(tmp_path / "cfg"))
    assert launcher.main(["--share", "--auth", "a:b", "--data-dir", str(tmp_path / "d")]) == 2
    assert "replaced by studio accounts" in capsys.readouterr().err


def test_share_without_users_creates_the_admin_and_uses_accounts_for_the_login(tmp_path, monkeypatch, capsys):
    """--share (no network here: launch() is caught) makes the admin, prints how to log in once, and hands
    Gradio the accounts' check as `auth`; the next start finds the admin and prints no password."""
    import gradio as gr

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw))
    monkeypatch.setenv("STYLEBOOTH_CONFIG_DIR", str(tmp_path / "cfg"))
    args = ["--share", "--no-browser", "--data-dir", str(tmp_path / "d")]
    assert launcher.main(args) == 0
    out = capsys.readouterr()
    assert "log in as: admin" in out.out and "One-time password: " in out.out
    password = out.out.split("One-time password: ", 1)[1].split()[0]
    assert seen["share"] is True and seen["auth"].__name__ == "gradio_auth"
    assert seen["auth"]("admin", password) and not seen["auth"]("admin", "wrong")
    assert "Studio mode" in out.err and "scrypt" not in out.out + out.err
    stored = sqlite3.connect(tmp_path / "d" / "stylebooth.db").execute("SELECT pw_hash FROM users").fetchone()[0]
    assert stored not in out.out + out.err
    assert launcher.main(args) == 0
    assert "One-time password" not in capsys.readouterr().out
