"""Prior preservation across training seeds (issue 14): the heart subject with class priors (the preset's automatic
class prompts), trained once per seed, then measured like tests/test_prior_learning.py: right shapes of the three
sets of 48 non-token prompts (`learning_table.shape_accuracy`, seeds 6 / 16 / 26; base model: 43 / 44 / 43), the
heart recognised on the tune set, and how often "a photo of a shape" turns into the heart.

The test trains one seed (0); one seed's numbers move by up to 5 images per set from seed to seed (docs/learning-log.md
"Prior preservation"), so a recipe is compared here over several.

    python scripts/prior_seeds.py --seeds 0 1 2 3 4 [--override uncond_preservation_weight=10] [--base DIR]
    python scripts/prior_seeds.py --seeds 1 3 --every 100   # the LoRA of every 100 steps, one line each

About 5 CPU minutes per seed on one thread (training ~140 s, 176 images generated and checked), ~2.5 more per
measured checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.learning_table import (Probe, _value, checkpoint_loras, class_prompt_heart, config_for,  # noqa: E402
                                    measure, right_shapes, train_concept)


def main() -> None:
    import torch

    from engine.demo.checker import DemoChecker
    from engine.models.loading import load_base_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (TrainConfig.seed)")
    ap.add_argument("--override", action="append", default=[], metavar="FIELD=JSON",
                    help="a TrainConfig field for every run, e.g. prior_loss_weight=2")
    ap.add_argument("--workdir", type=Path, help="keep the runs (and the shared class images) here")
    ap.add_argument("--base", default="", help="a diffusers folder to train on (default: the bundled demo model)")
    ap.add_argument("--measure-base", action="store_true", help="also measure the base model's right shapes")
    ap.add_argument("--every", type=int, default=0, metavar="N",
                    help="also measure the LoRA of every N steps (evaluated checkpoints, 1 eval seed)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = {k: _value(v) for k, v in (o.split("=", 1) for o in args.override)}
    if args.every:
        overrides = {"checkpointing_steps": args.every, "eval_seeds": 1, **overrides}
    base = load_base_model(args.base or None)
    probe = Probe(base, DemoChecker.load())
    if args.measure_base:
        probe.use(None)
        print("base", right_shapes(probe), flush=True)
    with tempfile.TemporaryDirectory(prefix="prior-seeds-") as tmp:
        for seed in args.seeds:
            t0 = time.time()
            lora = train_concept(base, "heart", args.workdir or Path(tmp), prior=True,
                                 overrides={**overrides, "seed": seed})
            steps = checkpoint_loras(lora.parents[1]) if args.every else []
            last = config_for("heart", prior=True, overrides={**overrides, "seed": seed}).max_train_steps
            if not steps or steps[-1][0] != last:  # a checkpoint at the last step is the final LoRA: measured once
                steps.append(("final", lora))
            for step, f in steps:
                probe.use(f)
                right = right_shapes(probe)
                heart = measure(probe, f, "heart", "tune")["recognised"]
                drift = class_prompt_heart(probe)
                print(json.dumps({"seed": seed, "step": step, "overrides": overrides, "right": right,
                                  "total": sum(right), "heart": heart, "class_prompt_heart": drift,
                                  "wall_s": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
