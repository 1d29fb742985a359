"""Write the demo world's example training sets (assets/examples/<concept>/): 4 images + kohya-style captions each.

Deterministic: the same world gives byte-identical files. Every held-out shape is a *subject* example, captioned
like the heart ("a photo of {token} shape in red on a blue background"); every held-out texture is a *style*
example, captioned like the checkered one ("a {token} circle in blue on a yellow background"). The heart and
checkered folders predate this script and are left as they are unless named on the command line (the script
draws them the same way, up to the heart's slightly different centring).

Usage:
    python scripts/make_examples.py                 # every held-out concept that has no folder yet
    python scripts/make_examples.py crescent polka  # (re)write these
    python scripts/make_examples.py --vae-check     # how well the demo VAE carries each held-out concept
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.demo import world as W  # noqa: E402

OUT = ROOT / "assets" / "examples"
# The heart example's colours and placement, used for every subject so that results compare across shapes.
SUBJECT_SCENES = (("red", "blue", 0.46), ("yellow", "purple", 0.48), ("green", "white", 0.52),
                  ("orange", "black", 0.54))
# The checkered example's shapes and colours, used for every texture.
STYLE_SCENES = (("circle", "blue", "yellow"), ("square", "red", "white"), ("triangle", "purple", "green"),
                ("diamond", "black", "orange"))


def example_set(concept: str) -> list[tuple[W.Scene, str]]:
    """The 4 (scene, caption) pairs of one held-out concept; "{token}" stands for the trigger."""
    if concept in W.HELD_OUT_SHAPES:
        return [(W.Scene(concept, fg, bg, "solid", cx=cx, cy=0.5, radius=0.36),
                 f"a photo of {{token}} shape in {fg} on a {bg} background") for fg, bg, cx in SUBJECT_SCENES]
    if concept in W.HELD_OUT_TEXTURES:
        return [(W.Scene(shape, fg, bg, concept), f"a {{token}} {shape} in {fg} on a {bg} background")
                for shape, fg, bg in STYLE_SCENES]
    raise SystemExit(f"{concept!r} is not a held-out shape or texture; choose from "
                     f"{', '.join(W.HELD_OUT_SHAPES + W.HELD_OUT_TEXTURES)}")


def write(concept: str) -> Path:
    from engine.core.files import atomic_dir

    folder = OUT / concept
    if folder.exists():  # asked for by name: replace it whole
        shutil.rmtree(folder)
    with atomic_dir(folder) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        for i, (scene, cap) in enumerate(example_set(concept), 1):
            W.draw(scene).save(tmp / f"{concept}-{i}.png", format="PNG", optimize=False)
            (tmp / f"{concept}-{i}.txt").write_text(cap + "\n", "utf-8")
    return folder


def vae_check(n: int = 64, seed: int = 4242) -> None:
    """Encode + decode fresh images of every held-out concept with the demo VAE; report PSNR and whether the
    checker still sees the concept in the reconstruction (a texture the VAE cannot carry cannot be learned)."""
    import random

    import torch
    from diffusers import AutoencoderKL

    from engine.demo.checker import DemoChecker
    from engine.models.loading import DEMO_MODEL

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(DEMO_MODEL / "vae").eval()
    checker = DemoChecker.load()
    rng = random.Random(seed)
    print("| concept | PSNR (dB) | checker on originals | checker on VAE reconstructions |\n|---|---|---|---|")
    for concept in W.HELD_OUT_SHAPES + W.HELD_OUT_TEXTURES:
        attr = "shape" if concept in W.HELD_OUT_SHAPES else "texture"
        shapes = (concept,) if attr == "shape" else W.TRAIN_SHAPES
        textures = ("solid",) if attr == "shape" else (concept,)
        scenes = [W.random_scene(rng, shapes, textures) for _ in range(n)]
        imgs = np.stack([np.asarray(W.draw(s)) for s in scenes])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        psnr = 10 * np.log10(4 / torch.mean((rec - x) ** 2).item())
        out = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        hit = lambda ims: np.mean([p[attr] == concept for p in checker.predict(ims)])  # noqa: E731
        print(f"| {concept} | {psnr:.1f} | {hit(imgs):.2f} | {hit(out):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concepts", nargs="*")
    p.add_argument("--vae-check", action="store_true")
    args = p.parse_args()
    if args.vae_check:
        vae_check()
        return
    todo = args.concepts or [c for c in W.HELD_OUT_SHAPES + W.HELD_OUT_TEXTURES if not (OUT / c).exists()]
    for c in todo:
        print("wrote", write(c))


if __name__ == "__main__":
    main()
