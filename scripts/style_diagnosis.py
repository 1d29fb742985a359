"""Where does a style LoRA on the demo model fall short: the texture, or the content around it?

Five questions about one style LoRA (trained here with the shipped style preset, or given with --lora), each
answered by the demo checker:

1. **fit**: its own 4 training captions, 4 seeds each, through several samplers: does it draw the texture at all
   (and the caption's shape)? A style the LoRA cannot even reproduce on its examples is a fitting problem; one it
   reproduces there but not on new prompts is a generalisation problem.
2. **denoise**: each training image noised to timestep t, one UNet call, x0 decoded: up to which noise level does
   the LoRA's estimate keep the texture?
3. **parts**: the learning table's style prompts (unseen shapes ring / cross, new colours) with the whole LoRA, its
   UNet part only and its text-encoder part only: textured, shape kept (ring / cross), background plain.
4. **steps**: the UNet part switched on only from sampling step k of 20 (the text-encoder part throughout): in
   which steps does it add the texture, and in which does it change the shape?
5. **blocks**: the UNet part kept only at the UNet's highest resolution (its first down block and last up block,
   where a 2-4 px texture is one latent pixel) or only below it (the text-encoder part throughout): which layers
   draw the texture, and which change the shape? (B-LoRA, Frenkel et al. 2024, splits an SDXL LoRA by block the
   same way.)

    python scripts/style_diagnosis.py tiled [--lora PATH] [--set tune] [--workdir DIR]

Measured on the shipped preset's LoRAs in docs/learning-log.md ("What the shipped style LoRAs learned", 2026-11-29).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import scripts.learning_table as LT  # noqa: E402
from engine.demo import world as W  # noqa: E402

SAMPLERS = (("dpmpp_2m", 20, 5.0), ("dpmpp_2m", 50, 5.0), ("euler_a", 50, 5.0), ("dpmpp_2m", 20, 1.0))
TIMESTEPS = (50, 150, 300, 500, 700)
FIRST_STEPS = (0, 5, 8, 11, 14)


def _images(tensor) -> list[np.ndarray]:
    from engine.generate.sampler import to_pil

    return [np.asarray(im) for im in to_pil(tensor)]


def fit(probe, concept: str, seeds: int = 4) -> list[str]:
    from engine.generate.sampler import sample

    _, captions = LT.example_files(concept)
    prompts = [c.replace("{token}", LT.TOKEN) for c in captions for _ in range(seeds)]
    shapes = [p.split()[2] for p in prompts]  # "a olis <shape> in ..."
    lines = []
    for scheduler, steps, guidance in SAMPLERS:
        imgs = sample(probe.base.components, prompts, [""] * len(prompts), list(range(len(prompts))),
                      num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler)
        preds = probe.checker.predict(_images(imgs))
        labels = Counter(p["texture"] for p in preds).most_common(3)
        lines.append(f"fit {scheduler} {steps} steps, guidance {guidance:g}: textured "
                     f"{np.mean([p['texture'] == concept for p in preds]):.2f}, shape "
                     f"{np.mean([p['shape'] == s for p, s in zip(preds, shapes)]):.2f}, labels {labels}")
    return lines


def denoise(probe, concept: str, seeds: int = 4) -> list[str]:
    import torch
    from PIL import Image

    from engine.feedback.fabric import encode_images
    from engine.generate.sampler import encode_prompts

    c = probe.base.components
    files, captions = LT.example_files(concept)
    scale = c.vae.config.scaling_factor
    lines = []
    with torch.no_grad():
        latents = encode_images(c, [Image.open(f) for f in files])
        embeds = encode_prompts(c, [cap.replace("{token}", LT.TOKEN) for cap in captions])
        for t in TIMESTEPS:
            a = c.scheduler.alphas_cumprod[t]
            preds = []
            for s in range(seeds):
                noisy = a.sqrt() * latents + (1 - a).sqrt() * torch.randn(latents.shape,
                                                                          generator=torch.Generator().manual_seed(s))
                v = c.unet(noisy, torch.full((len(files),), t), embeds).sample
                x0 = a.sqrt() * noisy - (1 - a).sqrt() * v  # v-prediction (Salimans & Ho 2022, eq. 7)
                preds += probe.checker.predict(_images((c.vae.decode(x0 / scale).sample / 2 + 0.5).clamp(0, 1)))
            lines.append(f"denoise t={t}: textured {np.mean([p['texture'] == concept for p in preds]):.2f}")
    return lines


def _table_line(probe, concept: str, seed_set: str, n: int, tag: str) -> str:
    prompts, shapes, backgrounds, seed0 = LT.style_prompts(concept, seed_set, n)
    images = probe.generate(prompts, seed0)
    preds = probe.checker.predict(images)
    textured = [p["texture"] == concept for p in preds]
    kept = [p["shape"] == s for p, s in zip(preds, shapes)]
    by_shape = ", ".join(f"{s} {np.mean([k for k, x in zip(kept, shapes) if x == s]):.2f}"
                         for s in LT.STYLE_SHAPES_UNSEEN)
    plain = [W.plain_background(im, bg) >= LT.PLAIN_BACKGROUND for im, bg in zip(images, backgrounds)]
    styled = LT.styled(concept, preds, images, shapes, backgrounds)
    return (f"{tag}: textured {np.mean(textured):.2f}, shape kept {np.mean(kept):.2f} ({by_shape}), background "
            f"plain {np.mean(plain):.2f}, styled {np.mean(styled):.2f}")


def parts(probe, lora: Path, concept: str, seed_set: str, n: int = 32) -> list[str]:
    c = probe.base.components
    lines = []
    probe.use(None)
    lines.append(_table_line(probe, concept, seed_set, n, "parts: base model"))
    probe.use(lora)
    lines.append(_table_line(probe, concept, seed_set, n, "parts: whole LoRA"))
    c.text_encoder.disable_adapters()
    lines.append(_table_line(probe, concept, seed_set, n, "parts: UNet part only"))
    c.text_encoder.enable_adapters()
    c.unet.disable_lora()
    lines.append(_table_line(probe, concept, seed_set, n, "parts: text-encoder part only"))
    c.unet.enable_lora()
    return lines


def steps(probe, concept: str, seed_set: str, n: int = 32) -> list[str]:
    unet = probe.base.components.unet
    lines = []
    for k in FIRST_STEPS:
        probe.on_step_start = lambda i, n, t, k=k: unet.enable_lora() if i >= k else unet.disable_lora()
        lines.append(_table_line(probe, concept, seed_set, n, f"steps: UNet part from step {k} of 20"))
    probe.on_step_start = None
    unet.enable_lora()
    return lines


def highest_resolution(name: str, unet) -> bool:
    """Is a UNet module at the latent's full resolution: the first down block or the last up block?"""
    return name.startswith(("down_blocks.0.", f"up_blocks.{len(unet.up_blocks) - 1}."))


