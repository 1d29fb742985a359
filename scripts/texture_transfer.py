"""Does a demo IP-Adapter pass the *pattern* of a texture, or only "textured, in these colours"?

The demo checker names 5 textures and calls every other pattern "other", so it cannot say whether an adapter
reproduces one of its ~300 procedural training textures. This script measures that with the pattern itself: per
texture, 2 references in its own colours (triangle, ring or cross), prompts of a circle, a square and a diamond in
those colours, 2 seeds, style only; the score is the Pearson correlation between the second-order statistics
(autocorrelation of the +-1 pattern at shifts dy 0..3, dx -3..3; Julesz's texture statistics, as the encoder's
warm-up uses) of the generated image's central 12 x 12 px, split into two tones at the midpoint of its luminance,
and the same statistics of the reference texture's pattern. "other" is the same images scored against another
trained texture's pattern: the level an adapter reaches by drawing some texture, not this one.

Three groups: the first N textures of the adapter's own training family (the family is drawn in a fixed order,
so its first N are the same whatever the pool), N fresh textures of the same generators (another family seed,
none in the first), and the held-out checkered.

`--vae` asks the same of the demo VAE alone (encode and decode the references, no adapter): what part of a
family's patterns the frozen model can carry at all.

Usage: python scripts/texture_transfer.py --adapter DIR [--latent-share S (as the adapter was trained)] [--n 8]
       [--base DIR]
       python scripts/texture_transfer.py --vae [--latent-share S] [--n 8]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.demo import world as W  # noqa: E402
from scripts.ip_adapter_textures import (TextureFamily, autocorrelation, held_out_pixels,  # noqa: E402
                                         tile_pixels)

REF_SHAPES, PROMPT_SHAPES, SEEDS = ("triangle", "ring", "cross"), ("circle", "square", "diamond"), (11, 12)


def statistics(mask: np.ndarray) -> np.ndarray:
    """Autocorrelation of the +-1 pattern of a 12 x 12 mask at dy 0..3, dx -3..3 over an 8 x 6 window (dy = dx = 0,
    always 1, left out)."""
    return np.array(autocorrelation(mask, 0, 3, 8, 6, 3)[1:])


def image_mask(img) -> np.ndarray:
    """The central 12 x 12 px of a 32 px image (inside every prompt shape here), split at mid-luminance."""
    lum = np.asarray(img, np.float32)[10:22, 10:22] @ np.array([0.299, 0.587, 0.114], np.float32)
    return lum > (lum.min() + lum.max()) / 2


def score(img, tile: np.ndarray) -> float:
    """Pearson r between the image's statistics and those of the periodic pattern of `tile` (one period); 0 for a
    flat fill (no pattern at all)."""
    r = np.corrcoef(statistics(image_mask(img)), statistics(tile_pixels(tile, 12)))[0, 1]
    return float(np.nan_to_num(r))


def vae_round_trip(vae, paths) -> list:
    """The images as the demo VAE returns them (posterior mean, decoded)."""
    from PIL import Image

    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths]) / 127.5 - 1)
    with torch.no_grad():
        y = vae.decode(vae.encode(x.permute(0, 3, 1, 2)).latent_dist.mean).sample
    return [Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)) for im in y]


class _HeldOut:
    def draw(self, scene: W.Scene, texture: str, rng: random.Random):
        return W.draw(W.Scene(**{**scene.__dict__, "texture": texture}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--base", type=Path, help="the model the adapter was trained for (default: the demo model)")
    ap.add_argument("--vae", action="store_true", help="score the demo VAE's reconstructions of the references")
    ap.add_argument("--latent-share", type=float, default=0.0, help="as the adapter was trained with")
    ap.add_argument("--n", type=int, default=8, help="textures per group")
    a = ap.parse_args()
    if not (a.adapter or a.vae):
        ap.error("give --adapter DIR or --vae")
    torch.set_num_threads(1)
    from engine.api import Engine
    from engine.core.config import GenerateRequest, Settings
    from engine.demo.checker import DemoChecker

    checker = DemoChecker.load()
    trained = TextureFamily(a.n, 0, checker, latent_share=a.latent_share)  # seed 0: the training script's family
    seen = {t.tobytes() for t in trained.tiles.values()}
    fresh = TextureFamily(3 * a.n, 99, checker, latent_share=a.latent_share)
    fresh_items = [(n, t) for n, t in fresh.tiles.items() if t.tobytes() not in seen][:a.n]
    groups = [("trained", trained, list(trained.tiles.items())), ("fresh", fresh, fresh_items),
              ("held-out checkered", _HeldOut(), [("checkered", held_out_pixels("checkered", 4))] * a.n)]
    tmp = Path(tempfile.mkdtemp())
    if a.vae:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(Path(__file__).resolve().parents[1] / "assets" / "demo-model" / "vae")
    else:
        eng = Engine(Settings(data_dir=str(tmp / "data"), ip_adapter=str(a.adapter.resolve()),
                              model=str(a.base.resolve()) if a.base else ""))
    rng = random.Random(4321)
    ref_shapes = ("square",) if a.vae else REF_SHAPES  # --vae scores the references themselves: centre filled
    for label, family, items in groups:
        own, other = [], []
        for i, (name, pattern) in enumerate(items):
            colours = W.random_scene(rng, REF_SHAPES)
            paths = []
            for k in range(2):
                scene = W.Scene(**{**W.random_scene(rng, ref_shapes).__dict__, "fg": colours.fg, "bg": colours.bg})
                paths.append(tmp / f"{label[:5]}{i}_{k}.png")
                family.draw(scene, name, rng).save(paths[-1])
            if a.vae:
                images = vae_round_trip(vae, paths)
            else:
                sid = eng.create_instant_style(f"{label[:5]} {i}", [str(p) for p in paths]).id
                prompt = "\n".join(W.prompt_for(s, colours.fg, colours.bg) for s in PROMPT_SHAPES)
                images = [im.image for seed in SEEDS for im in eng.generate(GenerateRequest(
                    prompt=prompt, prompt_per_line=True, seed=seed, num_inference_steps=20, guidance_scale=5.0,
                    instant_style=sid, instant_style_only=True)).images]
            for image in images:
                own.append(score(image, pattern))
                other_name, other_pattern = rng.choice(groups[0][2])
                if other_name != name:
                    other.append(score(image, other_pattern))
        who = a.adapter.name if a.adapter else "demo VAE"
        print(f"{who} {label}: own pattern r {np.mean(own):.3f}, another trained pattern r {np.mean(other):.3f} "
              f"(n={len(own)})", flush=True)


if __name__ == "__main__":
    main()
