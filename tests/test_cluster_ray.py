"""Jobs past one machine (issue 12.5): a real local Ray cluster (a head that runs no jobs + two one-CPU worker
nodes, ray.cluster_utils.Cluster) behind the Engine. Jobs of two users spread over both workers and make the same
images as the app's own process; a worker node killed mid-training has its job resumed on the other node from the
newest checkpoint the app holds (no step redone before it, the LoRA as an uninterrupted run's); quotas charge every
request exactly once, retries included. One cluster for the module: starting Ray costs ~10 s here."""
from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")  # in the test extra; skipped only where Ray is not installed

from PIL import Image  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from engine.api import Engine  # noqa: E402
from engine.cluster.head import HeadStore  # noqa: E402
from engine.core.config import ConfigError, GenerateRequest, Settings  # noqa: E402
from engine.core.events import TrainCheckpoint, TrainEvaluation, TrainLog, TrainProgress  # noqa: E402
from engine.generate.recipes import read_recipe  # noqa: E402
from tests.test_checkpoints import make_config  # noqa: E402  (the same tiny-run config as the local resume tests)

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    # A killed node is noticed by the head's health checks (Ray's default: 5 missed checks 3 s apart); faster here.
    fast = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False,
                                                         object_store_memory=100 * MB, _system_config=fast))
    workers = [c.add_node(num_cpus=1, object_store_memory=80 * MB) for _ in range(2)]
    c.wait_for_nodes()
    from engine.cluster import ray_backend

    backend = ray_backend(c.address, gpus_per_job=0, cpus_per_job=1, max_retries=2, store_class=HoldingStore,
                          root=str(tmp_path_factory.mktemp("worker-root")), runtime_env={"env_vars": env},
                          log_to_driver=False)
    yield c, workers, backend
    ray.shutdown()
    c.shutdown()


class HoldingStore(HeadStore):
    """The store, except that the first attempt of job "ann-train" is held right after its checkpoint-4 reached the
    app (the worker waits for that call to return) until the test has killed the worker's node: the kill lands
    mid-run however fast or slow this machine is. The node to kill is written next to the run."""

    def put_checkpoint(self, job_id, step, files):
        path = super().put_checkpoint(job_id, step, files)
        if job_id == "ann-train" and step == 4 and len(self.attempts(job_id)) == 1:
            run = Path(path).parents[1]
            (run / "node-to-kill").write_text(self.attempts(job_id)[0])
            deadline = time.monotonic() + 120
            while not (run / "killed").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        return path


# The actor process cannot import this test module by name (pytest put its folder on the path here only).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _draw(folder: Path, n: int = 4) -> list[str]:
    from PIL import ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse([8 + i, 8, 56, 56 - i], fill=(60 * i, 90, 200))
        img.save(folder / f"c{i}.png")
    return [str(folder / f"c{i}.png") for i in range(n)]


def _studio(engine: Engine) -> Engine:
    studio = engine.enable_studio()
    for u in ("ann", "bob"):
        studio.accounts.add(u, f"{u}-password-1")
    return engine


def _node_ids(workers) -> list[str]:
    return [w.node_id for w in workers]


