"""The Ray backend's pieces that need no cluster: content-addressed bundles (a damaged or tampered transfer is
refused, nothing lands outside the cache), the fair pool (capacity() jobs at once, round-robin across users) and
the launcher's --ray-address flag when Ray is missing."""
from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest

from engine.cluster.content import ContentError, Hasher, materialize, read_chunk
from engine.jobs.fair import FairScheduler


def _bundle(tmp_path):
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "w.safetensors").write_bytes(b"x" * 1000)
    (src / "model_index.json").write_text("{}")
    (src / ".hidden").write_text("never shipped")
    return Hasher().model(src)


def test_a_bundle_arrives_whole_and_checked(tmp_path):
    bundle, entry = _bundle(tmp_path)
    assert entry == "model" and set(bundle.manifest["files"]) == {"model/unet/w.safetensors", "model/model_index.json"}
    calls = []

    def read(rel, off, n):
        calls.append(rel)
        return read_chunk(bundle.base, bundle.manifest, rel, off, n)

    out = materialize(bundle.hash, bundle.manifest, read, tmp_path / "cache")
    assert (out / "model/unet/w.safetensors").read_bytes() == b"x" * 1000
    assert materialize(bundle.hash, bundle.manifest, read, tmp_path / "cache") == out and len(calls) == 2  # cached


def test_damaged_or_tampered_bundles_are_refused(tmp_path):
    bundle, _ = _bundle(tmp_path)
    good = lambda rel, off, n: read_chunk(bundle.base, bundle.manifest, rel, off, n)  # noqa: E731
    with pytest.raises(ContentError, match="arrived damaged"):
        materialize(bundle.hash, bundle.manifest, lambda rel, off, n: b"y" * n, tmp_path / "c1")
    assert not (tmp_path / "c1" / bundle.hash).exists()  # nothing half-written is ever used
    forged = {**bundle.manifest, "files": {**bundle.manifest["files"], "../evil": {"size": 1, "sha256": "0" * 64}}}
    with pytest.raises(ContentError, match="does not match its hash"):
        materialize(bundle.hash, forged, good, tmp_path / "c2")
    forged_hash = hashlib.sha256(json.dumps(forged["files"], sort_keys=True).encode()).hexdigest()
    with pytest.raises(ContentError, match="bad file name"):
        materialize(forged_hash, forged, good, tmp_path / "c3")
    assert not (tmp_path / "evil").exists()
    with pytest.raises(ContentError, match="not part of this bundle"):
        read_chunk(bundle.base, bundle.manifest, "model/unet/other.bin", 0, 10)  # the store serves listed files only
    with pytest.raises(ContentError, match="bad file name"):
        read_chunk(bundle.base, bundle.manifest, "model/.hidden", 0, 10)
    with pytest.raises(ContentError, match="not a content hash"):
        materialize("../x", bundle.manifest, good, tmp_path / "c4")


def test_the_pool_runs_capacity_jobs_at_once_round_robin(tmp_path):
    cap = [2]
    pool = FairScheduler(lambda: cap[0])
    running, peak, order, lock = set(), [0], [], threading.Lock()
    release = threading.Event()

    def job(user, jid):
        with pool.turn(user, jid):
            with lock:
                running.add(jid)
                order.append(jid)
                peak[0] = max(peak[0], len(running))
            release.wait(10)
            with lock:
                running.discard(jid)

    threads = [threading.Thread(target=job, args=("ann", f"a{i}")) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while pool.running() < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    bob = threading.Thread(target=job, args=("bob", "b0"))
    bob.start()
    deadline = time.monotonic() + 10
    while pool.position("b0") is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.position("b0") == 1 and pool.position("a2") == 2  # bob's one job goes before ann's third
    cap[0] = 1  # a worker died: one slot left
    release.set()
    for t in [*threads, bob]:
        t.join(10)
    assert order[:2] == ["a0", "a1"] and order[2:] == ["b0", "a2"] and peak[0] == 2


def test_ray_address_without_ray_says_what_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    import launcher

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    monkeypatch.setattr(launcher, "config_dir", lambda: tmp_path / "cfg")
    rc = launcher.main(["--ray-address", "auto", "--data-dir", str(tmp_path / "data"), "--no-browser"])
    assert rc == 2 and 'pip install "stylebooth[cluster]"' in capsys.readouterr().err


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_app_node_keeps_a_full_runs_best_checkpoint(tmp_path, method):
    # A full fine-tuning checkpoint is published from its weights (engine.train.full.complete_export), so the
    # checkpoints a Ray worker sends to the app's node must keep the best one past checkpoints_total_limit, as on
    # one machine; a LoRA run's checkpoints are exported at evaluation and prune as before.
    import torch

    from engine.cluster.head import HeadStore
    from engine.train import checkpoints as ck
    from engine.train.evaluate import EVAL_DIR

    run_dir, made = tmp_path / "runs" / "job1", tmp_path / "made"
    store = HeadStore()
    store.open_job("job1", str(run_dir), keep=1)
    name = ck.FULL_WEIGHTS if method == "full" else "lora.safetensors"
    (run_dir / EVAL_DIR).mkdir(parents=True)
    (run_dir / EVAL_DIR / "scores.json").write_text(json.dumps({"best_step": 1}))
    for step in (1, 2, 3):
        path = ck.save_checkpoint(made, step, tensors={name: {"w": torch.full((2,), float(step))}}, blobs={},
                                  json_files={}, manifest_info={}, limit=10, warn=lambda m: None)
        store.put_checkpoint("job1", step, {p.name: p.read_bytes() for p in path.iterdir()})
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == (["checkpoint-1", "checkpoint-3"] if method == "full" else ["checkpoint-3"])
