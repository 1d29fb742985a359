"""Studio mode in the engine: ownership of styles and runs checked on every call, quotas around every job (reserve
before GPU work, commit on success, refund exactly once on failure or cancel), jobs by user. No model needed."""
from __future__ import annotations

import json
import threading

import pytest

from engine.api import Engine
from engine.api.support import charged as _charged
from engine.core.caller import Caller
from engine.core.config import GenerateRequest, Settings
from engine.core.errors import AccessDenied, ConfigError, LibraryError
from engine.core.events import GeneratedImage, GenerateResult
from engine.styles.store import publish
from engine.studio.quota import QuotaExceeded


def _publish(data, tmp, name, owner, shared=False):
    lora, meta = tmp / f"{name}.safetensors", tmp / f"{name}.json"
    lora.write_bytes(b"weights")
    meta.write_text(json.dumps({"schema_version": 1, "trigger_token": "olis", "preset": "style",
                                "base_model": "demo", "base_model_fingerprint": "fp"}))
    info = publish(data, name, lora, meta)
    return info.id


class FakeJobs(Engine):
    """An Engine whose generate is the real wrapper around a stand-in body (no model): it fails or is cancelled
    on request, so the charging around it can be checked."""

    outcome = "ok"

    @_charged("generate")
    def generate(self, req, on_progress=None, *, user="local", job_id=None):
        self.seen_user = user
        if self.outcome == "fail":
            raise RuntimeError("the GPU fell over")
        with self._job("generate", user, job_id):
            n = req.num_images
            return GenerateResult([GeneratedImage(None, {}, None)] * n if self.outcome == "ok" else [],
                                  cancelled=self.outcome == "cancel")


@pytest.fixture
def studio_engine(tmp_path):
    eng = FakeJobs(Settings(data_dir=str(tmp_path / "data")))
    studio = eng.enable_studio()
    studio.accounts.add("ann", "ann-password")
    studio.accounts.add("bob", "bob-password")
    studio.accounts.add("boss", "boss-password", role="admin")
    ids = {"ann": _publish(eng.data_dir, tmp_path, "Ann style", "ann"),
           "bob": _publish(eng.data_dir, tmp_path, "Bob style", "bob"),
           "shared": _publish(eng.data_dir, tmp_path, "Bob shared", "bob")}
    eng.library.set_owner(ids["ann"], "ann")
    eng.library.set_owner(ids["bob"], "bob")
    eng.library.set_owner(ids["shared"], "bob")
    eng.library.set_shared(ids["shared"], True)
    eng.ids = ids
    return eng


def test_each_user_lists_their_own_styles_and_the_shared_ones_admins_all(studio_engine):
    e, ids = studio_engine, studio_engine.ids
    assert {s.id for s in e.library_list(user="ann")} == {ids["ann"], ids["shared"]}
    assert {s.id for s in e.library_list(user="BOB")} == {ids["bob"], ids["shared"]}  # MU-8: one account
    assert {s.id for s in e.library_list(user="boss")} == set(ids.values())
    assert {s.id for s in e.list_styles(user="ann")} == {ids["ann"], ids["shared"]}


def test_another_users_style_cannot_be_read_changed_used_or_deleted(studio_engine):
    e, bob = studio_engine, studio_engine.ids["bob"]
    for call in (lambda: e.get_style(bob, user="ann"), lambda: e.rename_style(bob, "mine", user="ann"),
                 lambda: e.tag_style(bob, "x", user="ann"), lambda: e.delete_style(bob, user="ann"),
                 lambda: e.archive_style(bob, user="ann"), lambda: e.share_style(bob, user="ann"),
                 lambda: e.export_style(bob, user="ann"), lambda: e.style_versions(bob, user="ann"),
                 lambda: e.generate(GenerateRequest(prompt="x", style=bob), user="ann"),
                 lambda: e.generate(GenerateRequest(prompt="x", style=f"{bob}@v1"), user="ann")):
        with pytest.raises(LibraryError, match="unknown style"):  # the same words as for an id that is not there
            call()
    assert e.library.get(bob).name == "Bob style" and not e.library.get(bob).trashed


