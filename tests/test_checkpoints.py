"""Checkpoints (RELIABILITY TR-1..TR-9): atomic writes, prune after success, newest *valid* resume, exact resume in a
new process (mid-epoch, with gradient accumulation), ENOSPC and kill -9 during a save, disk checks, job state."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from PIL import Image, ImageDraw

import engine.train.loop as T
from engine.core.events import TrainCheckpoint
from engine.train import checkpoints as ck
from engine.jobs import state as jobs
from engine.train.job import resumable_runs
from engine.core.train_config import TrainConfig, presets, save_train_config

torch.set_num_threads(1)  # the subprocess gets OMP_NUM_THREADS=1: the same float summation order
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def draw_images(folder: Path, n: int = 4, kind: str = "circle") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (64 + 8 * (i % 2), 64), "white")
        box = [8 + i, 8, 56, 56 - i]
        draw = ImageDraw.Draw(img)
        (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=(60 * i, 90, 200))
        img.save(folder / f"{kind}{i}.png")
    return [str(folder / f"{kind}{i}.png") for i in range(n)]


def make_config(model: Path, images, **over) -> TrainConfig:
    base = {**presets("subject"), "instance_images": tuple(images), "base_model": str(model), "max_train_steps": 4,
            "checkpointing_steps": 2, "validation_steps": 0, "validation_prompts": (), "report_to": "none",
            "with_prior_preservation": False, "lora_alpha": 8, "learning_rate": 1e-3, "text_encoder_lr": 1e-3}
    return TrainConfig(**{**base, **over})


def stop_at(step: int):
    stop = threading.Event()
    return stop, lambda e: stop.set() if isinstance(e, TrainCheckpoint) and e.step == step else None


def same_tensors(a: Path, b: Path) -> bool:
    x, y = st.load_file(str(a)), st.load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(autouse=True)
def fast_previews(monkeypatch):
    monkeypatch.setattr("engine.train.output.PREVIEW_STEPS", 2)


# ---- TR-4: exact resume ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("accumulation", [1, 2])
def test_exact_resume_mid_epoch_in_a_new_process(tiny_sd, tmp_path, accumulation):
    imgs, cls_dir = draw_images(tmp_path / "img"), tmp_path / "cls"
    cls = draw_images(cls_dir, 3, kind="square")
    cfg = make_config(tiny_sd, imgs, max_train_steps=6, checkpointing_steps=3, checkpoints_total_limit=5,
                      gradient_accumulation_steps=accumulation, with_prior_preservation=True, num_class_images=3,
                      center_crop=False, random_flip=True, noise_offset=0.05, snr_gamma=5.0, lr_scheduler="cosine",
                      lr_warmup_steps=1, text_encoder_stop_fraction=0.5)
    straight = T.train(cfg, tmp_path / "A", class_images=cls)

    stop, on_event = stop_at(3)
    first = T.train(cfg, tmp_path / "B", class_images=cls, on_event=on_event, stop_event=stop)
    assert first.cancelled and first.steps == 3
    state = json.loads((tmp_path / "B/checkpoints/checkpoint-3/state.json").read_text())
    assert state["sampler"]["pos"] % 4 != 0  # k falls mid-epoch (4 examples, 3 × accumulation samples seen)
    save_train_config(cfg, tmp_path / "run.toml")
    proc = subprocess.run([sys.executable, "-m", "engine.train", "--config", str(tmp_path / "run.toml"), "--run-dir",
                           str(tmp_path / "B"), "--resume", "--class-dir", str(cls_dir)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["resumed_from"] == 3

    a, b = tmp_path / "A/checkpoints/checkpoint-6", tmp_path / "B/checkpoints/checkpoint-6"
    for name in ("lora.safetensors", "optimizer.safetensors", "sampler.safetensors", "rng-rank0.safetensors"):
        assert same_tensors(a / name, b / name), name
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    assert sa["losses"] == sb["losses"] == straight.losses and len(sa["losses"]) == 6
    assert sa["optimizer"] == sb["optimizer"] and sa["lr_scheduler"] == sb["lr_scheduler"]
    assert same_tensors(straight.lora_path, tmp_path / "B/output/lora.safetensors")


# ---- TR-3: newest valid checkpoint -------------------------------------------------------------------------------

def _truncate(p: Path):
    (p / "optimizer.safetensors").write_bytes((p / "optimizer.safetensors").read_bytes()[:100])


def _zero_header(p: Path):
    data = bytearray((p / "lora.safetensors").read_bytes())
    data[:8] = bytes(8)
    (p / "lora.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_truncate, _zero_header, lambda p: (p / "manifest.json").unlink(),
                                     lambda p: (p / "manifest.json").write_text("{not json")])
def test_corrupted_newest_checkpoint_resumes_from_the_previous(tiny_sd, tmp_path, corrupt):
    cfg = make_config(tiny_sd, draw_images(tmp_path / "img"), checkpoints_total_limit=3)
    first = T.train(cfg, tmp_path / "run")
    before = st.load_file(str(first.lora_path))
    corrupt(tmp_path / "run/checkpoints/checkpoint-4")
    events = []
    again = T.train(cfg, tmp_path / "run", on_event=events.append)
    assert again.resumed_from == 2 and again.losses == first.losses  # and the redone steps are identical
    assert any("skipping checkpoint-4" in getattr(e, "message", "") and e.level == "warning" for e in events)
    assert len(list((tmp_path / "run/checkpoints").glob("checkpoint-4.bad-*"))) == 1  # quarantined, not deleted
    after = st.load_file(str(again.lora_path))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tmp_folders_are_never_chosen(tmp_path):
    d = tmp_path / "ck"
    ok = ck.save_checkpoint(d, 1, tensors={"a.safetensors": {"x": torch.ones(2)}}, blobs={}, json_files={},
                            manifest_info={}, limit=3, warn=print)
    import shutil
    shutil.copytree(ok, d / "checkpoint-9.tmp-abc")  # complete-looking, manifest and all
    warnings = []
    path, manifest = ck.find_resume_checkpoint(d, warnings.append)
    assert path == ok and manifest["step"] == 1
    assert not (d / "checkpoint-9.tmp-abc").exists() and "unfinished" in warnings[0]


# ---- TR-1/TR-2/TR-8: failures during a save ------------------------------------------------------------------------

def _save(d: Path, step: int, limit: int = 1, **kw) -> Path:
    return ck.save_checkpoint(d, step, tensors={"lora.safetensors": {"w": torch.full((4,), float(step))}},
                              blobs={"rng-rank0.safetensors": st.save({"s": torch.arange(3)})},
                              json_files={"state.json": {"step": step}}, manifest_info={"seed": 0}, limit=limit,
                              warn=print, **kw)


def test_enospc_at_every_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    _save(d, 1)
    writes = []
    orig = ck._write_bytes
    monkeypatch.setattr(ck, "_write_bytes", lambda p, data: writes.append(p.name) or orig(p, data))
    _save(tmp_path / "count", 1)
    assert writes[-1] == "manifest.json" and len(writes) == 4  # the manifest is written last
    for k in range(len(writes)):
        calls = {"n": 0}

        def failing(p, data, k=k):
            calls["n"] += 1
            if calls["n"] > k:
                p.write_bytes(data[: len(data) // 2])  # a partial file, as a full disk leaves it
                raise OSError(errno.ENOSPC, "No space left on device")
            return orig(p, data)

        monkeypatch.setattr(ck, "_write_bytes", failing)
        with pytest.raises(ck.DiskFullError, match="disk full while saving checkpoint 2; checkpoint-1 is kept"):
            _save(d, 2, limit=1)  # limit=1 + a failure still leaves one valid checkpoint (TR-2)
        assert [p.name for p in d.iterdir()] == ["checkpoint-1"]  # no .tmp-* left behind
        path, _ = ck.find_resume_checkpoint(d, print)
        assert path.name == "checkpoint-1" and st.load_file(str(path / "lora.safetensors"))["w"][0] == 1


def test_prune_keeps_the_newest_after_verifying(tmp_path):
    d = tmp_path / "ck"
    for s in (1, 2, 3, 4):
        _save(d, s, limit=2)
    assert [s for s, _ in ck.list_checkpoints(d)] == [4, 3]


def test_prune_spares_protected_steps_outside_the_limit(tmp_path):
    """Full fine-tuning's best checkpoint is published from its weights later, so pruning must not take it."""
    d = tmp_path / "ck"
    for s in (1, 2, 3, 4):
        _save(d, s, limit=2, protect=frozenset({1}))
    assert [s for s, _ in ck.list_checkpoints(d)] == [4, 3, 1]


