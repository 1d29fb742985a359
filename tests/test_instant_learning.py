"""Acceptance of instant styles on the demo model with the demo IP-Adapter, judged by the demo checker.

References are checkered (the held-out texture: in neither the demo model's nor the adapter's training data).
Prompts name a shape other than the references' and the references' colours, never the texture; seeds 9000+ (the
training script draws its own random scenes and seeds; the style-block probe used seeds 700+). Numbers go to the
README ("Instant style"); run with -s to see them.
"""
from __future__ import annotations

import random

import pytest
import torch

from engine.api import Engine
from engine.core.config import GenerateRequest, Settings
from engine.demo import world as W
from engine.demo.checker import DemoChecker
from engine.styles.instant import DEMO_IP_ADAPTER

pytestmark = pytest.mark.skipif(not (DEMO_IP_ADAPTER / "ip_adapter.safetensors").is_file(),
                                reason="the demo IP-Adapter is not built (scripts/train_demo_ip_adapter.py)")
# (reference shape, fg, bg) of the two instant styles; 2 checkered reference images each
STYLES = (("square", "orange", "blue"), ("triangle", "yellow", "purple"))
SEEDS = (9001, 9002)


def _refs(tmp, shape, fg, bg):
    rng = random.Random(f"{shape}{fg}{bg}")
    paths = []
    for k in range(2):
        s = W.random_scene(rng, (shape,))
        p = tmp / f"{shape}-{k}.png"
        W.draw(W.Scene(**{**s.__dict__, "fg": fg, "bg": bg, "texture": "checkered"})).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("instant-acc")
    eng = Engine(Settings(data_dir=str(tmp / "data")))
    checker = DemoChecker.load()
    out = {}
    styles = [(eng.create_instant_style(f"checkered {shape}", _refs(tmp, shape, fg, bg)).id, shape, fg, bg)
              for shape, fg, bg in STYLES]
    for setting, extra in (("bare", None), ("style only", True), ("style and content", False)):
        tex = shape_ok = leak = n = 0
        for sid, ref_shape, fg, bg in styles:
            shapes = [s for s in W.TRAIN_SHAPES if s != ref_shape]
            prompt = "\n".join(W.prompt_for(s, fg, bg) for s in shapes)
            kw = {} if extra is None else dict(instant_style=sid, instant_style_only=extra)
            for seed in SEEDS:
                res = eng.generate(GenerateRequest(prompt=prompt, prompt_per_line=True, seed=seed,
                                                   num_inference_steps=20, guidance_scale=5.0, **kw))
                pred = checker.predict([im.image for im in res.images])
                for p, s in zip(pred, shapes):
                    tex += p["texture"] == "checkered"
                    shape_ok += p["shape"] == s
                    leak += p["shape"] == ref_shape
                    n += 1
        out[setting] = {"checkered": tex / n, "shape kept": shape_ok / n, "reference shape": leak / n, "n": n}
        print(f"instant acceptance, {setting}: {out[setting]}")
    return out


BELOW_TARGET = ("the demo IP-Adapter does not reach the issue's texture target on these prompts (measured 2026-11-30 "
                "with the adapter trained 4800 steps on a 300-texture family, checkered/tiled/polka rigorously held "
                "out: checkered 0.05 style only, target 0.60; prompt's shape kept 0.85, target 0.80; the 1200-step "
                "adapter before it 0.00 / 0.70; trained with checkered in a quarter of its pairs, a diagnostic, 0.90 / "
                "0.75); README 'Instant style'")


@pytest.mark.learning
@pytest.mark.xfail(reason=BELOW_TARGET, strict=False)
def test_checkered_transfers_with_the_prompt_shape_kept(measured):
    assert measured["bare"]["checkered"] == 0.0
    assert measured["style only"]["checkered"] >= 0.60, measured
    assert measured["style only"]["shape kept"] >= 0.80, measured


@pytest.mark.learning
def test_style_and_content_leaks_the_reference_shape_more(measured):
    """Measured 2026-11-30 (4800-step texture-family adapter): reference's shape 0.15 with style and content, 0.05
    with style only (bare 0.10)."""
    assert measured["style and content"]["reference shape"] > measured["style only"]["reference shape"], measured


@pytest.mark.learning
def test_plain_diffusers_loads_the_demo_adapter_and_reproduces_our_images(tmp_path):
    """diffusers' own loader, image encoder and feature extractor; style-only scales as a diffusers block dict."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from engine.generate.sampler import make_scheduler, sample
    from engine.models.loading import DEMO_MODEL
    from engine.styles.instant import STYLE_BLOCKS

    torch.set_num_threads(1)
    eng = Engine(Settings(data_dir=str(tmp_path / "data")))
    refs = _refs(tmp_path, "ring", "green", "white")
    sid = eng.create_instant_style("rings", refs, strength=0.8).id
    with eng._lock:
        _, ours_embeds = eng._activate_instant(sid, 0.8, True)
        prompts, seeds = ["a green cross on a white background", "a green circle on a white background"], [9100, 9101]
        ours = sample(eng.model.components, prompts, [""] * 2, seeds, num_inference_steps=20, guidance_scale=5.0,
                      image_embeds=ours_embeds)

    pipe = StableDiffusionPipeline.from_pretrained(DEMO_MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(DEMO_IP_ADAPTER), subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder="image_encoder")
    # style only = the STYLE_BLOCKS at 0.8, every other block 0, as diffusers' per-block scale dict
    pipe.set_ip_adapter_scale({"up": {f"block_{b.split('.')[1]}": [0.8, 0.8] for b in STYLE_BLOCKS["demo"]}})
    pipe.scheduler = make_scheduler("dpmpp_2m", pipe.scheduler.config)
    images = [Image.open(p).convert("RGB") for p in refs]
    # the pipeline's own encoding (prepare_ip_adapter_image_embeds): pooled embedding and zeros for the basic
    # adapter, penultimate hidden states of the image and of a zero image for IP-Adapter Plus
    from diffusers.models.embeddings import ImageProjection

    plus = not isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], ImageProjection)
    emb, neg = pipe.encode_image(images, "cpu", 1, output_hidden_states=plus)
    emb, neg = emb.mean(0, keepdim=True).detach(), neg.mean(0, keepdim=True).detach()  # ours: the mean of several
    assert (emb - ours_embeds[0]).abs().max().item() <= 1e-5
    assert (neg - ours_embeds[1]).abs().max().item() <= 1e-5
    ref = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds],
               ip_adapter_image_embeds=[torch.cat([neg.expand(2, *neg.shape[1:]),
                                                   emb.expand(2, *emb.shape[1:])])[:, None]]).images
    assert (ours - ref).abs().max().item() <= 1e-4