def test_a_shared_style_is_usable_by_all_and_changeable_only_by_its_owner_or_an_admin(studio_engine):
    e, shared = studio_engine, studio_engine.ids["shared"]
    assert e.get_style(shared, user="ann").owner == "bob"
    e.outcome = "ok"
    assert e.generate(GenerateRequest(prompt="x", style=shared), user="boss").images
    with pytest.raises(AccessDenied, match="only its owner or an admin"):
        e.rename_style(shared, "stolen", user="ann")
    with pytest.raises(AccessDenied):
        e.delete_style(shared, user="ann")
    assert e.rename_style(shared, "renamed by admin", user="boss").name == "renamed by admin"
    e.delete_style(shared, user="bob")
    assert shared not in {s.id for s in e.library_list(user="ann")}  # trashed: no longer shared
    assert e.empty_trash(user="ann") == 0 and e.library.get(shared).trashed  # not ann's trash to empty
    assert e.empty_trash(user="bob") == 1


def test_unknown_or_removed_users_and_local_are_refused_in_studio_mode(studio_engine):
    e = studio_engine
    for who in ("local", "nobody", "", None, "../ann"):
        with pytest.raises(AccessDenied):
            e.library_list(user=who)
    e.studio.accounts.remove("ann")
    with pytest.raises(AccessDenied, match="log in again"):
        e.library_list(user="ann")


def test_without_accounts_the_local_user_owns_everything_and_pays_nothing(tmp_path):
    e = FakeJobs(Settings(data_dir=str(tmp_path / "data")))
    sid = _publish(e.data_dir, tmp_path, "Old style", "local")
    assert e.caller() == Caller("local", admin=True) and e.balance() is None
    assert [s.id for s in e.library_list()] == [sid]
    assert e.generate(GenerateRequest(prompt="x")).images and e.seen_user == "local"
    with pytest.raises(AccessDenied):  # a user name is never a path
        e.generate(GenerateRequest(prompt="x"), user="../../etc")


# ---- quotas ------------------------------------------------------------------------------------------------------

def test_generation_is_reserved_committed_and_refunded_exactly_once(studio_engine):
    e = studio_engine
    q = e.studio.quotas
    q.set_monthly_free("ann", 3)
    e.outcome = "ok"
    e.generate(GenerateRequest(prompt="x", batch_size=2), user="ann", job_id="r1")
    assert q.balance("ann").free_left == 1
    e.generate(GenerateRequest(prompt="x", batch_size=2), user="ann", job_id="r1")  # same request id: once
    assert q.balance("ann").free_left == 1
    e.outcome = "fail"
    with pytest.raises(RuntimeError):
        e.generate(GenerateRequest(prompt="x"), user="ann", job_id="r2")
    e.outcome = "cancel"
    e.generate(GenerateRequest(prompt="x"), user="ann", job_id="r3")
    assert q.balance("ann").free_left == 1  # a failed or cancelled job costs nothing
    assert sum(1 for x in q.ledger("ann") if x["reason"].startswith("refund")) == 2
    with pytest.raises(QuotaExceeded, match=r"1 free generation\(s\) left this month \(renews on \d{4}-\d\d-01\)"):
        e.generate(GenerateRequest(prompt="x", batch_size=2), user="ann")
    e.outcome = "ok"
    assert e.generate(GenerateRequest(prompt="x", batch_size=2), user="boss").images  # admins are not charged
    assert q.ledger("boss") == []


def test_fifty_threads_get_exactly_the_quota(studio_engine):
    e = studio_engine
    e.studio.quotas.set_monthly_free("ann", 20)
    e.outcome = "ok"
    ok, refused = [], []

    def worker():
        for _ in range(2):
            try:
                e.generate(GenerateRequest(prompt="x"), user="ann")
                ok.append(1)
            except QuotaExceeded:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(25)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(ok) == 20 and len(refused) == 30
    ledger = e.studio.quotas.ledger("ann")
    assert -sum(x["delta_free"] for x in ledger) == 20 and e.studio.quotas.balance("ann").free_left == 0


