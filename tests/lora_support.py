"""LoRA files in the trainer's format for tests and the bench: `trained_like_lora` (one file, alpha != rank, for
import/export) and `make_random_style` (a published random-B style, for blends and batches on any model)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.core.train_config import UNET_TARGETS

R, ALPHA = 4, 8  # alpha != rank: a wrong alpha shows as a wrong scale (LIBRARY-NOTES §0.4)


def _pipe(model: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)


def trained_like_lora(model: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA saved exactly as engine/train/output.py step 6 saves one (PEFT keys, alpha metadata, LoRA on
    attention, feed-forward, proj_in/out and the ResNet convs, and on the text encoder), with random non-zero B."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = _pipe(model)
    pipe.unet.add_adapter(LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                     target_modules=list(UNET_TARGETS)))
    inject_adapter_in_model(LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), pipe.text_encoder)
    for n, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    meta = _collate_lora_metadata({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    StableDiffusionPipeline.save_lora_weights(out, weight_name="lora.safetensors",
                                              unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
                                              **meta)
    return out / "lora.safetensors"


ATTN = ("to_q", "to_k", "to_v", "to_out.0")
LOCON = ATTN + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")  # the subject preset's layers
TE = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_random_style(model, data_dir: Path, name: str, *, seed: int, rank: int = 4, alpha: int = 4,
                      unet_targets=LOCON, te_targets=TE, scale: float = 1.0, trigger: str = "zwx",
                      preset: str = "style"):
    """Publish a style whose LoRA has random A and B (so it changes images) on `model` (a LoadedModel)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from engine.models.loading import load_base_model
    from engine.styles.store import publish

    # A private copy of the model's modules: the LoRA must not stay injected in the caller's model.
    c = load_base_model(model.source or None, device="cpu", dtype=torch.float32).components
    torch.manual_seed(seed)
    c.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                  target_modules=list(unet_targets)))
    layers = {"unet_lora_layers": get_peft_model_state_dict(c.unet)}
    te = None
    if te_targets:
        te = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                                target_modules=list(te_targets)), c.text_encoder)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(te)
    for sd in layers.values():
        for k, v in sd.items():
            if "lora_B" in k:
                v.mul_(scale)
    meta = _collate_lora_metadata({"unet": c.unet, "text_encoder": te})
    out = data_dir / f"_make-{name}"
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out, weight_name="lora.safetensors", **layers, **meta)
    (out / "style.json").write_text(json.dumps({
        "schema_version": 1, "trigger_token": trigger, "preset": preset, "lora_file": "lora.safetensors",
        "base_model_fingerprint": model.fingerprint, "created": f"2026-01-01T00:00:{seed % 60:02d}",
        "training_config": {"class_prompt": "a shape", "lora_rank": rank, "lora_alpha": alpha}}))
    return publish(data_dir, name, out / "lora.safetensors", out / "style.json")

