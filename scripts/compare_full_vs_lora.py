"""Full fine-tuning vs LoRA on the demo model's heart subject: likeness and prompt fidelity, side by side.

Both train on the same four heart images and captions as tests/test_learning.py (the subject preset with the demo
model's settings, no class priors). Each model then draws from prompts and seeds that no setting was chosen on,
and the demo checker (engine/demo/checker.py) scores:
  heart      likeness: "a photo of olis shape in <fg> on a <bg> background" drawn as a heart
  colours    prompt fidelity on those prompts: foreground and background both as asked
  others     prompt fidelity elsewhere: non-token prompts ("a red circle on a blue background") keep their shape
Rows: the base model, the LoRA, the fully fine-tuned model, and LoRAs extracted from it by SVD at a few ranks.

Settings for full fine-tuning were chosen with `--eval tune` (other prompts and seeds); report with `--eval report`.
Usage: OMP_NUM_THREADS=1 python scripts/compare_full_vs_lora.py [--eval report] [--lr 1e-4] [--steps 300]
       [--ranks 4,16,64] [--only full] [--reuse] [--out /tmp/compare]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from engine.core.captions import read_captions
from engine.core.train_config import TrainConfig, demo_settings, presets
from engine.demo import world as W
from engine.demo.checker import DemoChecker
from engine.generate.sampler import sample, to_pil
from engine.models.loading import load_base_model
from engine.train import full as F
from engine.train.extract import extract_module, merge
from engine.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples" / "heart"
TOKEN = "olis"
# (colour-prompt seed, first image seed, scene seed, first scene image seed) per evaluation set. "report" is
# tests/test_learning.py's set plus a second fresh one; "tune" shares nothing with either.
EVAL_SETS = {"tune": [(21, 300, 22, 400)], "report": [(5, 0, 6, 100), (33, 1000, 34, 1100)]}


def config(method: str, lr: float, te_lr: float, steps: int, rank: int = 16) -> TrainConfig:
    p = {**presets("subject", token=TOKEN, class_noun="shape"), **demo_settings("subject")}
    p.update(with_prior_preservation=False, validation_steps=0, report_to="none", checkpointing_steps=10_000,
             checkpoints_total_limit=1, seed=0, method=method)
    if method == "full":
        p.update(learning_rate=lr, text_encoder_lr=te_lr, max_train_steps=steps, extract_rank=rank)
    images = sorted(EXAMPLES.glob("*.png"))
    captions, _ = read_captions(images, TOKEN, p["instance_prompt"])
    return TrainConfig(instance_images=tuple(str(f) for f in images), instance_captions=captions, **p)


def colour_prompts(seed: int, n: int = 16):
    rng = random.Random(seed)
    pairs = [tuple(rng.sample(sorted(W.COLORS), 2)) for _ in range(n)]
    return [f"a photo of {TOKEN} shape in {fg} on a {bg} background" for fg, bg in pairs], pairs


def scores(components, checker, sets) -> dict[str, float]:
    def predict(prompts, seed0):
        imgs = sample(components, prompts, [""] * len(prompts), [seed0 + i for i in range(len(prompts))],
                      num_inference_steps=20, guidance_scale=5.0, scheduler="dpmpp_2m")
        return checker.predict([np.asarray(im) for im in to_pil(imgs)])

    heart, colours, others = [], [], []
    for p_seed, seed0, s_seed, s_seed0 in sets:
        prompts, pairs = colour_prompts(p_seed)
        preds = predict(prompts, seed0)
        heart += [p["shape"] == "heart" for p in preds]
        colours += [p["fg"] == fg and p["bg"] == bg for p, (fg, bg) in zip(preds, pairs)]
        rng = random.Random(s_seed)
        scenes = [W.random_scene(rng, W.TRAIN_SHAPES, ("solid",)) for _ in range(24)]
        preds = predict([W.prompt_for(s.shape, s.fg, s.bg) for s in scenes], s_seed0)
        others += [p["shape"] == s.shape for p, s in zip(preds, scenes)]
    return {"heart": float(np.mean(heart)), "colours": float(np.mean(colours)), "others": float(np.mean(others)),
            "n": len(heart)}


def pixels(components, sets) -> torch.Tensor:
    """8 images of token prompts from the first set, as pixels in [0, 1], to compare models directly."""
    prompts, _ = colour_prompts(sets[0][0], n=8)
    seeds = [sets[0][1] + i for i in range(8)]
    return sample(components, prompts, [""] * 8, seeds, num_inference_steps=20, guidance_scale=5.0,
                  scheduler="dpmpp_2m")


def with_lora(base, lora_path: Path, checker, sets, ref=None) -> dict[str, float]:
    """Scores with the LoRA on; with `ref` = (full model's pixels, base pixels) also how far its images are from
    the full model's, as a share of how far the base model's are (0: the same images, 1: no closer than base)."""
    pipe = F_pipe(base)
    pipe.load_lora_weights(str(lora_path), adapter_name="x", use_safetensors=True)
    try:
        out = scores(base.components, checker, sets)
        if ref is not None:
            full_px, base_px = ref
            out["pixel_gap_vs_full"] = float((pixels(base.components, sets) - full_px).abs().mean() /
                                             (base_px - full_px).abs().mean())
        return out
    finally:
        pipe.delete_adapters("x")


def F_pipe(base):
    from diffusers import StableDiffusionPipeline

    c = base.components
    return StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", choices=sorted(EVAL_SETS), default="report")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--te-lr", type=float, default=None, help="text-encoder LR (default: --lr)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ranks", default="4,16,64", help="ranks of the extracted LoRAs to score")
    ap.add_argument("--only", choices=("full", "lora", "all"), default="all")
    ap.add_argument("--reuse", action="store_true", help="use the LoRA / full model an earlier run with the same "
                    "settings left in --out (training is deterministic: the same weights)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/compare-full-vs-lora"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    sets, rows = EVAL_SETS[args.eval], {}
    base, checker = load_base_model(None), DemoChecker.load()
    if args.only == "all":
        rows["base model"] = scores(base.components, checker, sets)
    if args.only in ("all", "lora"):
        t, lora = time.perf_counter(), args.out / "lora" / "output" / "lora.safetensors"
        if not (args.reuse and lora.is_file()):  # training is deterministic: the same file every time
            lora = train(config("lora", 0, 0, 0), args.out / "lora", resume=False).lora_path
        rows["LoRA (rank 8, demo settings)"] = {**with_lora(base, lora, checker, sets),
                                                "train_s": time.perf_counter() - t}
    if args.only in ("all", "full"):
        t = time.perf_counter()
        cfg = config("full", args.lr, args.te_lr or args.lr, args.steps)
        run_dir = args.out / f"full-{args.lr:g}-{args.steps}"
        if not (args.reuse and (run_dir / "output" / F.MODEL_DIR / "model_index.json").is_file()):
            train(cfg, run_dir, resume=False)
        train_s = time.perf_counter() - t
        tuned = load_base_model(run_dir / "output" / F.MODEL_DIR)
        rows[f"full (lr {args.lr:g}, {args.steps} steps)"] = {**scores(tuned.components, checker, sets),
                                                              "train_s": train_s}
        ref = (pixels(tuned.components, sets), pixels(base.components, sets))
        for r in [int(x) for x in args.ranks.split(",") if x]:
            fresh = load_base_model(None)
            ex = merge(extract_module("unet", fresh.components.unet, tuned.components.unet, rank=r),
                       extract_module("text_encoder", fresh.components.text_encoder,
                                      tuned.components.text_encoder, rank=r))
            path = run_dir / f"extracted-r{r}.safetensors"
            F.write_lora_file(ex, path)
            rows[f"extracted LoRA rank {r}"] = {**with_lora(base, path, checker, sets, ref),
                                                "rel_error": ex.rel_error, "unrepresented": ex.unrepresented_share,
                                                "MiB": path.stat().st_size / 2**20}
    print(f"\neval set: {args.eval} {sets}")
    print(f"{'model':38s} {'heart':>6s} {'colours':>8s} {'others':>7s}  extra")
    for name, s in rows.items():
        extra = {k: round(v, 4) for k, v in s.items() if k not in ("heart", "colours", "others", "n")}
        print(f"{name:38s} {s['heart']:6.2f} {s['colours']:8.2f} {s['others']:7.2f}  {extra or ''}")
    (args.out / f"table-{args.eval}-{args.only}-{args.lr:g}-{args.steps}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
