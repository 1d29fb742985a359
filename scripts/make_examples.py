"""Write the demo world's example training sets (assets/examples/<concept>/): 4 images + kohya-style captions each.

Deterministic: the same world gives byte-identical files. Every held-out shape is a *subject* example, captioned
"a photo of {token} shape in black on a yellow background" (the colours of SUBJECT_SCENES, below); every held-out
texture is a *style* example, captioned like the checkered one ("a {token} circle in blue on a yellow
background") in the colours of STYLE_SCENES (checkered too, since 2026-11-28). The heart folder predates this
script and is left as it is unless named on the command line: it keeps its original colours (red on blue, yellow
on purple, green on white, orange on black, slightly different centring) on purpose: tests/test_learning.py and the
feedback tests are built on them, and with SUBJECT_SCENES' colours the prior-preservation test fails (non-token
shape accuracy with priors 37 of 48 where it needs 40; tune set: heart recognised 0.94 against 0.81, both pass).

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
# (fg, bg, centre x) of every subject's 4 examples (the heart's excepted, see above), the same for every shape so
# that results compare across shapes.
# The colours are a cycle over two dark and two light colours: each is the shape once and the background once,
# two dark-on-light and two light-on-dark. Why (issue 14, scripts/learning_table.py --set tune,
# docs/learning-log.md): from 4 captioned images the LoRA ties each colour word to the role it had there.
# The old examples (red on blue, yellow on purple, green on white, orange on black) had blue, purple and black only
# as backgrounds, and star/bolt in those colours came out as blobs (tune set, recognised heart / star / crescent /
# arrow / bolt / frame: 0.81 / 0.62 / 0.94 / 0.94 / 0.75 / 1.00). Balancing polarity with each colour once (black on
# yellow, orange on purple, blue on white, green on red) only moved the failures to black/blue backgrounds and white
# shapes: 0.62 / 0.69 / 0.81 / 0.69 / 0.56 / 0.88. This cycle: 0.94 / 0.88 / 1.00 / 0.94 / 0.75 / 0.88 (bolt
# still fails; colours 0.81: an orange bolt comes out yellow); the same cycle over black / orange / purple / white:
# 0.94 / 0.81 / 1.00 / 0.69 / 0.75 / 0.94. Colours obeyed >= 0.94 in every other cell (bolt: 0.94, 0.81, 0.81, 1.00).
SUBJECT_SCENES = (("black", "yellow", 0.46), ("yellow", "blue", 0.48), ("blue", "white", 0.52),
                  ("white", "black", 0.54))
# (shape, fg, bg) of every style's 4 examples: a colour cycle, as for the subjects, each of blue / yellow / red /
# purple once as the shape and once as the background. Why (2026-11-28, docs/learning-log.md "Example colours for
# styles"): with the checkered example's colours (blue on yellow, red on white, purple on green, black on orange), a
# style LoRA tied the texture to the colour words too, and a prompt with a red or purple *background* came out
# textured all over.
# Styled, tune / report / fresh, tiled: 0.38 / 0.16 / 0.16 -> 0.50 / 0.41 / 0.53; checkered 0.16 / 0.19 / 0.25 ->
# 0.44 / 0.34 / 0.34; polka 0.25 / 0.38 / 0.28 -> 0.25 / 0.28 / 0.28 (its dots
# are learned in about 1 of 2 images either way).
STYLE_SCENES = (("circle", "blue", "yellow"), ("square", "yellow", "red"), ("triangle", "red", "purple"),
                ("diamond", "purple", "blue"))


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
