"""The on-policy prior term (TrainConfig.onpolicy_prior_weight, engine/train/onpolicy.py) on tiny random models: what
the pool holds, that the term starts at zero and changes training only when on, and that a resume mid-pool is exact
(the pool is part of the checkpoint)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

import engine.train.loop as T
from engine.core.config import ConfigError
from engine.core.train_config import TrainConfig, presets
from engine.train import onpolicy
from tests.test_checkpoints import stop_at
from tests.test_train_cli import write_run
from tests.test_training import draw_images, make_config

torch.set_num_threads(1)


def _config(tiny_sd, tmp_path, **over):
    images = draw_images(tmp_path / "img")
    common = dict(with_prior_preservation=True, num_class_images=2, prior_target="base", eval_seeds=0,
                  class_prompt="a photo of shape\na photo of a circle in red\na photo of a square in blue")
    return make_config(tiny_sd, images, **{**common, **over})


def _classes(tmp_path):
    """Two class images with their captions (several class prompts need one caption per image)."""
    return dict(class_images=draw_images(tmp_path / "cls", 2, kind="square"),
                class_captions=["a photo of shape", "a photo of a square in blue"])


def test_the_weight_needs_lora_and_class_prompts():
    base = {**presets("subject"), "instance_images": ("a.png",)}
    with pytest.raises(ConfigError, match="needs method 'lora' and `with_prior_preservation`"):
        TrainConfig(**{**base, "onpolicy_prior_weight": 1.0, "with_prior_preservation": False})
    with pytest.raises(ConfigError, match="onpolicy_prior_weight"):
        TrainConfig(**{**base, "onpolicy_prior_weight": "1"})  # typed: a quoted number is an error


def test_pool_term_and_effect(tiny_sd, tmp_path, monkeypatch):
    """The pool holds the LoRA model's latents entering steps FIRST..LAST of the app's 20 DPM++ steps for ROLLOUTS
    class prompts; the term is 0 at step 0 (LoRA B = 0: LoRA model = base model) and grows once the LoRA moves;
    at weight 0 nothing is sampled and the run is the run without the option."""
    classes = _classes(tmp_path)
    terms, pools = [], []
    orig_loss, orig_refresh = T.onpolicy_loss, onpolicy.refresh

    def spy(run, te_on):
        value = orig_loss(run, te_on)
        terms.append(float(value.detach()))
        return value

    monkeypatch.setattr(T, "onpolicy_loss", spy)
    monkeypatch.setattr(onpolicy, "refresh", lambda run, step: pools.append(orig_refresh(run, step)) or pools[-1])
    monkeypatch.setattr(onpolicy, "REFRESH", 2)
    off = T.train(_config(tiny_sd, tmp_path, max_train_steps=4, checkpointing_steps=0), tmp_path / "off",
                  **classes)
    assert terms == [] and pools == []
    on = T.train(_config(tiny_sd, tmp_path, max_train_steps=4, checkpointing_steps=0, onpolicy_prior_weight=5.0),
                 tmp_path / "on", **classes)
    assert [int(p["step"]) for p in pools] == [0, 2]  # refreshed every REFRESH steps
    kept = onpolicy.LAST - onpolicy.FIRST + 1
    assert pools[0]["latents"].shape[:2] == (kept, onpolicy.ROLLOUTS) and pools[0]["timesteps"].shape == (kept,)
    assert pools[0]["timesteps"][0] > pools[0]["timesteps"][-1]  # from the noisier end to the cleaner one
    assert not torch.equal(pools[0]["latents"], pools[1]["latents"])  # sampled again, with the moved LoRA
    assert len(terms) == 4 and terms[0] < 1e-10 and max(terms[1:]) > 1e-8
    a, b = (st.load_file(str(r.lora_path)) for r in (off, on))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_in_the_middle_of_a_pool_is_exact(tiny_sd, tmp_path, monkeypatch):
    """Pools at steps 0, 2 and 4; stopped at 3 (drawing from step 2's pool) and resumed, the run ends with the
    same LoRA and losses as without the stop: the checkpoint carries the pool the run was drawing from."""
    monkeypatch.setattr(onpolicy, "REFRESH", 2)
    classes = _classes(tmp_path)
    cfg = _config(tiny_sd, tmp_path, max_train_steps=6, checkpointing_steps=3, onpolicy_prior_weight=5.0)
    straight = T.train(cfg, tmp_path / "A", **classes)
    stop, on_event = stop_at(3)
    first = T.train(cfg, tmp_path / "B", **classes, on_event=on_event, stop_event=stop)
    assert first.cancelled and first.steps == 3
    saved = st.load_file(str(tmp_path / "B/checkpoints/checkpoint-3" / "onpolicy.safetensors"))
    assert int(saved["step"]) == 2
    resumed = T.train(cfg, tmp_path / "B", **classes)
    assert resumed.resumed_from == 3
    assert resumed.losses == straight.losses
    a, b = st.load_file(str(straight.lora_path)), st.load_file(str(resumed.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_torchrun_ranks_stay_in_sync(tiny_sd, tmp_path):
    """Each rank draws its own pool entries (its own generator); the term's gradients, from a forward outside the
    DDP wrapper, must still be all-reduced, or the ranks' LoRAs would part (the run checks a checksum at the end)."""
    classes = draw_images(tmp_path / "cls", 2, kind="square")
    toml = write_run(tmp_path, tiny_sd, lora_alpha=8, with_prior_preservation=True, num_class_images=2,
                     prior_target="base", onpolicy_prior_weight=5.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "engine.train", "--config", str(toml), "--run-dir", str(tmp_path / "run"),
                           "--class-dir", str(Path(classes[0]).parent)],
                          cwd=env["PYTHONPATH"], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "identical on 2 ranks" in proc.stdout
    assert (tmp_path / "run/checkpoints/checkpoint-3" / "onpolicy.safetensors").is_file()
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 3
