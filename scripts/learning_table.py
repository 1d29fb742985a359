"""The concept x metric learning table: one preset per kind, every held-out concept of the demo world.

Each held-out shape is trained as a *subject* from its 4 captioned examples (assets/examples/<shape>/) and each
held-out texture as a *style*, all with the same preset (`presets(kind)` + `demo_settings(kind)`, nothing tuned
per concept), then the demo checker judges fresh generations:

* subject: "a photo of olis shape in <fg> on a <bg> background" over 32 colour pairs that no example caption
  uses: **recognised** (the checker sees the shape, needed >= 0.80) and **colours** (fg and bg both obeyed,
  needed >= 0.90);
* style: "a olis <shape> in <fg> on a <bg> background" over the train shapes the examples never show (ring,
  cross) and colour pairs no caption uses: **styled** (needed >= 0.70): the checker sees the texture, *and* the
  prompt's shape, *and* a plain background of the prompt's colour (the texture went on the shape, the content
  stayed the prompt's); **textured** (the texture alone, anywhere in the image) is shown beside it.

Seeds and colour pairs come in three disjoint sets: `tune` (what presets were chosen on), `report` (the README's
table; looked at once for subjects, after which the subject preset was changed on `tune` again) and `fresh`
(added then; nothing was chosen on it). tests/test_learning_table.py asserts report and fresh.

Usage:
    python scripts/learning_table.py                       # all held-out concepts, report set, markdown table
    python scripts/learning_table.py crescent zigzag --set tune --override lora_rank=16
    python scripts/learning_table.py --method full         # the full fine-tuning column (the model folder itself)
    python scripts/learning_table.py heart --others         # + how many non-token prompts keep their shape
    python scripts/learning_table.py tiled --every 150      # + every 150 steps' LoRA (would an earlier one do?)
    python -m pytest -m learning_table                     # the same table, asserted (tests/test_learning_table.py)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.core.captions import read_captions  # noqa: E402
from engine.core.train_config import FULL_FT_RATES, TrainConfig, demo_settings, presets  # noqa: E402
from engine.demo import world as W  # noqa: E402

EXAMPLES = ROOT / "assets" / "examples"
TOKEN = "olis"
CLASS_PROMPT = "a photo of a shape"
THRESHOLDS = {"recognised": 0.80, "colours": 0.90, "styled": 0.70}  # "textured" is shown, not thresholded
PLAIN_BACKGROUND = 0.8  # W.plain_background of the prompt's bg colour: the style went on the shape, not around it
STYLE_SHAPES_UNSEEN = ("ring", "cross")  # train shapes that no texture example shows
SEED_SETS = {"tune": (7, 300), "report": (8, 400), "fresh": (9, 500)}  # (colour-pair seed, first image seed)
PRIOR_SETS = (6, 16, 26)  # seeds of shape_accuracy: the prior-preservation test's three sets of 48 prompts


def kind_of(concept: str) -> str:
    if concept in W.HELD_OUT_SHAPES:
        return "subject"
    if concept in W.HELD_OUT_TEXTURES:
        return "style"
    raise ValueError(f"{concept!r} is not held out; choose from {', '.join(W.HELD_OUT_SHAPES + W.HELD_OUT_TEXTURES)}")


def example_files(concept: str) -> tuple[list[Path], tuple[str, ...]]:
    images = sorted((EXAMPLES / concept).glob("*.png"))
    default = f"a photo of {TOKEN} shape" if kind_of(concept) == "subject" else f"a {TOKEN} style shape"
    captions, _ = read_captions(images, TOKEN, default)
    return images, captions


def class_members(kind: str) -> tuple[str, ...]:
    """What stands in for the trigger in automatic class prompts: the world's own shapes / textures."""
    return W.TRAIN_SHAPES if kind == "subject" else W.TRAIN_TEXTURES


def config_for(concept: str, *, prior: bool = False, overrides: dict | None = None) -> TrainConfig:
    """The preset with the demo model's settings (what the Train tab's example button fills in), the concept's
    example images and captions, and with prior preservation the automatic class prompts."""
    kind = kind_of(concept)
    images, captions = example_files(concept)
    p = {**presets(kind, token=TOKEN, class_noun="shape", captions=captions, class_members=class_members(kind)),
         **demo_settings(kind, prior=prior)}
    p.update(with_prior_preservation=prior, validation_steps=0, report_to="none", checkpointing_steps=10_000,
             seed=0, instance_images=tuple(str(f) for f in images), instance_captions=captions)
    p.update(overrides or {})  # may replace the captions too (a caption-design lever)
    return TrainConfig(**p)


