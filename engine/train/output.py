"""What a training run shows and leaves behind: previews through the one sampler, and step 6, the result (LoRA,
preview grid, style.json). Called by engine/train/loop.py's steps with their `Run`."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from engine.train import checkpoints as ck
from engine.core.errors import TrainingDiverged
from engine.core.events import TrainPreview
from engine.models.safety import validate_safetensors
from engine.core.files import atomic_path, atomic_write_bytes
from engine.train.state import Run

PREVIEW_STEPS = 20
PREVIEW_GUIDANCE = 5.0
PREVIEW_SEEDS = (0, 1)
STYLE_SCHEMA_VERSION = 1


def preview(run: Run, prompts, seeds, steps: int = PREVIEW_STEPS) -> list:
    """Images from the model as it is now, through the one sampler (engine.generate.sampler.sample)."""
    from engine.generate.sampler import Components, sample, to_pil

    c, acc, r = run.models.components, run.setup.acc, run.models.resolution
    comps = Components(c.vae, acc.unwrap_model(run.trainable.te), c.tokenizer, acc.unwrap_model(run.trainable.unet),
                       c.scheduler)
    with torch.no_grad(), acc.autocast():
        imgs = sample(comps, list(prompts), [""] * len(prompts), list(seeds), num_inference_steps=steps,
                      guidance_scale=PREVIEW_GUIDANCE, height=r, width=r)
    return to_pil(imgs)


def log_preview(run: Run) -> None:
    import numpy as np

    cfg, step = run.setup.cfg, run.counters.step
    prompts = cfg.validation_prompts
    images = preview(run, prompts, [cfg.seed] * len(prompts))
    run.setup.emit(TrainPreview(step, images))
    for tracker in run.setup.acc.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"preview": np.stack([np.asarray(i) for i in images])}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"preview": images}, step)


# ---- 6: save the result ----------------------------------------------------------------------------------------

def save_trained_lora(run: Run, lora_path: Path) -> None:
    """The trained LoRA in diffusers' PEFT key format with alpha metadata, written atomically."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    cfg, acc = run.setup.cfg, run.setup.acc
    unet, te = acc.unwrap_model(run.trainable.unet), acc.unwrap_model(run.trainable.te)
    # PEFT key format ("...to_q.lora_A.weight"), which diffusers loads as it is. Its older "lora_linear_layer"
    # conversion drops the attention layers when convolution LoRA is in the same file (measured: half missing).
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    if cfg.train_text_encoder:
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(te)
    for sd in layers.values():
        if not all(bool(torch.isfinite(t).all()) for t in sd.values()):
            raise TrainingDiverged("the trained LoRA contains NaN/Inf values and was not saved; lower the learning "
                                   "rate or use bf16/fp32 and resume from the last checkpoint")
    # Without this metadata the loader assumes alpha == rank and reloads at the wrong scale (LIBRARY-NOTES §0.4).
    meta = _collate_lora_metadata({"unet": unet, "text_encoder": te if cfg.train_text_encoder else None})
    out = lora_path.parent
    tmp = out / f".tmp-{uuid.uuid4().hex[:12]}"
    try:
        ck.check_free_space(out, sum(ck.tensor_bytes(sd) for sd in layers.values()), "the trained LoRA")
        StableDiffusionPipeline.save_lora_weights(tmp, weight_name=lora_path.name, **layers, **meta)
        validate_safetensors(tmp / lora_path.name, check_values=True)  # every saved tensor finite (TR-6)
        with atomic_path(lora_path) as dst:
            os.replace(tmp / lora_path.name, dst)
    except OSError as e:
        raise ck.DiskFullError(f"could not save the LoRA ({e}); the checkpoints are kept, resume to retry") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def step6_save(run: Run, out: Path | None = None, grid_path: Path | None = None, *,
               write_lora: Callable[[Run, Path], None] | None = None, extra_style: dict | None = None
               ) -> tuple[Path, Path]:
    """LoRA in diffusers format with alpha metadata, a fixed-seed preview grid and style.json, each atomic, into
    `out` (default: the run's output/). A checkpoint's export (engine/train/evaluate.py) passes its grid; full
    fine-tuning (engine/train/full.py) passes its own `write_lora` (the SVD-extracted LoRA) and style keys."""
    cfg = run.setup.cfg
    out = out or run.setup.run_dir / "output"
    out.mkdir(parents=True, exist_ok=True)
    lora_path = out / f"{cfg.output_name}.safetensors"
    (write_lora or save_trained_lora)(run, lora_path)
    grid_path = grid_path or write_preview_grid(run, out / "preview.png")
    style = {"schema_version": STYLE_SCHEMA_VERSION, "trigger_token": cfg.trigger_token,
             "instance_prompt": cfg.instance_prompt, "preset": cfg.preset, "base_model": cfg.base_model or "demo",
             "base_model_fingerprint": run.models.base.fingerprint,
             "prediction_type": run.models.base.prediction_type,
             "lora_file": lora_path.name, "recommended_strength": 1.0, "steps": run.counters.step,
             "training_config": {**asdict(cfg), "config_schema_version": cfg.schema_version},
             "training_images": run.data.images,
             "preview_grid": grid_path.name, "preview_seeds": list(PREVIEW_SEEDS),
             "library_versions": ck.library_versions(),
             "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **(extra_style or {})}
    style_path = out / "style.json"
    atomic_write_bytes(style_path, json.dumps(style, indent=1).encode())
    return lora_path, style_path


def write_preview_grid(run: Run, path: Path) -> Path:
    """Rows: validation prompts (or the instance prompt); columns: PREVIEW_SEEDS."""
    from PIL import Image

    cfg = run.setup.cfg
    prompts = list(cfg.validation_prompts or (cfg.instance_prompt,))
    pairs = [(p, s) for p in prompts for s in PREVIEW_SEEDS]
    images = preview(run, [p for p, _ in pairs], [s for _, s in pairs])
    r = run.models.resolution
    grid = Image.new("RGB", (r * len(PREVIEW_SEEDS), r * len(prompts)))
    for k, img in enumerate(images):
        grid.paste(img, ((k % len(PREVIEW_SEEDS)) * r, (k // len(PREVIEW_SEEDS)) * r))
    with atomic_path(path) as tmp:
        grid.save(tmp, "PNG")
    return path
