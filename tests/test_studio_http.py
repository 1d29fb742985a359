"""Studio mode over HTTP, against a really launched app (`launcher.py --listen`, reached at 127.0.0.1 only).

Two logged-in users, ann and bob, plus the admin the launcher created. Every route needs a session; neither user
can list, read, change, use, export or delete the other's styles, nor reach outputs, the database or the data dir
through `/gradio_api/file=` (traversal variants too); a non-admin calling a Studio-tab event directly is refused;
`Host: localhost` / `X-Forwarded-For: 127.0.0.1` give nothing; ten wrong passwords lock an account; no hash ever
appears in what the app prints or shows.
"""
from __future__ import annotations

import json
import sqlite3

import httpx
import pytest

from http_support import launched_app, owned_style

from engine.studio.accounts import MAX_FAILED, Accounts
from engine.styles.library import Library

LOCAL_HEADERS = {"Host": "localhost", "X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1",
                 "Forwarded": "for=127.0.0.1"}


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    with launched_app(root, "--listen") as app:
        acc = Accounts(app.data_dir / "stylebooth.db")
        acc.add("ann", "ann-password")
        acc.add("Bob", "bob-password")
        acc.add("carl", "carl-password")
        ids = {"ann": owned_style(app.data_dir, root, "Ann private", "ann", weights=b"weights of Ann private"),
               "bob": owned_style(app.data_dir, root, "Bob private", "bob", weights=b"weights of Bob private"),
               "shared": owned_style(app.data_dir, root, "Bob shared", "bob", weights=b"weights of Bob shared", shared=True)}
        app.client = app.login("admin", app.one_time_password())
        app.ann = app.login("ann", "ann-password")
        app.bob = app.login("BOB", "bob-password")  # MU-8: the same account
        app.ids = ids
        yield app


def _values(app, fn: int, overrides: dict[str, object]) -> list:
    """The inputs of event `fn` as the page would send them: each component's value, or overrides[elem_id]."""
    cfg = app.config()
    comps = {c["id"]: c for c in cfg["components"]}
    dep = next(d for d in cfg["dependencies"] if d["id"] == fn)
    out = []
    for cid in dep["inputs"]:
        props = comps[cid].get("props", {})
        out.append(overrides.get(props.get("elem_id"), props.get("value")))
    return out


def _list(app, http, show="active") -> str:
    fn = app.fn_index("lib-refresh", "click")
    msg = app.call(fn, _values(app, fn, {"lib-show": show}), http=http)
    assert msg["success"], msg
    return json.dumps(msg["output"])


def test_without_a_session_every_route_is_refused_whatever_the_headers(studio):
    for headers in ({}, LOCAL_HEADERS):
        with httpx.Client(base_url=studio.url, headers=headers, timeout=30) as anon:
            assert anon.get("/config").status_code in (401, 403)
            assert anon.get("/gradio_api/info").status_code in (401, 403)
            assert anon.post("/gradio_api/upload", files=[("files", ("a.txt", b"x"))]).status_code in (401, 403)
            r = anon.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
            assert r.status_code in (401, 403)
            r = anon.get(f"/gradio_api/file={studio.data_dir / 'stylebooth.db'}")
            assert r.status_code in (401, 403) and b"SQLite" not in r.content
            assert anon.get("/monitoring").status_code in (401, 403, 404)


def test_each_user_lists_only_their_own_styles_and_the_shared_ones(studio):
    ids = studio.ids
    ann, bob = _list(studio, studio.ann), _list(studio, studio.bob)
    assert ids["ann"] in ann and ids["shared"] in ann and ids["bob"] not in ann and "Bob private" not in ann
    assert ids["bob"] in bob and ids["shared"] in bob and ids["ann"] not in bob and "Ann private" not in bob
    admin = _list(studio, studio.http)
    assert all(i in admin for i in ids.values())
    # Headers that claim a local client give no privileges
    with httpx.Client(base_url=studio.url, headers=LOCAL_HEADERS, cookies=studio.ann.cookies, timeout=60) as spoof:
        listed = _list(studio, spoof)
    assert ids["bob"] not in listed and ids["ann"] in listed


