"""The Feedback tab in studio mode over HTTP, against a really launched app (`launcher.py --listen`, reached at
127.0.0.1 only) with two accounts, ann and bob, and a style of ann's (a random LoRA on the demo model).

ann makes a round and rates it through the tab's own events; bob cannot list, read, change, delete, export or
refine ann's ratings and style, not even replaying her browser session id; a request without a session is refused;
ann's refinement is charged as one training run. Events are called as the page calls them (/config, queue/join),
including `api_visibility="private"` ones."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from http_support import launched_app, page_values

TRAIN_PRICE = 50  # engine/studio/quota.Policy.train_price


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import torch

    from engine.models.loading import load_base_model
    from engine.studio.accounts import Accounts
    from engine.studio.quota import Quotas
    from engine.styles.library import Library
    from lora_support import ATTN, make_random_style

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fb-http")
    with launched_app(root, "--listen") as a:
        db = a.data_dir / "stylebooth.db"
        acc, quotas = Accounts(db), Quotas(db)
        for name in ("ann", "bob"):
            acc.add(name, f"{name}-password")
            quotas.set_monthly_free(name, 40)
            quotas.add_credits(name, 2 * TRAIN_PRICE)
        style = make_random_style(load_base_model(None), a.data_dir, "Ann look", seed=7, unet_targets=ATTN,
                                  scale=0.3)
        lib = Library(a.data_dir, adopt=False)
        lib.set_owner(style.id, "ann")
        lib.close()
        a.ref = f"{style.id}@v1"
        a.client = a.login("admin", a.one_time_password())  # reads /config
        a.ann, a.bob = a.login("ann", "ann-password"), a.login("bob", "bob-password")
        a.quotas = quotas
        yield a



def _call(app, http, key: str, trigger: str, overrides: dict, session: str, event_data=None, timeout_s=300) -> dict:
    """One event through the queue as the page sends it, in browser session `session` (its gr.State lives there)."""
    fn = app.fn_index(key, trigger)
    r = http.post("/gradio_api/queue/join", json={"data": page_values(app, fn, overrides), "fn_index": fn,
                                                  "session_hash": session, "event_data": event_data,
                                                  "trigger_id": None})
    r.raise_for_status()
    with http.stream("GET", f"/gradio_api/queue/data?session_hash={session}",
                     timeout=httpx.Timeout(timeout_s, connect=30)) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError(f"{key} {trigger}: no result")


def _open_tab(app, http, session: str) -> None:
    """What the browser does when the Feedback tab opens: fill its version picker for this user and session (the
    picker then accepts only those versions)."""
    _ok(_call(app, http, "tab-feedback", "select", {}, session))


def _ok(msg) -> dict:
    assert msg["success"], msg.get("output")
    return msg["output"]


def _error(msg) -> str:
    assert not msg["success"], msg
    return json.dumps(msg)


def _ratings(app, user=None):
    from engine.feedback.ratings import Ratings
    from engine.styles.db import Database

    db = Database(app.data_dir / "stylebooth.db")
    try:
        return Ratings(db, app.data_dir).list(user=user)
    finally:
        db.close()


def test_without_a_session_feedback_events_are_refused(app):
    fn = app.fn_index("fb-up", "click")
    with httpx.Client(base_url=app.url, timeout=30) as anon:
        r = anon.post("/gradio_api/queue/join", json={"data": [None, None, None], "fn_index": fn,
                                                      "session_hash": "x", "event_data": None})
        assert r.status_code in (401, 403)
        r = anon.post("/gradio_api/run/predict", json={"data": [], "fn_index": fn, "session_hash": "x"})
        assert r.status_code in (401, 403)
    with httpx.Client(base_url=app.url, timeout=30, cookies={"access-token": "forged"}) as forged:
        assert forged.get("/config").status_code in (401, 403)


def test_two_users_each_rate_and_see_only_their_own(app):
    ann_session, bob_session = uuid.uuid4().hex, uuid.uuid4().hex
    _open_tab(app, app.ann, ann_session)
    _open_tab(app, app.bob, bob_session)
    out = _ok(_call(app, app.ann, "fb-round", "click", {"fb-style": app.ref, "fb-prompts": "a photo of a shape"},
                    ann_session))
    assert "images" in json.dumps(out)
    for i, key in ((0, "fb-up"), (1, "fb-star-2")):
        _ok(_call(app, app.ann, "fb-gallery", "select", {}, ann_session, {"index": i, "value": None}))
        status = json.dumps(_ok(_call(app, app.ann, key, "click", {"fb-style": app.ref}, ann_session)))
        assert f"image {i + 1}: {5 if i == 0 else 2}/5" in status
    mine = _ratings(app, "ann")
    assert [r.rating for r in mine] == [5, 2] and all(r.image.startswith("outputs/ann/") for r in mine)
    # bob, in his own session, has no round: nothing to rate
    assert "click an image" in _error(_call(app, app.bob, "fb-up", "click", {"fb-style": None}, bob_session))
    # bob replaying ann's browser session id reaches her round's server-side paths, but the engine rates as the
    # logged-in user, and ann's images are not bob's outputs
    for key in ("fb-up", "fb-star-1"):
        err = _error(_call(app, app.bob, key, "click", {"fb-style": app.ref}, ann_session))
        assert "not one of your outputs" in err
    assert [r.rating for r in _ratings(app, "ann")] == [5, 2] and _ratings(app, "bob") == []
    # bob cannot list, read or export ann's ratings of her style: his own session's picker does not offer it, and
    # in ann's replayed session the engine answers "unknown style", as for an id that is not there
    for key, trigger in (("fb-style", "change"), ("fb-export", "click")):
        for session, words in ((bob_session, "not in the list of choices"), (ann_session, "unknown style")):
            err = _error(_call(app, app.bob, key, trigger, {"fb-style": app.ref}, session))
            assert words in err and "Ann look" not in err and "photo of" not in err, (key, session)
    # bob's own export is empty; ann's holds her two ratings
    files = _ok(_call(app, app.bob, "fb-export", "click", {"fb-style": None}, bob_session))["data"][0]
    assert json.loads(Path(files["path"]).read_text())["ratings"] == []
    files = _ok(_call(app, app.ann, "fb-export", "click", {"fb-style": app.ref}, ann_session))["data"][0]
    assert [r["rating"] for r in json.loads(Path(files["path"]).read_text())["ratings"]] == [5, 2]
    table = json.dumps(_ok(_call(app, app.ann, "fb-style", "change", {"fb-style": app.ref}, ann_session)))
    assert "a photo of" in table


def test_bob_cannot_change_refine_or_revert_anns_style_and_ann_pays_for_refining(app):
    bob_session, ann_session = uuid.uuid4().hex, uuid.uuid4().hex
    _open_tab(app, app.ann, ann_session)
    _open_tab(app, app.bob, bob_session)
    bob_credits = app.quotas.balance("bob").credits
    for key, extra in (("fb-defaults", {"fb-down-w": 0.0}), ("fb-refine", {}), ("fb-revert", {"fb-new": app.ref})):
        # bob's own session: his picker does not offer ann's style; ann's replayed session (the picker offers it):
        # refused by the engine, as the user logged in
        for session, words in ((bob_session, "not in the list of choices"), (ann_session, "unknown style")):
            if key == "fb-revert" and session == bob_session:
                words = "unknown style"  # the New version box is free text: straight to the engine
            err = _error(_call(app, app.bob, key, "click", {"fb-style": app.ref, **extra}, session))
            assert words in err and "Ann look" not in err, (key, session)
    assert app.quotas.balance("bob").credits == bob_credits
    ann_credits = app.quotas.balance("ann").credits
    mine = [(r.style_id, r.style_version, r.rating) for r in _ratings(app, "ann")]
    assert any(f"{sid}@v{v}" == app.ref and rating >= 4 for sid, v, rating in mine), mine  # test 2's like is there
    out = json.dumps(_ok(_call(app, app.ann, "fb-refine", "click", {"fb-style": app.ref, "fb-steps": 5},
                               ann_session, timeout_s=600)))
    assert "v2 made from 1 liked / 1 disliked" in out, out
    assert app.quotas.balance("ann").credits == ann_credits - TRAIN_PRICE
    assert "saved" in json.dumps(_ok(_call(app, app.ann, "fb-defaults", "click",
                                           {"fb-style": app.ref, "fb-up-w": 0.5}, ann_session)))
