"""A LoRA file saved the way the trainer saves one, for tests that import, export, blend or apply styles."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.core.train_config import UNET_TARGETS

R, ALPHA = 4, 8  # alpha != rank: a wrong alpha shows as a wrong scale (LIBRARY-NOTES §0.4)


def _pipe(model: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)


def trained_like_lora(model: Path, out: Path) -> Path:
    """A LoRA saved exactly as engine/train/output.py step 6 saves one (PEFT keys, alpha metadata, LoRA on
    attention, feed-forward, proj_in/out and the ResNet convs, and on the text encoder), with random non-zero B."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
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