def full_overrides(overrides: dict | None = None) -> dict:
    """Full fine-tuning with the demo model's full-FT learning rates (what the Train tab switches to), the same
    steps and every other preset setting, so the column compares methods, not tunings (uncond preservation needs a
    LoRA to switch off, so it is off, as the Train tab's method switch does)."""
    lr, te_lr = FULL_FT_RATES["demo"]
    return {"method": "full", "learning_rate": lr, "text_encoder_lr": te_lr, "uncond_preservation_weight": 0.0,
            "prior_target": "images",
            **(overrides or {})}


def checkpoint_loras(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, LoRA) of every checkpoint the run evaluated, in step order: the records of its scores.json and the
    folders engine/train/evaluate.py exported them to (pruned or not); step 0, the base model, has no LoRA."""
    from engine.train.evaluate import checkpoint_export, read_scores

    found = [(r.step, checkpoint_export(run_dir, r.step) / "lora.safetensors") for r in read_scores(run_dir)]
    return sorted((step, f) for step, f in found if f.is_file())


def run_name(concept: str, prior: bool, overrides: dict | None) -> str:
    tag = "-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8] if overrides else ""
    return f"{concept}-{'prior' if prior else 'plain'}{tag}"


def _same_run(run_dir: Path, cfg: TrainConfig) -> bool:
    """The finished run in run_dir was trained with exactly these weights-changing settings."""
    from engine.core.config import from_dict
    from engine.core.train_config import config_hash

    try:
        job = json.loads((run_dir / "job.json").read_text("utf-8"))
        return job.get("state") == "done" and config_hash(from_dict(TrainConfig, job["config"])) == config_hash(cfg)
    except (OSError, ValueError, KeyError):
        return False


def train_concept(base, concept: str, workdir: Path, *, prior: bool = False, overrides: dict | None = None,
                  reuse: bool = False) -> Path:
    """Train one concept's LoRA under workdir/<run_name>; `reuse`: take a LoRA already there (same settings)."""
    from engine.train.loop import train
    from engine.train.priors import PriorSpec, ensure_prior_set

    cfg = config_for(concept, prior=prior, overrides=overrides)
    run_dir = workdir / run_name(concept, prior, overrides)
    if reuse and (run_dir / "output" / "lora.safetensors").is_file() and _same_run(run_dir, cfg):
        return run_dir / "output" / "lora.safetensors"
    classes, captions = [], []
    if prior:
        spec = PriorSpec(base.fingerprint, cfg.class_prompts[0], resolution=base.components.default_size)
        classes, captions, _ = ensure_prior_set(base.components, spec, cfg.class_prompts, workdir / "priors",
                                                cfg.num_class_images)
    result = train(cfg, run_dir, class_images=classes,
                   class_captions=captions, resume=False)
    if not (result.lora_path and result.lora_path.is_file()):
        raise RuntimeError(f"training {concept} wrote no LoRA")
    return result.lora_path


class Probe:
    """Generate with the base model or with one LoRA (20 DPM++ steps, guidance 5), and ask the checker.

    `guidance` other than 5 is a diagnostic only (is what a LoRA learned tied to its prompt? classifier-free
    guidance amplifies only that part); the table's thresholds are for 5."""

    def __init__(self, base, checker, guidance: float = 5.0):
        from engine.styles.adapters import AdapterCache

        self.base, self.checker, self.guidance = base, checker, guidance
        self.on_step_start = None  # a diagnostic hook for the sampler (scripts/prior_leak_steps.py)
        self.cache = AdapterCache(base.components)
        self.names: dict[Path, str] = {}

    def use(self, lora: Path | None):
        if lora is None:
            self.cache.pipe.disable_lora() if self.names else None
            return
        if lora not in self.names:
            self.names[lora] = f"a{len(self.names)}"
            self.cache.pipe.load_lora_weights(str(lora), adapter_name=self.names[lora], use_safetensors=True)
        self.cache.pipe.enable_lora()
        self.cache.pipe.set_adapters([self.names[lora]], adapter_weights=[1.0])

    def generate(self, prompts, seed0=0) -> list[np.ndarray]:
        from engine.generate.sampler import sample, to_pil

        imgs = sample(self.base.components, prompts, [""] * len(prompts), [seed0 + i for i in range(len(prompts))],
                      num_inference_steps=20, guidance_scale=self.guidance, scheduler="dpmpp_2m",
                      on_step_start=self.on_step_start)
        return [np.asarray(im) for im in to_pil(imgs)]

    def predict(self, prompts, seed0=0):
        return self.checker.predict(self.generate(prompts, seed0))


