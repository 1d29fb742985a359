"""Does a texture-family base (scripts/texture_family_base.py) draw each family texture from its made-up word?

For a few of the family's words (staggered neighbours first, then procedural tiles, then hand-written ones) it
writes one row per word: the texture as the world draws it, then the base model's images for three prompts with that
word ("a <word> circle in red on a white background", ...). If the base had learned its words, each row would repeat
its first image's pattern; docs/learning-log.md ("does the family base know its textures?") reports what it shows.

    python scripts/family_base_words.py BASE_DIR --pool 16 --neighbours 8 --out words.png

--pool / --neighbours must be the ones the base was trained with (they rebuild the same family and words).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.demo import world as W  # noqa: E402

PROMPTS = (("circle", "red", "white"), ("square", "blue", "yellow"), ("triangle", "white", "black"))


def main() -> None:
    import torch

    from engine.demo.checker import DemoChecker
    from engine.generate.sampler import sample, to_pil
    from engine.models.loading import load_base_model
    from scripts.ip_adapter_textures import TextureFamily
    from scripts.texture_family_base import texture_words

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("--pool", type=int, default=300)
    ap.add_argument("--neighbours", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    family = TextureFamily(a.pool, 0, DemoChecker.load(), neighbours=a.neighbours)
    words = texture_words([*family.kept_hand_written[1:], *family.family])  # as texture_family_base names them
    rng = random.Random(3)
    stag = [n for n in family.family if n.startswith("stag")]
    procedural = [n for n in family.family if n.startswith("fam")]
    pick = (rng.sample(stag, min(5, len(stag))) + rng.sample(procedural, min(3, len(procedural)))
            + family.kept_hand_written[1:3])
    base, rows = load_base_model(a.base), []
    for name in pick:
        prompts = [f"a {words[name]} {shape} in {fg} on a {bg} background" for shape, fg, bg in PROMPTS]
        images = to_pil(sample(base.components, prompts, [""] * 3, [1, 2, 3], num_inference_steps=20,
                               guidance_scale=5.0, scheduler="dpmpp_2m"))
        square = W.Scene(shape="square", fg="red", bg="white", texture=name, cx=0.5, cy=0.5, radius=0.42, angle=0)
        rows.append(np.concatenate([np.asarray(family.draw(square, name, rng))] + [np.asarray(i) for i in images], 1))
        print(name, words[name], flush=True)
    grid = Image.fromarray(np.concatenate(rows, 0))
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
