"""Evaluation during training: at every checkpoint, a fixed-seed grid of a few prompts made with the LoRA as it is
at that step (through the run's own sampler, engine.train.output.preview), scored for likeness and prompt fidelity.

DreamBooth (Ruiz et al. 2023, §4.1) measures *subject fidelity* as the mean cosine similarity between image
embeddings of generated and real images (CLIP-I, DINO) and *prompt fidelity* as the mean cosine similarity between
a generated image's and its prompt's CLIP embeddings (CLIP-T). Here:

- `eval_model` set (a local CLIP folder, or a hub id when online): CLIP-I and CLIP-T, the prompt without the
  trigger word (CLIP does not know it; "does the image follow the rest of the prompt").
- no `eval_model`, on the bundled demo model: the demo checker plays the embedding model. Likeness = the checker's
  probability that a generated image shows the training images' concept (their most likely shape for a subject,
  texture for a style); prompt fidelity = the share of what the prompt names (colours; for a style also the shape)
  that the image obeys.
- otherwise the scores are "not available"; the grid is still made and kept.

The rule for the best checkpoint (`best_record`): among the evaluated checkpoints after step 0 whose prompt
fidelity is at least `eval_fidelity_floor` x the base model's (the step-0 evaluation; the first one when a run has
none), the one with the highest likeness, the earliest on a tie; if none keeps that fidelity, the one with the
highest fidelity. Over-training (`overtraining_warning`): the latest checkpoint's likeness is no higher than the
best's (+ LIKENESS_TOL) while its prompt fidelity fell more than FIDELITY_DROP below the best's.

Every evaluated checkpoint is exported like the final result (LoRA, style.json and its grid as the preview, by
engine.train.output.step6_save) to `evaluation/step-<N>/`, so any of them can be published as the style
(engine.train.job.publish_checkpoint), pruned checkpoint or not. Scores: `evaluation/scores.json`.
"""
from __future__ import annotations

import functools
import json
import random
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engine.core.events import TrainEvaluation, TrainLog
from engine.core.files import atomic_path, atomic_write_bytes

SCHEMA_VERSION = 1
EVAL_DIR = "evaluation"
SEED0 = 10_000  # the grid's seeds: SEED0 + cfg.seed + j, far from the preview seeds (0, 1)
N_PROMPTS = 4
# DPM++ 2M steps per evaluation image: cheap, and on the demo model the checker's scores at 8, 12 and 20 steps
# agreed within 0.02 (P(heart) 0.95 / 0.94 / 0.93 on 12 images of a trained subject).
EVAL_STEPS = 10
LIKENESS_TOL = 0.02  # likeness this close to the best's has "stopped rising"
FIDELITY_DROP = 0.05  # prompt fidelity this far below the best's has "fallen"
RULE = ("best checkpoint = the highest likeness among checkpoints whose prompt fidelity is at least "
        "{floor:.2f} x the base model's (earliest on a tie; if none, the highest prompt fidelity)")


@dataclass(frozen=True)
class Record:
    step: int
    likeness: float | None  # None: not available (no evaluation model)
    fidelity: float | None


# ---- pure scoring functions ------------------------------------------------------------------------------------