def _caption_pairs(concept: str) -> set[tuple[str, str]]:
    """(fg, bg) of the example captions: the table asks for other pairs."""
    pairs = set()
    for cap in example_files(concept)[1]:
        words = cap.replace(",", " ").split()
        named = [w for w in words if w in W.COLORS]
        if len(named) >= 2:
            pairs.add((named[0], named[1]))
    return pairs


def new_colour_pairs(concept: str, n: int, seed: int) -> list[tuple[str, str]]:
    rng, seen, out = random.Random(seed), _caption_pairs(concept), []
    while len(out) < n:
        pair = tuple(rng.sample(sorted(W.COLORS), 2))
        if pair not in seen:
            out.append(pair)
    return out


def table_pairs(concept: str, seed_set: str, n: int = 32) -> tuple[list[tuple[str, str]], int]:
    """The table's (fg, bg) colour pairs for `concept` on a seed set, and the set's first image seed."""
    pair_seed, seed0 = SEED_SETS[seed_set]
    index = (W.HELD_OUT_SHAPES + W.HELD_OUT_TEXTURES).index(concept)
    return new_colour_pairs(concept, n, pair_seed + 1000 * index), seed0


def style_prompts(concept: str, seed_set: str, n: int = 32, token: str = TOKEN):
    """The table's style prompts (a shape no example shows, new colours): prompts, shapes, backgrounds, first seed.
    `token` "" leaves the trigger out (instant style: the reference image brings the texture)."""
    pairs, seed0 = table_pairs(concept, seed_set, n)
    shapes = [STYLE_SHAPES_UNSEEN[i % len(STYLE_SHAPES_UNSEEN)] for i in range(n)]
    word = f"{token} " if token else ""
    prompts = [f"a {word}{s} in {fg} on a {bg} background" for s, (fg, bg) in zip(shapes, pairs)]
    return prompts, shapes, [bg for _, bg in pairs], seed0


def measure(probe, lora: Path | None, concept: str, seed_set: str = "report", n: int = 32) -> dict[str, float]:
    """The concept's metrics (see module doc) for `lora` (None: the base model, the "before" column)."""
    probe.use(lora)
    if kind_of(concept) == "subject":
        pairs, seed0 = table_pairs(concept, seed_set, n)
        preds = probe.predict([f"a photo of {TOKEN} shape in {fg} on a {bg} background" for fg, bg in pairs], seed0)
        return {"recognised": float(np.mean([p["shape"] == concept for p in preds])),
                "colours": float(np.mean([p["fg"] == fg and p["bg"] == bg for p, (fg, bg) in zip(preds, pairs)]))}
    prompts, shapes, backgrounds, seed0 = style_prompts(concept, seed_set, n)
    images = probe.generate(prompts, seed0)
    preds = probe.checker.predict(images)
    return {"styled": float(np.mean(styled(concept, preds, images, shapes, backgrounds))),
            "textured": float(np.mean([p["texture"] == concept for p in preds]))}


def styled(texture: str, preds, images, shapes, backgrounds) -> list[bool]:
    """Per image: the checker sees `texture` and the prompt's shape, and the background is plain in its colour."""
    return [p["texture"] == texture and p["shape"] == s and W.plain_background(im, bg) >= PLAIN_BACKGROUND
            for p, im, s, bg in zip(preds, images, shapes, backgrounds)]


def non_token_predictions(probe, n: int = 48, seed: int = 6) -> tuple[list, list[dict]]:
    """Non-token prompts ("a red circle on a blue background"): their scenes and the checker's predictions."""
    rng = random.Random(seed)
    scenes = [W.random_scene(rng, W.TRAIN_SHAPES, ("solid",)) for _ in range(n)]
    return scenes, probe.predict([W.prompt_for(s.shape, s.fg, s.bg) for s in scenes], seed0=100)


def shape_accuracy(probe, n: int = 48, seed: int = 6) -> float:
    """Non-token prompts: how often the checker sees the prompted shape."""
    scenes, preds = non_token_predictions(probe, n, seed)
    return float(np.mean([p["shape"] == s.shape for p, s in zip(preds, scenes)]))


def right_shapes(probe, n: int = 48) -> list[int]:
    """Right shapes of n non-token prompts in each of PRIOR_SETS: the prior-preservation measure."""
    return [round(shape_accuracy(probe, n, seed=s) * n) for s in PRIOR_SETS]