def test_stale_reservations_are_released_when_the_studio_starts(studio_engine, tmp_path):
    q = studio_engine.studio.quotas
    q.add_credits("ann", 5)
    q.reserve("ann", "died-mid-job", "generate", 4)
    assert q.balance("ann").credits == 1
    again = FakeJobs(Settings(data_dir=str(studio_engine.data_dir)))
    again.enable_studio()  # the app starting up
    assert again.studio.quotas.balance("ann").credits == 5


# ---- jobs --------------------------------------------------------------------------------------------------------

def test_cancel_and_queue_position_see_only_the_callers_jobs(studio_engine):
    e = studio_engine
    with e._job("train", "bob", "bob-job"):
        assert e.queue_position("bob-job", user="ann") is None
        assert e.queue_position("bob-job", user="bob") == 0 and e.queue_position("bob-job", user="boss") == 0
        assert e.cancel(kind="train", user="ann") == 0
        assert e.cancel(kind="train", user="bob") == 1


def test_runs_are_listed_for_their_owner_only(studio_engine, monkeypatch):
    from engine.core.events import ResumableRun
    import engine.train.job as job

    runs = [ResumableRun(r, r, "interrupted", 1, 10, 1, {}) for r in ("run-ann", "run-bob", "run-old")]
    monkeypatch.setattr(job, "resumable_runs", lambda d: runs)
    e = studio_engine
    e.library.set_run_owner("run-ann", "ann")
    e.library.set_run_owner("run-bob", "bob")
    assert [r.run_id for r in e.resumable_runs(user="ann")] == ["run-ann"]
    assert [r.run_id for r in e.resumable_runs(user="boss")] == ["run-ann", "run-bob", "run-old"]
    with pytest.raises(ConfigError, match="no longer resumable"):
        e.resume_iter("run-bob", user="ann")


def test_a_waiting_job_reports_its_place_in_the_queue(studio_engine):
    """Each user sees the queue position of their waiting job (Engine.queue_position, Queued events)."""
    from engine.core.events import Queued

    e = studio_engine
    e.outcome = "ok"
    e.studio.quotas.set_monthly_free("ann", 5)
    release = threading.Event()
    started = threading.Event()

    def bob_job():
        with e._job("train", "bob", "bob-job"):
            started.set()
            release.wait(30)

    t = threading.Thread(target=bob_job)
    t.start()
    started.wait(10)
    events = e.generate_iter(GenerateRequest(prompt="x"), user="ann", job_id="ann-job")
    first = next(events)
    assert first == Queued(1) and "1 job(s) before yours" in first.message
    assert e.queue_position("ann-job", user="ann") == 1 and e.queue_position("ann-job", user="bob") is None
    release.set()
    assert isinstance(list(events)[-1], GenerateResult)
    t.join(10)


class FakeTrainer(FakeJobs):
    @_charged("train")
    def train(self, cfg, name, on_event=None, *, run_dir=None, user="local", job_id=None):
        from engine.core.events import TrainJobResult

        if self.outcome == "fail":
            raise RuntimeError("diverged")
        style = self.library.find_version(self.ids["new"]) if self.outcome == "ok" else None
        return TrainJobResult(self.data_dir / "runs" / "run-x", None, style, [], [])