def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def clip_i(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """CLIP-I (Ruiz et al. 2023, §4.1): mean cosine similarity over all (generated, real) embedding pairs."""
    return float((_unit(generated) @ _unit(reference).T).mean())


def clip_t(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T (Ruiz et al. 2023, §4.1): mean cosine similarity of each image embedding with its prompt's."""
    return float((_unit(images) * _unit(texts)).sum(-1).mean())


def concept_likeness(generated_probs: np.ndarray, training_probs: np.ndarray) -> tuple[float, int]:
    """(mean probability of the concept over the generated images, the concept's class index), the concept being
    the class the training images most likely show (argmax of their mean probabilities)."""
    concept = int(np.asarray(training_probs).mean(0).argmax())
    return float(np.asarray(generated_probs)[:, concept].mean()), concept


def attribute_fidelity(predicted: list[dict], truths: list[dict]) -> float | None:
    """Mean over images of the share of named attributes the image obeys; images whose prompt names none are left
    out (None if no prompt names anything)."""
    shares = [np.mean([p.get(k) == v for k, v in t.items()]) for p, t in zip(predicted, truths) if t]
    return float(np.mean(shares)) if shares else None


def without_trigger(prompt: str, token: str) -> str:
    """The prompt with the trigger word removed (and spaces tidied): what CLIP-T compares with."""
    return re.sub(r"\s+", " ", re.sub(rf"(?<![A-Za-z0-9]){re.escape(token)}(?![A-Za-z0-9])", "", prompt)).strip()


def best_record(records: list[Record], floor: float) -> Record | None:
    """The best checkpoint by the rule in the module doc (None before any scored checkpoint after step 0)."""
    scored = [r for r in records if r.likeness is not None and r.fidelity is not None]
    base = next((r for r in scored if r.step == 0), scored[0] if scored else None)
    trained = [r for r in scored if r.step > 0]
    if not trained:
        return None
    keeps = [r for r in trained if r.fidelity >= floor * base.fidelity]
    if keeps:
        return max(keeps, key=lambda r: (r.likeness, -r.step))
    return max(trained, key=lambda r: (r.fidelity, -r.step))


def overtraining_warning(records: list[Record], best: Record | None) -> str:
    """A sentence for the Train tab when likeness stopped rising and prompt fidelity fell since the best checkpoint
    ("" otherwise)."""
    latest = records[-1] if records else None
    if best is None or latest is None or latest.step <= best.step or latest.likeness is None:
        return ""
    if latest.likeness <= best.likeness + LIKENESS_TOL and latest.fidelity < best.fidelity - FIDELITY_DROP:
        return (f"Over-training likely: since step {best.step} likeness has stopped rising ({best.likeness:.2f} → "
                f"{latest.likeness:.2f}) and prompt fidelity fell ({best.fidelity:.2f} → {latest.fidelity:.2f}). "
                f"Checkpoint {best.step} is the best: publish it as the style, or train fewer steps.")
    return ""


# ---- scorers ---------------------------------------------------------------------------------------------------

def demo_truth(prompt: str) -> dict:
    """What a demo-world prompt names: fg colour, bg colour ("<colour> background") and a shape word if any."""
    from engine.demo import world as W

    words, truth = re.findall(r"[a-z]+", prompt.lower()), {}
    for i, w in enumerate(words):
        if w in W.COLORS:
            if i + 1 < len(words) and words[i + 1] == "background":
                truth.setdefault("bg", w)
            else:
                truth.setdefault("fg", w)
        elif w in W.SHAPES:
            truth.setdefault("shape", w)
    return truth


class DemoScorer:
    """The demo checker as the embedding model (public API only: probabilities and predict)."""

    def __init__(self, checker, preset: str, training_images: list):
        from engine.demo import world as W
        from engine.demo.checker import TEXTURE_LABELS

        self.checker = checker
        self.attribute = "shape" if preset == "subject" else "texture"
        self.training_probs = checker.probabilities(training_images, self.attribute)
        names = W.SHAPES if self.attribute == "shape" else TEXTURE_LABELS
        self.concept = names[concept_likeness(self.training_probs, self.training_probs)[1]]
        obeyed = "colours" if self.attribute == "shape" else "colours and shape"
        self.name = f"demo checker: likeness = P({self.attribute} is {self.concept}), fidelity = {obeyed} obeyed"

    def score(self, images: list, prompts: list[str], token: str) -> tuple[float | None, float | None]:
        arrays = [np.asarray(im.convert("RGB")) for im in images]
        likeness, _ = concept_likeness(self.checker.probabilities(arrays, self.attribute), self.training_probs)
        truths = [demo_truth(without_trigger(p, token)) for p in prompts]
        if self.attribute == "shape":  # the subject is the shape: only the colours are "the rest of the prompt"
            truths = [{k: v for k, v in t.items() if k != "shape"} for t in truths]
        return likeness, attribute_fidelity(self.checker.predict(arrays), truths)


class ClipScorer:
    """CLIP-I and CLIP-T with transformers' CLIPModel (safetensors weights only)."""

    def __init__(self, model, processor, device, training_images: list, source: str):
        self.model, self.processor, self.device = model, processor, device
        self.reference = self.image_embeds(training_images)
        self.name = f"CLIP ({source}): likeness = CLIP-I, fidelity = CLIP-T"

    @torch.no_grad()
    def image_embeds(self, images: list) -> torch.Tensor:
        px = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=px.to(self.device, self.model.dtype))
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 5: an output object

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        enc = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                           attention_mask=enc["attention_mask"].to(self.device))
        return out if torch.is_tensor(out) else out.pooler_output

    def score(self, images: list, prompts: list[str], token: str) -> tuple[float | None, float | None]:
        emb = self.image_embeds(images)
        texts = self.text_embeds([without_trigger(p, token) or p for p in prompts])
        return clip_i(emb, self.reference), clip_t(emb, texts)