def test_another_users_style_cannot_be_read_changed_exported_or_deleted(studio):
    bob_id = studio.ids["bob"]
    for key, trigger, extra in (("lib-style", "change", {}), ("lib-delete", "click", {}),
                                ("lib-save-tags", "click", {"lib-tags": "mine"}), ("lib-export", "click", {}),
                                ("lib-share", "click", {}), ("lib-undo", "click", {})):
        fn = studio.fn_index(key, trigger)
        msg = studio.call(fn, _values(studio, fn, {"lib-style": bob_id, **extra}), http=studio.ann)
        assert not msg["success"], (key, msg)
        assert "Bob private" not in json.dumps(msg)
    lib = Library(studio.data_dir, adopt=False)
    s = lib.get(bob_id)
    assert not s.trashed and s.tags == () and not s.shared
    lib.close()


def test_generating_with_another_users_style_is_refused_and_quotas_apply(studio):
    fn = studio.fn_index("generate", "click")
    base = {"prompt": "a red circle on a blue background", "steps": 2}
    msg = studio.call(fn, _values(studio, fn, {**base, "style": studio.ids["bob"]}), http=studio.ann)
    assert not msg["success"] and "Bob private" not in json.dumps(msg)
    # ann has no free generations yet: a clear message, nothing generated
    msg = studio.call(fn, _values(studio, fn, base), http=studio.ann)
    assert not msg["success"]
    err = msg["output"].get("error") or ""
    assert "free generation(s) left this month (renews on" in err and "credit" in err, msg
    Accounts  # the admin gives ann two images a month through the Studio tab, as ann could not
    q = studio.fn_index("studio-quota", "click")
    vals = _values(studio, q, {"studio-name": "ann", "studio-number": 2})
    assert not studio.call(q, vals, http=studio.ann)["success"]  # non-admin: refused on the server
    assert studio.call(q, vals, http=studio.http)["success"]
    msg = studio.call(fn, _values(studio, fn, base), http=studio.ann)
    assert msg["success"], msg
    outputs = list((studio.data_dir / "outputs" / "ann").rglob("*.png"))
    assert len(outputs) == 1
    # ann's output file on the server: blocked for everyone (the data dir is never served), traversal too
    for who in (studio.bob, studio.ann):
        for path in (str(outputs[0]), f"{studio.data_dir}/gradio-tmp/../outputs/ann/{outputs[0].parent.name}/"
                     f"{outputs[0].name}", str(outputs[0]).replace("/outputs/", "/outputs/./"),
                     str(studio.data_dir / "stylebooth.db"), "../outputs/ann", "..%2F..%2Foutputs"):
            r = who.get(f"/gradio_api/file={path}")
            assert r.status_code in (400, 403, 404), (path, r.status_code)
            assert not r.content.startswith(b"\x89PNG") and b"SQLite format" not in r.content
    # bob's listing of the same event shows nothing of ann's
    assert "ann" not in json.dumps(studio.call(studio.fn_index("lib-refresh", "click"),
                                               _values(studio, studio.fn_index("lib-refresh", "click"), {}),
                                               http=studio.bob)["output"]["data"][2])


def test_a_non_admin_calling_studio_tab_events_directly_is_refused(studio):
    for key in ("studio-add", "studio-remove", "studio-credits", "studio-passwd", "studio-refresh"):
        fn = studio.fn_index(key, "click")
        vals = _values(studio, fn, {"studio-name": "mallory", "studio-password": "mallory-password",
                                    "studio-number": 1000})
        msg = studio.call(fn, vals, http=studio.bob)
        assert not msg["success"], (key, msg)
        assert "admin" in (msg["output"].get("error") or ""), msg
    acc = Accounts(studio.data_dir / "stylebooth.db")
    assert acc.get("mallory") is None and acc.get("ann") is not None
    # the admin can, and the users table shows no hash
    fn = studio.fn_index("studio-refresh", "click")
    msg = studio.call(fn, [], http=studio.http)
    assert msg["success"] and "ann" in json.dumps(msg) and "scrypt" not in json.dumps(msg)


def test_ten_wrong_passwords_lock_the_account_and_hashes_never_show(studio):
    for _ in range(MAX_FAILED):
        r = httpx.post(studio.url + "/login", data={"username": "carl", "password": "wrong"})
        assert r.status_code >= 400
    r = httpx.post(studio.url + "/login", data={"username": "carl", "password": "carl-password"})
    assert r.status_code >= 400  # locked: the right password is refused too
    assert Accounts(studio.data_dir / "stylebooth.db").locked_for("carl") > 0
    hashes = [h for (h,) in sqlite3.connect(studio.data_dir / "stylebooth.db").execute("SELECT pw_hash FROM users")]
    seen = studio.output + json.dumps(studio.config())
    assert "scrypt$" not in seen and not any(h in seen for h in hashes)