def test_enospc_during_training_stops_with_disk_full(tiny_sd, tmp_path, monkeypatch):
    orig = ck._write_bytes

    def full_at_step_2(p, data):
        if "checkpoint-2.tmp" in str(p) and p.name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(p, data)

    monkeypatch.setattr(ck, "_write_bytes", full_at_step_2)
    cfg = make_config(tiny_sd, draw_images(tmp_path / "img"), checkpointing_steps=1, checkpoints_total_limit=1)
    with pytest.raises(ck.DiskFullError, match="disk full"):
        T.train(cfg, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["checkpoint-1"]
    job = jobs.read_job(tmp_path / "run")
    assert job["state"] == "failed" and "disk full" in job["message"]
    monkeypatch.setattr(ck, "_write_bytes", orig)  # space freed: resume goes on from step 1
    assert T.train(cfg, tmp_path / "run").resumed_from == 1


def test_free_space_is_checked_before_training(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "free_bytes", lambda path: 1000)
    with pytest.raises(ck.DiskFullError, match="disk full: training needs about .* MiB"):
        T.train(make_config(tiny_sd, draw_images(tmp_path / "img")), tmp_path / "run")


def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous(tiny_sd, tmp_path):
    cfg = make_config(tiny_sd, draw_images(tmp_path / "img"))
    save_train_config(cfg, tmp_path / "run.toml")
    marker, run_dir = tmp_path / "in-save", tmp_path / "runs" / "r1"
    script = (
        "import sys, time\n"
        "import engine.train.checkpoints as ck\n"
        "orig = ck._write_bytes\n"
        "def slow(p, data):\n"
        "    if 'checkpoint-4.tmp' in str(p) and p.name == 'optimizer.safetensors':\n"
        "        open(sys.argv[2], 'w').close(); time.sleep(600)\n"
        "    return orig(p, data)\n"
        "ck._write_bytes = slow\n"
        "from engine.train.cli import main\n"
        "sys.exit(main(['--config', sys.argv[1], '--run-dir', sys.argv[3]]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run.toml"), str(marker), str(run_dir)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the worker never reached the checkpoint write"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list((run_dir / "checkpoints").glob("checkpoint-4.tmp-*"))  # the half-written one is there
    interrupted = resumable_runs(tmp_path / "runs")
    assert [(r.run_id, r.state, r.last_checkpoint) for r in interrupted] == [(run_dir.name, "interrupted", 2)]  # "interrupted — resume?"
    result = T.train(TrainConfig(**interrupted[0].config), run_dir)  # everything needed to resume is on disk
    assert result.resumed_from == 2 and result.steps == 4
    assert not list((run_dir / "checkpoints").glob("*.tmp-*")) and resumable_runs(tmp_path / "runs") == []


# ---- TR-5 and the rest -----------------------------------------------------------------------------------------

def test_rng_restore_failure_is_an_error(tmp_path):
    path = tmp_path / "rng.safetensors"
    path.write_bytes(ck.rng_blob({}))  # saved without the training generator
    with pytest.raises(ck.CheckpointError, match="resume would not be exact"):
        ck.restore_rng(path, {"train": torch.Generator()})
    g = torch.Generator().manual_seed(5)
    path.write_bytes(ck.rng_blob({"train": g}))
    want = torch.rand(3, generator=g)
    h = torch.Generator()
    ck.restore_rng(path, {"train": h})
    assert torch.equal(torch.rand(3, generator=h), want)


def test_resume_refuses_another_config(tiny_sd, tmp_path):
    imgs = draw_images(tmp_path / "img")
    T.train(make_config(tiny_sd, imgs, max_train_steps=2), tmp_path / "run")
    with pytest.raises(ck.CheckpointError, match="different config"):
        T.train(make_config(tiny_sd, imgs, max_train_steps=2, learning_rate=2e-3), tmp_path / "run")
    fresh = T.train(make_config(tiny_sd, imgs, max_train_steps=2, learning_rate=2e-3), tmp_path / "run", resume=False)
    assert fresh.resumed_from is None and list(tmp_path.glob("run/checkpoints.old-*"))  # kept aside, not deleted


def test_interrupted_runs_are_found_by_dead_workers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid, state in (("dead", dead.pid, "running"), ("alive", os.getpid(), "running"),
                             ("finished", dead.pid, "done")):
        jobs.write_job(tmp_path / name, state, step=3, config={"max_train_steps": 5})
        job = json.loads((tmp_path / name / "job.json").read_text())
        (tmp_path / name / "job.json").write_text(json.dumps({**job, "pid": pid}))
    assert [r.run_id for r in resumable_runs(tmp_path)] == ["dead"]


def test_no_pickle_loading_in_training_code():
    for name in ("train/loop.py", "train/checkpoints.py", "train/cli.py", "core/train_config.py"):
        src = (ROOT / "engine" / name).read_text()
        assert "import pickle" not in src and "torch.load(" not in src.replace("torch.load(weights_only=True", ""), name