def test_training_is_charged_once_and_its_run_and_style_belong_to_the_trainer(studio_engine, tmp_path):
    from engine.studio.quota import Policy

    e = FakeTrainer(Settings(data_dir=str(studio_engine.data_dir)))
    e.enable_studio()
    e.ids = {"new": _publish(e.data_dir, tmp_path, "New style", "local")}
    q = e.studio.quotas
    q.add_credits("ann", Policy().train_price + 10)
    e.outcome = "fail"
    with pytest.raises(RuntimeError):
        e.train(None, "x", user="ann")
    assert q.balance("ann").credits == Policy().train_price + 10  # refunded
    e.outcome = "ok"
    e.train(None, "x", user="ann")
    assert q.balance("ann").credits == 10
    assert e.library.get(e.ids["new"]).owner == "ann" and e.library.run_owners()["run-x"] == "ann"
    with pytest.raises(QuotaExceeded, match="credit"):
        e.train(None, "x", user="ann")


def test_admin_operations_check_the_role_and_the_usage_report_sums_the_ledger(studio_engine):
    s = studio_engine.studio
    ann, boss = s.caller("ann"), s.caller("boss")
    for op in (lambda: s.users(ann), lambda: s.usage(ann), lambda: s.add_user(ann, "eve", "eve-password"),
               lambda: s.set_monthly_free(ann, "ann", 99), lambda: s.add_credits(ann, "ann", 99),
               lambda: s.remove_user(ann, "bob"), lambda: s.set_password(ann, "bob", "new-password")):
        with pytest.raises(AccessDenied, match="admin"):
            op()
    s.set_password(ann, "ann", "ann-new-password")  # one's own password: allowed
    with pytest.raises(ConfigError, match="names the single user"):
        s.add_user(boss, "LOCAL", "long-enough")
    with pytest.raises(ConfigError, match="your own account"):
        s.remove_user(boss, "boss")
    s.add_credits(boss, "ann", 5)
    s.quotas.reserve("ann", "r1", "generate", 3)
    s.quotas.commit("r1")
    s.quotas.reserve("ann", "r2", "generate", 1)
    s.quotas.refund("r2")
    (row,) = [r for r in s.usage(boss) if r["user"] == "ann"]
    assert (row["credits_added"], row["credits_spent"], row["refunds"]) == (5, 3, 1)
    users = {u["name"]: u for u in s.users(boss)}
    assert users["ann"]["credits"] == 2 and "pw_hash" not in users["ann"] and "scrypt" not in repr(users)


def test_blends_bakes_and_batches_check_ownership_and_charge_before_any_model_work(studio_engine):
    """The multi-style jobs (blend strips, bakes, batches) go through the same checks as Generate: another user's
    style is "unknown", and the quota is reserved (and refused) before the model is even loaded."""
    from engine.core.batch_config import BatchRequest
    from engine.core.blend_config import BakeRequest, BlendRequest, BlendStripRequest

    e, ids = studio_engine, studio_engine.ids
    calls = [lambda: e.blend_strip(BlendStripRequest(prompt="x", style_a=ids["ann"], style_b=ids["bob"]), user="ann"),
             lambda: e.bake_blend(BakeRequest(name="mix", blend=BlendRequest(styles=(ids["ann"], ids["bob"]),
                                                                             weights=(0.5, 0.5))), user="ann"),
             lambda: e.generate_batch(BatchRequest(prompts="x", styles=(ids["bob"],)), user="ann"),
             lambda: e.generate(GenerateRequest(prompt="x", styles=((ids["ann"], 1.0), (ids["bob"], 0.5))),
                                user="ann")]
    for call in calls:
        with pytest.raises(LibraryError, match="unknown style"):
            call()
    e.studio.quotas.set_monthly_free("ann", 3)
    with pytest.raises(QuotaExceeded, match="needs 4 images"):
        e.generate_batch(BatchRequest(prompts="x", seeds_per_prompt=4, styles=(ids["shared"],)), user="ann")
    with pytest.raises(QuotaExceeded, match="needs 9 images"):
        e.blend_strip(BlendStripRequest(prompt="x", style_a=ids["ann"], style_b=ids["shared"]), user="ann")
    assert e._model is None  # refused before the model was touched
    assert e.studio.quotas.balance("ann").free_left == 3 and e.studio.quotas.ledger("ann") == []