def blocks(probe, concept: str, seed_set: str, n: int = 32) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = probe.base.components.unet
    layers = [(name, m) for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]

    def keep_only(highest: bool | None) -> None:
        """peft's per-layer scale (as engine/styles/adapters.py's block weights): 0 outside the group; None: all 1."""
        for name, m in layers:
            on = highest is None or highest_resolution(name, unet) == highest
            for adapter in m.active_adapters:
                m.set_scale(adapter, 1.0 if on else 0.0)

    try:
        lines = []
        for tag, highest in (("highest resolution only", True), ("lower resolutions only", False)):
            keep_only(highest)
            lines.append(_table_line(probe, concept, seed_set, n, f"blocks: UNet part at the {tag}"))
        return lines
    finally:
        keep_only(None)


def main() -> None:
    import tempfile

    import torch

    from engine.demo.checker import DemoChecker
    from engine.models.loading import load_base_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concept", choices=W.HELD_OUT_TEXTURES)
    ap.add_argument("--lora", type=Path, help="a trained style LoRA (default: train one with the shipped preset)")
    ap.add_argument("--set", dest="seed_set", choices=sorted(LT.SEED_SETS), default="tune")
    ap.add_argument("--workdir", type=Path, help="where to train (default: a temporary folder)")
    ap.add_argument("--override", action="append", default=[], metavar="FIELD=JSON", help="as learning_table.py")
    ap.add_argument("--images", type=int, default=32, help="style prompts per line of parts / steps")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per training caption (fit, denoise)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    base = load_base_model(None)
    probe = LT.Probe(base, DemoChecker.load())
    with tempfile.TemporaryDirectory(prefix="style-diagnosis-") as tmp:
        overrides = {k: LT._value(v) for k, v in (o.split("=", 1) for o in a.override)}
        lora = a.lora or LT.train_concept(base, a.concept, a.workdir or Path(tmp), overrides=overrides, reuse=True)
        probe.use(lora)
        for part in (fit(probe, a.concept, a.seeds), denoise(probe, a.concept, a.seeds),
                     parts(probe, lora, a.concept, a.seed_set, a.images), steps(probe, a.concept, a.seed_set, a.images),
                     blocks(probe, a.concept, a.seed_set, a.images)):
            print("\n".join(part), flush=True)


if __name__ == "__main__":
    main()
