"""The Feedback tab in studio mode, at the handler level (every call names the user, as the tab does from the
request): two users each see and rate only their own images and ratings, change and refine only styles they may
change, and a refinement is charged as a training run, refunded when it is cancelled or fails.
Tiny random SD model, random LoRA styles (tests/lora_support.py). The same over HTTP: test_feedback_http.py."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
import torch

from engine.api import Engine
from engine.core.config import Settings
from engine.core.errors import AccessDenied, ConfigError, LibraryError
from engine.core.feedback_config import RefineRequest
from tests.lora_support import ATTN, make_random_style
from ui.feedback_tab import FeedbackHandlers

TRAIN_PRICE = 50  # engine/studio/quota.Policy.train_price


@pytest.fixture(scope="module")
def studio(tiny_sd, tmp_path_factory):
    torch.set_num_threads(1)
    eng = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("fb-studio"))))
    st = eng.enable_studio()
    for name in ("ann", "bob"):
        st.accounts.add(name, f"{name}-password")
        st.quotas.set_monthly_free(name, 200)
        st.quotas.add_credits(name, 3 * TRAIN_PRICE)
    st.accounts.add("boss", "boss-password", role="admin")
    eng.ann_style = make_random_style(eng.model, eng.data_dir, "Ann look", seed=3, unet_targets=ATTN, scale=0.5)
    eng.shared_style = make_random_style(eng.model, eng.data_dir, "Ann shared", seed=4, unet_targets=ATTN, scale=0.5)
    for s in (eng.ann_style, eng.shared_style):
        eng.library.set_owner(s.id, "ann")
    eng.library.set_shared(eng.shared_style.id, True)
    return eng


def _round(h, ref, user, n=2):
    out = h.new_round(ref, "a photo of a shape", 0, n, False, user=user)
    return out["round"]


def test_each_user_sees_rates_and_exports_only_their_own(studio):
    eng, h = studio, FeedbackHandlers(studio)
    ann_ref, shared_ref = f"{eng.ann_style.id}@v1", f"{eng.shared_style.id}@v1"
    assert {ann_ref, shared_ref} <= {v for _, v in h.version_choices("ann")}
    assert ann_ref not in {v for _, v in h.version_choices("bob")} and shared_ref in {v for _, v in
                                                                                      h.version_choices("bob")}
    ra = _round(h, ann_ref, "ann")
    assert ra.user == "ann" and all("/outputs/ann/" in str(p) for p in ra.paths)
    h.select(0, ra)
    assert h.rate("up", "warm", rnd=ra, user="ann")["status"].startswith("image 1: 5/5")
    h.rate("down", rnd=ra, index=1, user="ann")
    # bob holding ann's round (a stolen session state) still cannot rate her images: the engine checks the path
    with pytest.raises(gr.Error, match="not one of your outputs"):
        h.rate("up", rnd=ra, index=0, user="bob")
    with pytest.raises(ConfigError, match="your outputs"):
        eng.remove_rating(ra.paths[0], user="bob")
    # bob cannot list, summarise, export or read the defaults of ann's private style ("unknown", as for no style)
    for call in (lambda: h.ratings_table(ann_ref, "bob"), lambda: h.history(ann_ref, "bob"),
                 lambda: h.export(ann_ref, "bob"), lambda: h.load_defaults(ann_ref, "bob")):
        with pytest.raises(gr.Error, match="unknown style"):
            call()
    with pytest.raises(AccessDenied, match="your own ratings"):
        eng.list_ratings(user="bob", rater="ann")
    with pytest.raises(AccessDenied):
        eng.export_ratings(user="bob", rater="ann")
    assert eng.list_ratings(user="bob") == [] and eng.list_ratings(eng.ann_style.id, user="boss", rater="ann")
    assert json.loads(Path(h.export("", "bob")["export"]).read_text())["ratings"] == []
    # on the shared style both rate; each sees only their own ratings
    rs_a, rs_b = _round(h, shared_ref, "ann", 1), _round(h, shared_ref, "bob", 2)
    h.rate(4, rnd=rs_a, index=0, user="ann")
    h.rate(5, rnd=rs_b, index=0, user="bob")
    h.rate(1, rnd=rs_b, index=1, user="bob")
    assert [row[3] for row in h.ratings_table(shared_ref, "ann")] == [4]
    assert [row[3] for row in h.ratings_table(shared_ref, "bob")] == [5, 1]
    assert list(h.history(shared_ref, "bob")["history"]["ratings"]) == [2]
    doc = json.loads(Path(h.export(shared_ref, "bob")["export"]).read_text())
    assert {r["user"] for r in doc["ratings"]} == {"bob"} and len(doc["ratings"]) == 2
    assert {r.user for r in eng.list_ratings(eng.shared_style.id, user="boss")} == {"ann", "bob"}  # admin: all


def test_only_the_owner_changes_defaults_refines_or_reverts(studio):
    eng, h = studio, FeedbackHandlers(studio)
    ann_ref, shared_ref = f"{eng.ann_style.id}@v1", f"{eng.shared_style.id}@v1"
    credits = eng.balance("bob").credits
    for ref, words in ((ann_ref, "unknown style"), (shared_ref, "only its owner or an admin")):
        with pytest.raises(gr.Error, match=words):
            h.save_defaults(ref, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0, user="bob")
        with pytest.raises(gr.Error, match=words):
            list(h.refine(ref, 5, 2000.0, user="bob"))
        with pytest.raises(gr.Error, match=words):
            h.revert(ref, user="bob")
    assert eng.balance("bob").credits == credits  # refused refinements cost nothing
    eng.studio.accounts.add("cat", "cat-password")  # no credits at all: still told why, not "no credits"
    with pytest.raises(AccessDenied, match="only its owner or an admin"):
        eng.refine(RefineRequest(shared_ref, steps=3), user="cat")
    assert h.load_defaults(shared_ref, "bob")["block_down"] == 1.0  # bob may read a shared style's defaults
    assert "saved" in h.save_defaults(shared_ref, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, user="ann")["status"]
    assert eng.version_defaults(shared_ref, user="bob")["blocks"]["down"] == 0.5
    eng.set_version_defaults(shared_ref, user="boss")  # an admin may


def test_refine_is_charged_as_training_refunded_on_cancel_and_failure_and_learns_from_own_ratings(studio):
    eng, h = studio, FeedbackHandlers(studio)
    shared_ref = f"{eng.shared_style.id}@v1"
    rs = _round(h, shared_ref, "ann", 2)
    h.rate("up", rnd=rs, index=0, user="ann")
    h.rate("down", rnd=rs, index=1, user="ann")
    h.rate("up", rnd=_round(h, shared_ref, "bob", 1), index=0, user="bob")  # bob's rating: not ann's to learn from
    before = eng.balance("ann").credits

    def cancel_at_2(e):
        if type(e).__name__ == "TrainProgress" and e.step >= 2:
            eng.cancel(kind="refine", user="ann")

    res = eng.refine(RefineRequest(shared_ref, steps=30), cancel_at_2, user="ann")
    assert res.cancelled and eng.balance("ann").credits == before  # refunded
    unrated = make_random_style(eng.model, eng.data_dir, "Ann unrated", seed=6, unet_targets=ATTN, scale=0.5)
    eng.library.set_owner(unrated.id, "ann")
    with pytest.raises(ConfigError, match="at least one liked image"):  # a failed refinement
        eng.refine(RefineRequest(f"{unrated.id}@v1", steps=3), user="ann")
    assert eng.balance("ann").credits == before  # refunded
    res = eng.refine(RefineRequest(shared_ref, steps=3), user="ann")
    assert not res.cancelled and res.style.version == 2
    assert eng.balance("ann").credits == before - TRAIN_PRICE  # charged one training run
    # ann's refinement used ann's ratings of v1 only, not bob's
    own = eng.list_ratings(eng.shared_style.id, 1, user="ann")
    assert {r.user for r in eng.list_ratings(eng.shared_style.id, 1, user="boss")} == {"ann", "bob"}
    assert (res.liked, res.disliked) == (sum(r.liked for r in own), sum(r.disliked for r in own)) != (0, 0)
    assert eng.library.get(eng.shared_style.id).owner == "ann"  # the new version stays in ann's style
    reasons = [r["reason"] for r in eng.studio.quotas.ledger("ann")]
    assert reasons.count("reserve train x1") == 3
    with pytest.raises(LibraryError):
        eng.revert_version(eng.ann_style.id, 1, user="bob")
    assert "v1 is the newest again" in h.revert(f"{eng.shared_style.id}@v2", user="ann")["status"]


def test_refine_trains_in_the_loaded_model_as_a_fresh_copy_would_and_leaves_it_unchanged(studio):
    """Point 4: Refine trains v(N)'s adapter inside the loaded model (no second base model in memory): the new
    version equals one trained on a fresh copy of the base model, and v(N) generates bit for bit as before."""
    import numpy as np
    from safetensors.torch import load_file

    from engine.core.config import GenerateRequest
    from engine.feedback.refine import refine

    eng, h = studio, FeedbackHandlers(studio)
    style = make_random_style(eng.model, eng.data_dir, "Equal", seed=8, unet_targets=ATTN, scale=0.5)
    ref = f"{style.id}@v1"
    rs = _round(h, ref, "boss", 2)
    h.rate("up", rnd=rs, index=0, user="boss")
    h.rate("down", rnd=rs, index=1, user="boss")
    req = GenerateRequest(prompt="a photo of a shape", style=ref, seed=11, num_inference_steps=4)
    before = np.asarray(eng.generate(req, user="boss").images[0].image)  # v1 active and fused in the live model
    live = eng.refine(RefineRequest(ref, steps=3), user="boss")
    after = np.asarray(eng.generate(req, user="boss").images[0].image)
    assert np.array_equal(before, after)  # the cached v1 adapter is exactly v1 again
    copy = refine(eng.model.source, eng.data_dir, eng.library, eng.list_ratings(style.id, 1, user="boss"),
                  RefineRequest(ref, steps=3), eng.library.find_version(ref))  # the old way: a second model
    a, b = load_file(str(live.style.lora)), load_file(str(copy.style.lora))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert max(float((a[k] - load_file(str(eng.library.find_version(ref).lora))[k]).abs().max()) for k in a) > 0


def test_a_cancelled_or_interrupted_refine_resumes_exactly_and_only_for_its_owner(studio):
    """Point 4: cancel a 6-step refinement at step 3, resume it: the new version equals an uninterrupted 6-step run
    (LoRA, AdamW state and both random generators come back from the checkpoint). A run left `running` by a dead
    worker is offered as interrupted. Another user neither sees nor resumes it; a finished run is not offered."""
    from safetensors.torch import load_file

    from engine.jobs import state as jobs

    eng, h = studio, FeedbackHandlers(studio)
    style = make_random_style(eng.model, eng.data_dir, "Resume me", seed=9, unet_targets=ATTN, scale=0.5)
    eng.library.set_owner(style.id, "ann")
    ref = f"{style.id}@v1"
    rs = _round(h, ref, "ann", 2)
    h.rate("up", rnd=rs, index=0, user="ann")
    h.rate("down", rnd=rs, index=1, user="ann")
    req = RefineRequest(ref, steps=6, checkpoint_every=2)
    whole = load_file(str(eng.refine(req, user="ann").style.lora))
    eng.revert_version(style.id, 2, user="ann")

    def cancel_at_3(e):
        if type(e).__name__ == "TrainProgress" and e.step >= 3:
            eng.cancel(kind="refine", user="ann")

    assert eng.refine(req, cancel_at_3, user="ann").cancelled
    runs = eng.resumable_refines(user="ann")
    assert [(r["style"], r["state"], r["step"], r["total"]) for r in runs[:1]] == [(ref, "cancelled", 3, 6)]
    run_id = runs[0]["run_id"]
    assert run_id not in {r["run_id"] for r in eng.resumable_refines(user="bob")}
    with pytest.raises(ConfigError, match="no longer resumable"):
        eng.resume_refine(run_id, user="bob")
    # a worker that died mid-run (job.json still says running, its pid is gone): offered as interrupted
    jobs.write_job(eng.data_dir / "runs" / run_id, "running")
    job = jobs.read_job(eng.data_dir / "runs" / run_id)
    (eng.data_dir / "runs" / run_id / "job.json").write_text(json.dumps({**job, "pid": 0}))
    assert eng.resumable_refines(user="ann")[0]["state"] == "interrupted"
    credits = eng.balance("ann").credits
    updates = list(h.resume(run_id, user="ann"))
    assert "v2 made" in updates[-1]["status"] and eng.balance("ann").credits == credits - TRAIN_PRICE
    resumed = load_file(str(eng.library.find_version(f"{style.id}@v2").lora))
    print("resume vs uninterrupted:", max(float((whole[k] - resumed[k]).abs().max()) for k in whole))
    assert max(float((whole[k] - resumed[k]).abs().max()) for k in whole) < 1e-6
    assert run_id not in {r["run_id"] for r in eng.resumable_refines(user="ann")}  # done: not offered again
