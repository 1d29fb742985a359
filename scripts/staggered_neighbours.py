"""Could the texture family (scripts/ip_adapter_textures.py) grow neighbours of tiled and polka? (issue 14)

Staggered patterns, i.e. a rectangle or a plus-shaped dot on a py x px grid with every band shifted sideways (bricks
and dots of other sizes than the held-out ones), are enumerated, kept if they are far enough from every held-out
texture by the family's own geometry guard (Hamming distance >= MIN_DISTANCE under every shift, transpose and tone
inversion, checkerboards of every cell size included), and then drawn on 16 random scenes for the demo checker.
If the checker calls them "polka" or "tiled", a base model trained on them would draw what the learning table
counts as the held-out texture from its own training words, and the table could no longer tell a learned style
from a neighbour the base already knew.

    python scripts/staggered_neighbours.py [--all]

Prints one JSON line per candidate that passes geometry (with --all) and a summary line. ~30 CPU s.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.demo import world as W  # noqa: E402
from scripts.ip_adapter_textures import MIN_DISTANCE, TextureFamily, held_out_distances, tile_pixels  # noqa: E402

RECTS = ((1, 1), (1, 2), (2, 1), (1, 3), (2, 2), (2, 3), (3, 2), (1, 4), (2, 4), (3, 3), (3, 4), (4, 2))
PLUS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def staggered(motif: np.ndarray, py: int, px: int, shift: int) -> np.ndarray | None:
    """The motif at the top left of a py x px cell; each band of cells shifted `shift` px further sideways."""
    h, w = motif.shape
    if h >= py or w >= px:
        return None
    bands = px // np.gcd(px, shift)
    tile = np.zeros((py * bands, px), bool)
    for b in range(bands):
        for y, x in zip(*np.nonzero(motif)):
            tile[b * py + y, (x + b * shift) % px] = True
    return tile


def candidates() -> dict[str, np.ndarray]:
    """Every staggered pattern of RECTS and PLUS on cells up to 8 x 8 px, each distinct pattern once."""
    motifs = [(f"r{h}x{w}", np.ones((h, w), bool)) for h, w in RECTS] + [("plus", PLUS)]
    out, seen = {}, set()
    for py in range(2, 9):
        for px in range(2, 9):
            for shift in sorted({px // 2, 1, px - 1} - {0}):
                for name, motif in motifs:
                    tile = staggered(motif, py, px, shift)
                    if tile is not None and (key := tile_pixels(tile, 32).tobytes()) not in seen:
                        seen.add(key)
                        out[f"{name}/{py}x{px}s{shift}"] = tile
    return out


def main() -> None:
    from engine.demo.checker import DemoChecker

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="print every candidate that passes geometry")
    a = ap.parse_args()
    checker, rng, family = DemoChecker.load(), random.Random(0), TextureFamily(0, 0)
    cands, far, held_out_named = candidates(), 0, Counter()
    for name, tile in cands.items():
        m = tile_pixels(tile, 32)
        d = min(held_out_distances(m).values())
        if d < MIN_DISTANCE:
            continue
        far += 1
        scenes = [W.random_scene(rng, W.TRAIN_SHAPES) for _ in range(16)]
        labels = Counter(p["texture"] for p in checker.predict([family._draw(s, name, tile, rng) for s in scenes]))
        called = sum(labels[t] for t in W.HELD_OUT_TEXTURES)
        held_out_named["at most 1 of 16" if called <= 1 else "more than 1 of 16"] += 1
        if a.all:
            print(json.dumps({"candidate": name, "distance": round(d, 3), "labels": labels}), flush=True)
    print(json.dumps({"candidates": len(cands), "far_enough": far, "checker_names_a_held_out_texture": held_out_named}))


if __name__ == "__main__":
    main()
