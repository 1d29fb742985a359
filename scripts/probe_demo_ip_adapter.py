"""Probe an IP-Adapter for the demo model on random reference pairs (the tuning set of the demo adapter).

Not the acceptance test (tests/test_instant_learning.py uses fixed styles, prompts and seeds 9000+): here each
probe style is 2 references of one random scene family (seeds 700+), the prompts name 2 other shapes and the
references' colours, never the texture. Prints, per reference texture and setting (bare, style only, style and
content), the checker's rate of the reference texture (and its mean probability), of the prompt's shape and of
the reference's shape.

Usage: python scripts/probe_demo_ip_adapter.py [--adapter assets/demo-ip-adapter] [--styles 8] [--strength 1.0]
       [--base DIR]  (a demo-world base other than the bundled one, with an adapter trained for it:
                      scripts/train_demo_ip_adapter.py --base DIR)
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.api import Engine  # noqa: E402
from engine.core.config import GenerateRequest, Settings  # noqa: E402
from engine.demo import world as W  # noqa: E402
from engine.demo.checker import DemoChecker  # noqa: E402
from engine.styles.instant import DEMO_IP_ADAPTER  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, default=DEMO_IP_ADAPTER)
    ap.add_argument("--styles", type=int, default=8, help="probe styles per texture")
    ap.add_argument("--textures", default="checkered,striped")
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=700)
    ap.add_argument("--base", type=Path, help="the model the adapter was trained for (default: the demo model)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="probe-ip-"))
    eng = Engine(Settings(data_dir=str(tmp / "data"), ip_adapter=str(a.adapter.resolve()),
                          model=str(a.base.resolve()) if a.base else ""))
    checker = DemoChecker.load()
    for texture in a.textures.split(","):
        rng = random.Random(f"{a.seed}-{texture}")
        styles = []
        for k in range(a.styles):
            ref = W.random_scene(rng)
            paths = []
            for j in range(2):
                s = W.random_scene(rng, (ref.shape,))
                p = tmp / f"{texture}-{k}-{j}.png"
                W.draw(W.Scene(**{**s.__dict__, "fg": ref.fg, "bg": ref.bg, "texture": texture})).save(p)
                paths.append(str(p))
            sid = eng.create_instant_style(f"probe {texture} {k}", paths).id
            shapes = rng.sample([s for s in W.TRAIN_SHAPES if s != ref.shape], 2)
            styles.append((sid, ref, shapes, a.seed + k))
        for setting, only in (("bare", None), ("style only", True), ("style and content", False)):
            hit = kept = leak = n = 0
            prob = 0.0  # the checker's mean probability of the reference texture: less noisy than the rate
            for sid, ref, shapes, seed in styles:
                kw = {} if only is None else dict(instant_style=sid, instant_style_only=only,
                                                  instant_strength=a.strength)
                res = eng.generate(GenerateRequest(prompt="\n".join(W.prompt_for(s, ref.fg, ref.bg) for s in shapes),
                                                   prompt_per_line=True, seed=seed, num_inference_steps=20,
                                                   guidance_scale=5.0, **kw))
                images = [im.image for im in res.images]
                prob += float(checker.probabilities(images)[:, W.TEXTURES.index(texture)].sum())
                for p, s in zip(checker.predict(images), shapes):
                    hit += p["texture"] == texture
                    kept += p["shape"] == s
                    leak += p["shape"] == ref.shape
                    n += 1
            print(f"{texture:10s} {setting:18s} texture {hit / n:.2f} (p {prob / n:.2f})  shape kept {kept / n:.2f}  "
                  f"reference shape {leak / n:.2f}  (n={n})", flush=True)


if __name__ == "__main__":
    main()