@functools.lru_cache(maxsize=1)  # one CLIP at a time, kept for the run's next checkpoints
def load_clip(source: str, device: str):
    from transformers import CLIPModel, CLIPProcessor

    # safetensors only: a pickle file in a downloaded folder can run code (engine.models.safety)
    model = CLIPModel.from_pretrained(source, use_safetensors=True).to(device).eval()
    return model, CLIPProcessor.from_pretrained(source)


def is_demo_model(source: str) -> bool:
    from engine.models.loading import DEMO_MODEL

    return not source or Path(source).resolve() == DEMO_MODEL.resolve()


def make_scorer(cfg, model_source: str, device, warn):
    """The scorer for this run, or (None, why) when scores are not available."""
    from PIL import Image

    images = []
    for p in cfg.instance_images:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    if cfg.eval_model:
        try:
            model, processor = load_clip(cfg.eval_model, str(device))
            return ClipScorer(model, processor, device, images, cfg.eval_model), ""
        except Exception as e:  # noqa: BLE001 - offline, not a CLIP folder, pickle weights: all mean "not available"
            why = f"could not load the evaluation model {cfg.eval_model!r} ({type(e).__name__}: {str(e)[:200]})"
            warn(f"{why}; scores are not available, the evaluation grids are still made")
            return None, why
    if is_demo_model(model_source):
        from engine.demo.checker import DemoChecker

        return DemoScorer(DemoChecker.load(), cfg.preset, [np.asarray(im) for im in images]), ""
    return None, ("no evaluation model for this base model (start the app with --eval-model set to a CLIP folder "
                  "or hub id, or set eval_model in the run's TOML)")


def eval_prompts(cfg, demo: bool) -> list[str]:
    """cfg.eval_prompts, else N_PROMPTS built-in ones: on the demo model the world's phrasing with colours to obey
    (fixed pairs), elsewhere DreamBooth-style recontextualisations of the instance prompt."""
    if cfg.eval_prompts:
        return list(cfg.eval_prompts)
    if demo:
        from engine.demo import world as W

        rng = random.Random(14)
        pairs = [rng.sample(sorted(W.COLORS), 2) for _ in range(N_PROMPTS)]
        if cfg.preset == "subject":
            return [f"{cfg.instance_prompt} in {fg} on a {bg} background" for fg, bg in pairs]
        return [f"a {cfg.trigger_token} {W.TRAIN_SHAPES[i % len(W.TRAIN_SHAPES)]} in {fg} on a {bg} background"
                for i, (fg, bg) in enumerate(pairs)]
    ip = cfg.instance_prompt
    return [ip, f"{ip} on a beach", f"{ip} in the snow", f"{ip}, a watercolor painting"][:N_PROMPTS]


def eval_seeds(cfg) -> list[int]:
    return [SEED0 + cfg.seed + j for j in range(cfg.eval_seeds)]


# ---- the scores file -------------------------------------------------------------------------------------------