def test_jobs_of_two_users_spread_over_both_workers_with_exact_quotas(cluster, tiny_sd, tmp_path):
    c, workers, backend = cluster
    assert backend.capacity() == 2  # two one-CPU workers; the head runs no jobs
    local = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path / "local")))
    style = local.train(make_config(tiny_sd, _draw(tmp_path / "img"), max_train_steps=2), "round").style
    eng = _studio(Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path / "local")), cluster=backend))
    for u in ("ann", "bob"):
        eng.studio.quotas.set_monthly_free(u, 10)
    eng.library.set_shared(style.id, True)
    reqs = {"ann": [GenerateRequest("a red circle", num_inference_steps=3, seed=s, styles=((style.id, 0.8),))
                    for s in (1, 2)],
            "bob": [GenerateRequest("a blue square", num_inference_steps=3, seed=s, batch_size=2) for s in (3, 4)]}
    results, errors = {}, []

    def run(user, k, req):
        try:
            results[(user, k)] = eng.generate(req, user=user, job_id=f"{user}-{k}-{uuid.uuid4().hex[:6]}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(u, k, r)) for u, rs in reqs.items() for k, r in enumerate(rs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    nodes = {nid for job_id, kind, attempts in backend.history for nid in attempts if kind == "generate"}
    assert nodes == set(_node_ids(workers))  # both workers ran jobs

    # The same images the app's own process makes, each written here with its recipe.
    for (user, k), res in results.items():
        req = reqs[user][k]
        want = local.generate(req)
        assert len(res.images) == req.num_images and not res.cancelled
        for got, ref in zip(res.images, want.images):
            assert got.path.parent.parent.name == user and got.path.is_file()
            on_disk = read_recipe(got.path)
            assert on_disk["seed"] == ref.recipe["seed"] and on_disk["prompt"] == ref.recipe["prompt"]
            assert on_disk["model_fingerprint"] == local.model.fingerprint and on_disk["styles"] == json.loads(
                json.dumps(ref.recipe["styles"]))
            diff = np.abs(np.asarray(got.image, np.int16) - np.asarray(ref.image, np.int16))
            assert diff.max() <= 1, diff.max()  # same seeds, same CPU: the same picture

    # A job that fails on a worker (a style made on another base model) comes back as its own error, refunded.
    bad = _fake_style(eng, tmp_path)
    with pytest.raises(ConfigError, match="cannot be used here"):
        eng.generate(GenerateRequest("x", num_inference_steps=2, styles=((bad, 1.0),)), user="bob", job_id="bob-bad")

    for u, used in (("ann", 2), ("bob", 4)):
        assert eng.balance(u).free_left == 10 - used  # charged exactly the images made, nothing for the failure
        ledger = [r for r in eng.studio.quotas.ledger(u) if r["request_id"]]
        reserves = [r["request_id"] for r in ledger if r["reason"].startswith("reserve")]
        assert len(reserves) == len(set(reserves)) == 2 + (u == "bob")  # one reservation per request
    refunds = [r for r in eng.studio.quotas.ledger("bob") if r["reason"].startswith("refund")]
    assert [r["request_id"] for r in refunds] == ["bob-bad"]  # refunded once


def _fake_style(eng: Engine, tmp: Path) -> str:
    from engine.styles.store import publish

    lora, meta = tmp / "fake.safetensors", tmp / "fake.json"
    lora.write_bytes(b"weights")
    meta.write_text(json.dumps({"schema_version": 1, "trigger_token": "olis", "preset": "style",
                                "base_model": "other", "base_model_fingerprint": "0" * 64}))
    info = publish(eng.data_dir, "Other base", lora, meta)
    eng.library.set_owner(info.id, "bob")
    return info.id


def test_a_killed_workers_training_job_resumes_on_the_other_from_its_checkpoint(cluster, tiny_sd, tmp_path):
    import safetensors.torch as st
    import torch

    import engine.train.loop as T

    c, workers, backend = cluster
    eng = _studio(Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path / "data")), cluster=backend))
    eng.studio.quotas.add_credits("ann", 50)  # one training run (Policy.train_price)
    images = _draw(tmp_path / "img")
    cfg = make_config(tiny_sd, images, max_train_steps=12, checkpointing_steps=4, checkpoints_total_limit=5)
    events, killed = [], {}

    def killer():  # once checkpoint-4 is held by the app (HoldingStore), the first attempt's machine dies
        deadline = time.monotonic() + 300
        while not list((tmp_path / "data" / "runs").glob("*/node-to-kill")) and time.monotonic() < deadline:
            time.sleep(0.1)
        node_id = next((tmp_path / "data" / "runs").glob("*/node-to-kill")).read_text()
        killed["node"], killed["held"] = node_id, _held(tmp_path / "data" / "runs")
        c.remove_node(next(w for w in workers if w.node_id == node_id), allow_graceful=False)
        next((tmp_path / "data" / "runs").glob("*/node-to-kill")).with_name("killed").touch()

    threading.Thread(target=killer, daemon=True).start()
    res = eng.train(cfg, "ring", events.append, user="ann", job_id="ann-train")
    assert res.style is not None and res.result.steps == 12

    job, kind, attempts = next(h for h in backend.history if h[0] == "ann-train")
    assert len(attempts) == 2 and attempts[0] == killed["node"] and attempts[1] != killed["node"]
    resumed = res.result.resumed_from
    assert resumed == max(killed["held"]) == 4  # the newest checkpoint the app held when the worker died
    held = [e for e in events if isinstance(e, TrainCheckpoint)]  # each reported once, where the app holds it
    assert [e.step for e in held] == [4, 8, 12]
    assert all(Path(e.path).is_relative_to(tmp_path / "data" / "runs") for e in held)
    log_at = next(i for i, e in enumerate(events) if isinstance(e, TrainLog) and "resuming from" in e.message)
    assert f"checkpoint-{resumed}" in events[log_at].message
    after = [e.step for e in events[log_at:] if isinstance(e, TrainProgress)]
    assert after[0] == resumed + 1 and after == list(range(resumed + 1, 13))  # no step before it redone

    # The same LoRA and losses as an uninterrupted run of the same config in this process.
    straight = T.train(make_config(tiny_sd, images, max_train_steps=12, checkpointing_steps=12), tmp_path / "straight")
    assert res.result.losses == pytest.approx(straight.losses, abs=1e-6)
    a, b = st.load_file(str(straight.lora_path)), st.load_file(str(res.style.lora))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # Every checkpoint's evaluation is held by the app under its own run id, including those made before the kill,
    # so the Train tab can publish any of them (a new version of the style the run published).
    evals = [e for e in events if isinstance(e, TrainEvaluation)]
    assert {e.run_id for e in evals} == {res.run_dir.name} and {e.step for e in evals} == {0, 4, 8, 12}
    assert [r[0] for r in evals[-1].scores] == [0, 4, 8, 12]  # the retry continued the records
    with pytest.raises(ConfigError, match="unknown training run"):
        eng.publish_checkpoint(res.run_dir.name, 4, user="bob")
    v = eng.publish_checkpoint(res.run_dir.name, 4, user="ann")  # exported by the worker that died
    assert v.id == res.style.id and len(eng.library.get(v.id).versions) == 2

    # Charged once: one reservation, committed, no refund, despite two attempts.
    assert eng.balance("ann").credits == 0
    rows = [r for r in eng.studio.quotas.ledger("ann") if r["request_id"] == "ann-train"]
    assert [r["reason"] for r in rows] == ["reserve train x1"]
    assert eng.library.get(res.style.id).owner == "ann"
    assert backend.capacity() == 1  # the dead worker's slot is gone


