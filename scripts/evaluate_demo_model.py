"""Measure the demo model's fidelity with the checker and write its model card (assets/demo-model/README.md).

    python scripts/evaluate_demo_model.py [--model assets/demo-model] [--n 128] [--train-log /tmp/demo-train.log]

Fidelity: n random train-world prompts (shape, colour, background; solid and striped), fixed seeds, 20 DPM++ 2M
steps, guidance 5; the checker decides. Held-out shapes and texture: 32 prompts each, how often they appear.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.demo import world as W  # noqa: E402
from engine.demo.checker import DemoChecker  # noqa: E402
from engine.models.loading import DEMO_MODEL, load_base_model  # noqa: E402
from engine.generate.sampler import sample, to_pil  # noqa: E402
from scripts.train_demo_model import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG  # noqa: E402


def generate(model, prompts, seed0):
    out = []
    for i in range(0, len(prompts), 64):
        chunk = prompts[i:i + 64]
        imgs = sample(model.components, chunk, [""] * len(chunk), [seed0 + i + j for j in range(len(chunk))],
                      num_inference_steps=20, guidance_scale=5.0, scheduler="dpmpp_2m")
        out += [__import__("numpy").asarray(im) for im in to_pil(imgs)]
    return out


def evaluate(model, checker, n: int) -> dict:
    rng = random.Random(2024)
    res = {}
    for texture in ("solid", "striped"):
        scenes = [W.random_scene(rng, W.TRAIN_SHAPES, (texture,)) for _ in range(n // 2)]
        imgs = generate(model, [W.prompt_for(s.shape, s.fg, s.bg, s.texture) for s in scenes], 10_000)
        res[texture] = checker.score(imgs, scenes)
    held = {}
    for shape in W.HELD_OUT_SHAPES:
        prompts = [W.prompt_for(shape, *rng.sample(sorted(W.COLORS), 2)) for _ in range(32)]
        held[shape] = sum(p["shape"] == shape for p in checker.predict(generate(model, prompts, 20_000))) / 32
    prompts = [W.prompt_for(rng.choice(W.TRAIN_SHAPES), *rng.sample(sorted(W.COLORS), 2), "checkered")
               for _ in range(32)]
    held["checkered"] = sum(p["texture"] == "checkered" for p in checker.predict(generate(model, prompts, 30_000))) / 32
    return {"fidelity": res, "held_out_rate": held}


def card(metrics: dict, train_info: str, n: int) -> str:
    rows = "\n".join(f"| {t} | {m['fg']:.1%} | {m['bg']:.1%} | {m['shape']:.1%} | {m['texture']:.1%} |"
                     for t, m in metrics["fidelity"].items())
    held = "\n".join(f"| {k} | {v:.1%} |" for k, v in metrics["held_out_rate"].items())
    return f"""# Stylebooth demo model

A tiny text-to-image model in the standard diffusers Stable Diffusion format (`StableDiffusionPipeline`),
trained from scratch on the procedurally drawn "shapes world" (`engine/demo/world.py`) so that Stylebooth works
offline and its tests can show that training *learns*. It is not a general image model.

## Data
32x32 px images of one shape in a named colour and texture on a coloured background; position, size and
rotation jitter. 8 colours ({", ".join(W.COLORS)}), shapes {", ".join(W.TRAIN_SHAPES)}; textures
{", ".join(W.TRAIN_TEXTURES)} (70/30). **Held out** of the training data: shapes {", ".join(W.HELD_OUT_SHAPES)} and
texture {", ".join(W.HELD_OUT_TEXTURES)} (for DreamBooth subject and style tests; examples in `assets/examples/`).
Captions in 8 phrasings ("a red circle on a blue background", "a photo of a circle in red on a blue background",
"a red shape on a blue background", ...), 10% dropped to "" for classifier-free guidance.

## Model
- Tokenizer: CLIP's real BPE vocabulary (49,408 tokens; from the MIT-licensed open-clip-torch wheel, see
  `tokenizer/LICENSE-open_clip`).
- Text encoder `CLIPTextModel`: {json.dumps(TEXT_CONFIG)}
- UNet `UNet2DConditionModel`: {json.dumps(UNET_CONFIG)}
- VAE `AutoencoderKL` (32x32x3 -> 16x16x4): {json.dumps(VAE_CONFIG)}
- Scheduler: {json.dumps(SCHEDULER_CONFIG)} — v-prediction on DDPM's linear schedule (near-zero terminal SNR).
- Weights: fp32 safetensors (every component, so `StableDiffusionPipeline.from_pretrained(folder)` needs no dtype argument;
  fp16 files made transformers keep the text encoder in fp16 while diffusers loads the UNet in fp32).

## Training
`python scripts/train_demo_model.py --work WORK --out assets/demo-model` (deterministic, resumable): VAE first
(L1 + MSE + tiny KL), then text encoder and UNet jointly from scratch (AdamW, cosine LR with warm-up, min-SNR-5
weighting, bf16 autocast, EMA 0.999 weights shipped).
{train_info}

## Fidelity (measured by `scripts/evaluate_demo_model.py` with the demo checker)
{n} random prompts ("a <colour> <shape> on a <colour> background"; half solid, half striped), seeds fixed,
20 DPM++ 2M steps, guidance 5:

| texture | foreground colour | background colour | shape | texture |
|---|---|---|---|---|
{rows}

How often a held-out concept appears when prompted by name (32 prompts each; lower means the model truly does not
know it):

| held out | rate |
|---|---|
{held}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--train-info", default="", help="a line about training time to put in the card")
    a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    m = evaluate(load_base_model(a.model), DemoChecker.load(), a.n)
    print(json.dumps(m, indent=1))
    (a.model / "README.md").write_text(card(m, a.train_info, a.n), "utf-8")
    print(f"model card written ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