def read_scores(run_dir: Path) -> list[Record]:
    """The evaluated checkpoints of a run, oldest first ([] when none or unreadable)."""
    try:
        data = json.loads((Path(run_dir) / EVAL_DIR / "scores.json").read_text("utf-8"))
        return [Record(int(r["step"]), _score(r["likeness"]), _score(r["fidelity"])) for r in data["records"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def best_step(run_dir: Path) -> int | None:
    """The best checkpoint's step as scores.json records it (None: no scores, none picked, or unreadable)."""
    try:
        step = json.loads((Path(run_dir) / EVAL_DIR / "scores.json").read_text("utf-8"))["best_step"]
        return step if isinstance(step, int) and not isinstance(step, bool) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _score(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"a score must be a number, not {type(v).__name__}")
    return float(v)


def write_scores(run_dir: Path, records: list[Record], best: Record | None, floor: float, metric: str) -> None:
    data = {"schema_version": SCHEMA_VERSION, "metric": metric, "rule": RULE.format(floor=floor),
            "best_step": best.step if best else None, "records": [asdict(r) for r in records]}
    atomic_write_bytes(Path(run_dir) / EVAL_DIR / "scores.json", json.dumps(data, indent=1).encode())


def set_aside_stale(run_dir: Path, step: int, floor: float) -> list[Record]:
    """The records up to `step`. Later ones belong to an abandoned branch (a fresh start with resume off, or a
    resume past a corrupt checkpoint): their exports are moved aside, never deleted, and no longer offered."""
    records = read_scores(run_dir)
    stale = [r for r in records if r.step > step]
    if not stale:
        return records
    stamp = f"old-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    for r in stale:
        folder = checkpoint_export(run_dir, r.step)
        if folder.is_dir():
            folder.rename(folder.with_name(f"{folder.name}.{stamp}"))
    kept = [r for r in records if r.step <= step]
    data = json.loads((Path(run_dir) / EVAL_DIR / "scores.json").read_text("utf-8"))
    write_scores(run_dir, kept, best_record(kept, floor), floor, data.get("metric", ""))
    return kept


def checkpoint_export(run_dir: Path, step: int) -> Path:
    """The folder a checkpoint is exported to (LoRA, style.json, preview.png)."""
    return Path(run_dir) / EVAL_DIR / f"step-{int(step)}"


# ---- the per-checkpoint evaluator (called by engine.train.loop on rank 0) --------------------------------------

def evaluate_checkpoint(run) -> None:
    """Score the model as it is now, export it (after step 0), record the scores, log them, emit TrainEvaluation."""
    from engine.train.output import preview, step6_save

    setup, step = run.setup, run.counters.step
    cfg = setup.cfg
    if not cfg.eval_seeds or not setup.main or (setup.stop is not None and setup.stop.is_set()):
        return  # a cancel must stop promptly; the resume evaluates this checkpoint (engine.train.loop.train)
    records = set_aside_stale(setup.run_dir, step, cfg.eval_fidelity_floor)
    if any(r.step == step for r in records):  # resumed at a checkpoint evaluated already: show what we have
        best = best_record(records, cfg.eval_fidelity_floor)
        setup.emit(_event(setup, step, records, best, "", [], cfg.eval_fidelity_floor))
        return
    warn = lambda m: setup.emit(TrainLog(m, "warning"))  # noqa: E731
    scorer, why = make_scorer(cfg, run.models.base.source, setup.acc.device, warn)
    prompts = eval_prompts(cfg, is_demo_model(run.models.base.source))
    pairs = [(p, s) for p in prompts for s in eval_seeds(cfg)]
    with torch.random.fork_rng():  # the training's random state stays as the checkpoint saved it
        images = preview(run, [p for p, _ in pairs], [s for _, s in pairs], EVAL_STEPS)
    likeness, fidelity = scorer.score(images, [p for p, _ in pairs], cfg.trigger_token) if scorer else (None, None)
    folder = checkpoint_export(setup.run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    grid = write_grid(images, len(prompts), folder / "preview.png")
    if step > 0 and cfg.method == "lora":
        step6_save(run, out=folder, grid_path=grid)
    elif step > 0:  # full fine-tuning: an SVD per checkpoint would cost minutes each; extracted when published
        from engine.train.full import write_deferred_export

        write_deferred_export(run, folder, grid)
    records.append(Record(step, likeness, fidelity))
    best = best_record(records, cfg.eval_fidelity_floor)
    warning = overtraining_warning(records, best)
    metric = scorer.name if scorer else f"not available: {why}"
    write_scores(setup.run_dir, records, best, cfg.eval_fidelity_floor, metric)
    if likeness is not None:
        setup.acc.log({"eval/likeness": likeness, "eval/prompt_fidelity": fidelity}, step=step)
    for tracker in setup.acc.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"eval/grid": np.asarray(_read_rgb(grid))[None]}, step, dataformats="NHWC")
    if warning:
        warn(warning)
    setup.emit(_event(setup, step, records, best, warning, images, cfg.eval_fidelity_floor, metric))


def _read_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _event(setup, step, records, best, warning, images, floor, metric: str = "") -> TrainEvaluation:
    return TrainEvaluation(step, tuple((r.step, r.likeness, r.fidelity) for r in records),
                           best.step if best else None, warning, metric, list(images), setup.run_dir.name,
                           RULE.format(floor=floor))


def write_grid(images: list, rows: int, path: Path) -> Path:
    """Rows: prompts; columns: seeds."""
    from PIL import Image

    cols = max(1, len(images) // max(1, rows))
    w, h = images[0].size
    grid = Image.new("RGB", (w * cols, h * rows))
    for k, img in enumerate(images):
        grid.paste(img, ((k % cols) * w, (k // cols) * h))
    with atomic_path(path) as tmp:
        grid.save(tmp, "PNG")
    return path