def class_prompt_heart(probe, n: int = 32) -> float:
    """How often CLASS_PROMPT ("a photo of a shape") draws the heart (seeds 200+)."""
    return float(np.mean([p["shape"] == "heart" for p in probe.predict([CLASS_PROMPT] * n, seed0=200)]))


@dataclass
class Row:
    concept: str
    kind: str
    metrics: dict[str, float]
    train_s: float  # wall clock (the machine may be shared)
    cpu_s: float = 0.0  # CPU time of training + measuring: what it costs on one free core

    def passed(self) -> bool:
        return all(v >= THRESHOLDS.get(k, 0.0) for k, v in self.metrics.items())


def markdown(rows: list[Row]) -> str:
    lines = ["| concept | preset | recognised / styled | colours obeyed | textured (anywhere) | CPU s | pass |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        main = r.metrics.get("recognised", r.metrics.get("styled"))
        col, tex = r.metrics.get("colours"), r.metrics.get("textured")
        lines.append(f"| {r.concept} | {r.kind} | {main:.2f} | {'' if col is None else f'{col:.2f}'} | "
                     f"{'' if tex is None else f'{tex:.2f}'} | {r.cpu_s:.0f} | {'yes' if r.passed() else '**no**'} |")
    return "\n".join(lines)


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> None:
    import tempfile

    import torch

    from engine.demo.checker import DemoChecker
    from engine.models.loading import load_base_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concepts", nargs="*", help="held-out shapes/textures (default: all)")
    ap.add_argument("--set", dest="seed_set", choices=sorted(SEED_SETS), default="report")
    ap.add_argument("--override", action="append", default=[], metavar="FIELD=JSON",
                    help="a TrainConfig field for every run (lever experiments), e.g. lora_rank=16")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="use LoRAs already in --workdir for the same settings")
    ap.add_argument("--prior", action="store_true", help="prior preservation on (automatic class prompts)")
    ap.add_argument("--guidance", type=float, default=5.0,
                    help="diagnostic: measure at this guidance scale (the thresholds are for 5)")
    ap.add_argument("--train-only", action="store_true", help="train (into --workdir) without measuring")
    ap.add_argument("--method", choices=("lora", "full"), default="lora",
                    help="full: fine-tune every UNet (+ text-encoder) weight and measure the saved model folder")
    ap.add_argument("--every", type=int, default=0, metavar="N",
                    help="LoRA: also measure the LoRA of every N steps (evaluated checkpoints, 1 eval seed)")
    ap.add_argument("--others", action="store_true",
                    help="subjects: also the share of PRIOR_SETS' 3 x 48 non-token prompts that keep their shape")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = {k: _value(v) for k, v in (o.split("=", 1) for o in args.override)}
    if args.method == "full":
        overrides = full_overrides(overrides)
    if args.every:
        overrides = {"checkpointing_steps": args.every, "eval_seeds": 1, **overrides}
    base = load_base_model(None)
    probe = None if args.train_only else Probe(base, DemoChecker.load(), args.guidance)
    if probe and args.others:
        print("base model: non-token prompts keep their shape", sum(right_shapes(probe)), "of", 48 * len(PRIOR_SETS))
    rows = []
    with tempfile.TemporaryDirectory(prefix="learning-table-") as tmp:
        for concept in args.concepts or list(W.HELD_OUT_SHAPES + W.HELD_OUT_TEXTURES):
            t0, c0 = time.time(), time.process_time()
            lora = train_concept(base, concept, args.workdir or Path(tmp), overrides=overrides, reuse=args.reuse,
                                prior=args.prior)
            row = Row(concept, kind_of(concept), {}, time.time() - t0, time.process_time() - c0)
            if probe is None:
                print(concept, lora, f"{row.train_s:.0f}s wall, {row.cpu_s:.0f}s CPU", flush=True)
                continue
            if args.method == "full":  # the fine-tuned model itself, not the LoRA extracted from it
                tuned, lora = Probe(load_base_model(lora.parent / "model"), probe.checker, args.guidance), None
            else:
                tuned = probe
                for step, ckpt in checkpoint_loras(lora.parents[1]) if args.every else ():
                    print(concept, f"step {step}", measure(probe, ckpt, concept, args.seed_set), flush=True)
            row.metrics = measure(tuned, lora, concept, args.seed_set)
            if args.others and row.kind == "subject":  # measure() left the LoRA on
                row.metrics["others"] = sum(right_shapes(tuned)) / (48 * len(PRIOR_SETS))
            row.cpu_s = time.process_time() - c0
            rows.append(row)
            print(concept, row.metrics, f"{row.train_s:.0f}s", flush=True)
    if rows:
        print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
