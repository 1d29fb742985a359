"""Issue 14's acceptance on the demo model: the checkpoint picked during training (the rule in
engine/train/evaluate.py, from 8 fixed-seed images per checkpoint) has a likeness within 0.05 of the best
checkpoint's, both measured afterwards on fresh seeds and fresh colour pairs (16 images per checkpoint).

Likeness and prompt fidelity follow DreamBooth's subject and prompt fidelity (Ruiz et al. 2023, §4.1), with the demo
checker in place of DINO/CLIP: P(the trained shape) and the share of named colours obeyed.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.core.captions import read_captions
from engine.core.events import TrainEvaluation
from engine.core.train_config import TrainConfig, demo_settings, presets
from engine.demo import world as W
from engine.demo.checker import DemoChecker
from engine.generate.sampler import sample, to_pil
from engine.models.loading import DEMO_MODEL, load_base_model
from engine.styles.adapters import AdapterCache
from engine.train import evaluate as E
from engine.train.loop import train

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(), reason="demo model not built")
EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
TOKEN = "olis"
FRESH = 16  # images per checkpoint on fresh seeds (the training-time evaluation used 8)


@pytest.mark.learning
def test_the_picked_checkpoint_is_within_005_of_the_best_on_fresh_seeds(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(E, "EVAL_STEPS", 10)  # the app's setting (tests/conftest.py lowers it for other tests)
    t0 = time.perf_counter()
    # The demo subject settings at rank 8 (the preset's rank before 2026-11-28), stopped at 160 steps with a
    # checkpoint every 40: the likeness curve rises steeply and then flattens there. Pinned: at rank 16 the heart is
    # learned by step 80 and the checkpoints no longer differ enough (0.53-0.75) for a wrong pick to show.
    p = {**presets("subject", token=TOKEN, class_noun="shape"), **demo_settings("subject")}
    p.update(with_prior_preservation=False, validation_steps=0, report_to="none", seed=0, max_train_steps=160,
             checkpointing_steps=40, checkpoints_total_limit=1, eval_seeds=2, lora_rank=8, lora_alpha=8)
    images = sorted((EXAMPLES / "heart").glob("*.png"))
    captions, _ = read_captions(images, TOKEN, p["instance_prompt"])
    cfg = TrainConfig(instance_images=tuple(str(f) for f in images), instance_captions=captions, **p)
    events = []
    train(cfg, tmp_path / "run", on_event=events.append, resume=False)
    ev = [e for e in events if isinstance(e, TrainEvaluation)][-1]
    t_train = time.perf_counter() - t0

    base = load_base_model(None)
    scorer = E.DemoScorer(DemoChecker.load(), "subject", [np.asarray(Image.open(f).convert("RGB")) for f in images])
    rng = random.Random(2024)  # not the evaluation's colour pairs (random.Random(14)) nor its seeds
    pairs = [rng.sample(sorted(W.COLORS), 2) for _ in range(FRESH)]
    prompts = [f"{cfg.instance_prompt} in {fg} on a {bg} background" for fg, bg in pairs]
    seeds = [50_000 + i for i in range(FRESH)]

    def measure() -> tuple[float, float]:
        imgs = to_pil(sample(base.components, prompts, [""] * FRESH, seeds, num_inference_steps=E.EVAL_STEPS,
                             guidance_scale=5.0))
        return scorer.score(imgs, prompts, TOKEN)

    cache = AdapterCache(base.components)
    fresh = []  # the checkpoints after step 0 (the pick is compared by likeness, so the base is not needed)
    for step, _, _ in ev.scores:
        if step == 0:
            continue
        name = f"step{step}"
        lora = tmp_path / "run" / "evaluation" / f"step-{step}" / "lora.safetensors"
        cache.pipe.load_lora_weights(str(lora), adapter_name=name, use_safetensors=True)
        cache.pipe.set_adapters([name], adapter_weights=[1.0])
        fresh.append(E.Record(step, *measure()))
        cache.pipe.delete_adapters(name)
    during = {s: (lk, f) for s, lk, f in ev.scores}
    after = {r.step: r for r in fresh}
    best_after = max(r.likeness for r in fresh)
    print(f"\npicked step {ev.best_step}; during training (likeness, fidelity): "
          + ", ".join(f"{s}: {lk:.2f}/{f:.2f}" for s, (lk, f) in during.items())
          + "\nfresh seeds: " + ", ".join(f"{r.step}: {r.likeness:.2f}/{r.fidelity:.2f}" for r in fresh)
          + f"\nbest on fresh seeds {best_after:.3f}, the pick's {after[ev.best_step].likeness:.3f}; "
          f"train + evaluation {t_train:.0f} s, fresh measurement {time.perf_counter() - t0 - t_train:.0f} s")
    likeness = [r.likeness for r in fresh]
    assert max(likeness) - min(likeness) >= 0.3  # the checkpoints differ: a wrong pick would show
    assert after[ev.best_step].likeness >= best_after - 0.05
