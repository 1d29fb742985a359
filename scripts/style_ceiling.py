"""A ceiling check for the style preset: does a style LoRA learn a held-out texture from MANY images?

Draws N images of `texture` on the four train shapes the learning table's style rows never ask for (circle, square,
triangle, diamond; random colours, position and size from engine.demo.world), captions them like the examples
("a olis circle in blue on a yellow background"), trains with the style preset + demo settings (plus any
--override), and scores them like scripts/learning_table.py (ring and cross, tune seeds).

    python scripts/style_ceiling.py tiled --images 16 --override max_train_steps=2400 --override lora_rank=16
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts import learning_table as LT  # noqa: E402


def main() -> None:
    import torch

    from engine.core.train_config import TrainConfig, demo_settings, presets
    from engine.demo import world as W
    from engine.demo.checker import DemoChecker
    from engine.models.loading import load_base_model
    from engine.train.loop import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("texture", choices=W.HELD_OUT_TEXTURES)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--override", action="append", default=[], metavar="FIELD=JSON")
    ap.add_argument("--set", dest="seed_set", choices=sorted(LT.SEED_SETS), default="tune")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(123)
    with tempfile.TemporaryDirectory(prefix="style-ceiling-") as tmp:
        images, captions = [], []
        for i in range(args.images):
            s = W.random_scene(rng, ("circle", "square", "triangle", "diamond"), (args.texture,))
            path = Path(tmp) / f"{i}.png"
            W.draw(s).save(path)
            images.append(str(path))
            captions.append(f"a {LT.TOKEN} {s.shape} in {s.fg} on a {s.bg} background")
        p = {**presets("style", token=LT.TOKEN, class_noun="shape"), **demo_settings("style")}
        p.update(with_prior_preservation=False, validation_steps=0, report_to="none", checkpointing_steps=10_000,
                 seed=0, **{k: LT._value(v) for k, v in (o.split("=", 1) for o in args.override)})
        cfg = TrainConfig(instance_images=tuple(images), instance_captions=tuple(captions), **p)
        lora = train(cfg, Path(tmp) / "run", class_images=[], class_captions=[], resume=False).lora_path
        probe = LT.Probe(load_base_model(None), DemoChecker.load())
        print(json.dumps({"texture": args.texture, "images": args.images, "overrides": args.override,
                          **LT.measure(probe, lora, args.texture, args.seed_set)}))


if __name__ == "__main__":
    main()
