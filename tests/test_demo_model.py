"""The bundled demo model really follows prompts, does not know its held-out shapes, and loads everywhere."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.core.config import SCHEDULERS
from engine.demo import world as W
from engine.demo.checker import DemoChecker
from engine.models.loading import DEMO_MODEL, load_base_model
from engine.generate.sampler import sample, to_pil

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(), reason="demo model not built")


@pytest.fixture(scope="module")
def demo():
    return load_base_model(None)


@pytest.fixture(scope="module")
def checker():
    return DemoChecker.load()


def _generate(model, prompts, seed0=1000):
    imgs = sample(model.components, prompts, [""] * len(prompts), [seed0 + i for i in range(len(prompts))],
                  num_inference_steps=20, guidance_scale=5.0, scheduler="dpmpp_2m")
    return [np.asarray(im) for im in to_pil(imgs)]


def test_shipped_as_fp32_safetensors_under_45_mb():
    """fp32 everywhere: plain diffusers then loads every component in one dtype (issue 8 point 12)."""
    files = [p for p in DEMO_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 45 * 2**20
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 3 and not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt")]
    for p in weights:
        with safe_open(p, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert (DEMO_MODEL / "README.md").is_file() and (DEMO_MODEL / "tokenizer" / "LICENSE-open_clip").is_file()


def test_follows_prompts(demo, checker):
    """32 random train-world prompts, fixed seeds: colours >= 90%, shape >= 80% (the model card has 64+)."""
    rng = random.Random(123)
    scenes = [W.random_scene(rng, W.TRAIN_SHAPES, ("solid",)) for _ in range(32)]
    images = _generate(demo, [W.prompt_for(s.shape, s.fg, s.bg) for s in scenes])
    acc = checker.score(images, scenes)
    assert acc["fg"] >= 0.90 and acc["bg"] >= 0.90, acc
    assert acc["shape"] >= 0.80, acc


@pytest.mark.parametrize("shape", W.HELD_OUT_SHAPES)
def test_does_not_know_held_out_shapes(demo, checker, shape):
    rng = random.Random(7)
    prompts = [W.prompt_for(shape, *rng.sample(sorted(W.COLORS), 2)) for _ in range(16)]
    preds = checker.predict(_generate(demo, prompts))
    assert sum(p["shape"] == shape for p in preds) / len(preds) <= 0.10


def test_does_not_know_held_out_texture(demo, checker):
    rng = random.Random(8)
    prompts = [W.prompt_for(rng.choice(W.TRAIN_SHAPES), *rng.sample(sorted(W.COLORS), 2), texture="checkered")
               for _ in range(16)]
    preds = checker.predict(_generate(demo, prompts))
    assert sum(p["texture"] == "checkered" for p in preds) / len(preds) <= 0.10


def test_engine_and_diffusers_pipeline_agree(demo):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(["a red circle on a blue background"] * 2, num_inference_steps=20, guidance_scale=5.0,
               output_type="pt", generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    ours = sample(demo.components, ["a red circle on a blue background"] * 2, [""] * 2, [3, 4],
                  num_inference_steps=20, guidance_scale=5.0, scheduler="dpmpp_2m")
    assert (ours - ref).abs().max().item() <= 1e-4


def test_examples_for_the_train_tab_exist():
    root = Path(__file__).resolve().parents[1] / "assets" / "examples"
    assert len(list((root / "heart").glob("*.png"))) >= 4
    assert len(list((root / "checkered").glob("*.png"))) >= 4


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_draws_the_prompt(demo, checker, scheduler):
    """Each sampler the Generate tab offers draws what the prompt says on the demo model (20 steps). DDIM used to
    clip its latent-space x0 estimate to [-1, 1] (clip_sample defaulted to True: the demo model's scheduler config
    comes from DPM-Solver++ and lacks the key), which left shape 0.09 and colours 0.12 of 32 (here: colours 0 of 8)."""
    rng = random.Random(321)
    scenes = [W.random_scene(rng, W.TRAIN_SHAPES, ("solid",)) for _ in range(8)]
    imgs = sample(demo.components, [W.prompt_for(s.shape, s.fg, s.bg) for s in scenes], [""] * 8,
                  list(range(2000, 2008)), num_inference_steps=20, guidance_scale=5.0, scheduler=scheduler)
    acc = checker.score([np.asarray(im) for im in to_pil(imgs)], scenes)
    assert acc["fg"] >= 0.80 and acc["shape"] >= 0.70, acc
