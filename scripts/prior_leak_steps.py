"""Which sampling steps carry a subject LoRA's leak into non-token prompts (issue 14, prior preservation)?

The prior-preservation measure (`learning_table.right_shapes`: 3 x 48 prompts such as "a red cross on a blue
background") is taken with the LoRA switched on only for some of the 20 DPM++ steps (weight 0 elsewhere, set before
each UNet call). If the leak (mostly "cross" drawn as the heart) came from the high-noise steps, where the layout is
decided, a prior term aimed at those steps would be the fix; if it comes from the middle steps, the LoRA is turning
half-drawn class shapes into its subject.

    python scripts/prior_seeds.py --seeds 1 --workdir RUNS     # a heart LoRA trained with priors
    python scripts/prior_leak_steps.py RUNS/heart-prior-*/output/lora.safetensors [--base DIR]

One line per schedule: right shapes per set, their total, and how many prompts drew the heart. ~2 CPU min each.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.learning_table import PRIOR_SETS, Probe, non_token_predictions  # noqa: E402

SCHEDULES = {  # step index (0..19) -> LoRA on?
    "every step": lambda i: True, "none": lambda i: False,
    "steps 0-4": lambda i: i < 5, "steps 0-9": lambda i: i < 10,
    "steps 5-19": lambda i: i >= 5, "steps 10-19": lambda i: i >= 10,
}


def measure(probe, n: int = 48) -> dict:
    """Right shapes per set (as learning_table.right_shapes) and how many prompts came out as the heart."""
    right, hearts = [], 0
    for seed in PRIOR_SETS:
        scenes, preds = non_token_predictions(probe, n, seed)
        right.append(sum(p["shape"] == s.shape for p, s in zip(preds, scenes)))
        hearts += sum(p["shape"] == "heart" for p in preds)
    return {"right": right, "total": sum(right), "hearts": hearts}


def main() -> None:
    import torch

    from engine.demo.checker import DemoChecker
    from engine.models.loading import load_base_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lora", type=Path)
    ap.add_argument("--base", default="", help="the base model folder the LoRA was trained on (default: demo model)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    probe = Probe(load_base_model(a.base or None), DemoChecker.load())
    probe.use(a.lora)
    name = probe.names[a.lora]
    for label, on in SCHEDULES.items():
        probe.on_step_start = lambda i, n, t, on=on: probe.cache.pipe.set_adapters([name], [float(on(i))])
        print(json.dumps({"schedule": label, **measure(probe)}), flush=True)


if __name__ == "__main__":
    main()