def _held(runs: Path) -> list[int]:
    """Checkpoint steps the app's node holds now (in the one run folder of the test)."""
    return [int(p.name.split("-")[1]) for p in runs.glob("*/checkpoints/checkpoint-*") if p.name.split("-")[1].isdigit()]


def test_cancel_on_the_cluster_keeps_a_resumable_checkpoint_and_refunds_once(cluster, tiny_sd, tmp_path):
    """Cancel reaches the worker, which checkpoints where it stopped; the app's node holds that checkpoint, its
    job.json offers "resume?", and the reservation is refunded exactly once."""
    c, workers, backend = cluster
    eng = _studio(Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path / "data")), cluster=backend))
    eng.studio.quotas.add_credits("bob", 50)
    cfg = make_config(tiny_sd, _draw(tmp_path / "img"), max_train_steps=200, checkpointing_steps=1000)

    def on_event(e):
        if isinstance(e, TrainProgress) and e.step >= 2:
            eng.cancel("bob-train")

    res = eng.train(cfg, "square", on_event, user="bob", job_id="bob-train")
    assert res.result.cancelled and res.style is None and 2 <= res.result.steps < 200
    held = res.run_dir / "checkpoints" / f"checkpoint-{res.result.steps}"
    assert (held / "manifest.json").is_file()  # saved on the worker at the stop, shipped here
    [run] = eng.resumable_runs(user="bob")
    assert (run.run_id, run.state, run.step, run.last_checkpoint) == (res.run_dir.name, "cancelled",
                                                                      res.result.steps, res.result.steps)
    assert eng.balance("bob").credits == 50
    reasons = [r["reason"] for r in eng.studio.quotas.ledger("bob") if r["request_id"] == "bob-train"]
    assert reasons == ["reserve train x1", "refund: failed or cancelled"]
