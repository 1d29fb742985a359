"""Steps 0-4 of a training run (engine/train/loop.py runs them in order): 0 accelerator, 1 load the base model and
freeze it, 2 add LoRA, 3 the class-prior images, 4 data, then the optimizer."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.core.config import ConfigError
from engine.core.events import TrainLog
from engine.core.train_config import TrainConfig, check_trigger_token
from engine.train import checkpoints as ck
from engine.train.data import DreamBoothData, EpochSampler
from engine.train.state import Data, Models, Setup, Trainable, adapters_off, enter_train_mode


def step0_accelerator(cfg: TrainConfig, run_dir: Path, emit):
    """Accelerator with mixed precision and trackers writing under the run folder."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not several:
        AcceleratorState._reset_state(True)  # in-process: each run may pick another precision
    precision = cfg.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        emit(TrainLog("mixed_precision='fp16' needs a CUDA GPU; training in fp32 on this machine", "warning"))
        precision = "no"
    if cfg.use_8bit_adam and not torch.cuda.is_available():
        raise ConfigError("`use_8bit_adam` needs a CUDA GPU (bitsandbytes); turn it off on this machine")
    log_with = None if cfg.report_to == "none" else cfg.report_to
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard"))
    # torchrun on CPU: accelerate only builds a gloo process group when told cpu=True.
    return Accelerator(cpu=several and not torch.cuda.is_available(), mixed_precision=precision, log_with=log_with,
                       project_config=project)


def step1_load(setup: Setup) -> Models:
    """Load the base model (demo model when `base_model` is empty) and freeze it; training scheduler = DDPM."""
    from diffusers import DDPMScheduler

    from engine.models.loading import load_base_model

    cfg, acc = setup.cfg, setup.acc
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
    # Loaded straight in the compute dtype: no fp32 copy of the whole model on the GPU, even for a moment.
    base = load_base_model(cfg.base_model or None, device=str(acc.device), dtype=weight_dtype)
    c = base.components
    check_trigger_token(cfg.trigger_token, c.tokenizer)  # TrainConfig knows only a word list; this model knows more
    for m in (c.vae, c.unet, c.text_encoder):
        m.requires_grad_(False)
        if weight_dtype != torch.float32:
            m.to(dtype=weight_dtype)  # frozen weights in the compute dtype; LoRA stays fp32 (step 2)
    if acc.device.type == "cuda":
        # GPU-only levers, so CPU results (and the learning tests) stay bit-identical: TF32 for whatever runs in
        # fp32 (LoRA maths, fp32 training) and channels_last convolutions (faster cuDNN kernels on tensor cores).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        c.unet.to(memory_format=torch.channels_last)
    return Models(base, DDPMScheduler.from_config(c.scheduler.config), weight_dtype,
                  cfg.resolution or c.default_size)


def step2_add_lora(setup: Setup, models: Models) -> None:
    """LoRA on the UNet attention projections and (optionally) the text-encoder ones; trainable params in fp32."""
    from accelerate.utils import set_seed
    from peft import LoraConfig, inject_adapter_in_model

    cfg, c = setup.cfg, models.components
    set_seed(cfg.seed)  # same LoRA init on every rank and every run with this seed
    c.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                  target_modules=list(cfg.unet_target_modules)))
    if cfg.train_text_encoder:  # peft directly: works on transformers 5.23 and 5.24 (LIBRARY-NOTES §0.1)
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                           target_modules=list(cfg.text_encoder_target_modules)), c.text_encoder)
    enter_train_mode(cfg, c)


def step3_priors(setup: Setup, class_images, class_captions=()) -> tuple[list[Path], list[str]]:
    """The class-prior images to use (made by engine.train.priors) and the prompt of each; the first `num_class_images`.
    Without captions every class image is trained on the class prompt, which must then be a single one."""
    cfg = setup.cfg
    if not cfg.with_prior_preservation:
        return [], []
    paths = [Path(p) for p in class_images][: cfg.num_class_images]
    if not paths:
        raise ConfigError("`with_prior_preservation` is on but no class images were given: generate them first "
                          "(engine.train.priors) or turn prior preservation off")
    if len(paths) < cfg.num_class_images:
        setup.emit(TrainLog(f"only {len(paths)} of num_class_images={cfg.num_class_images} class images given; "
                          "training with those", "warning"))
    captions = list(class_captions)[: len(paths)]
    if captions and len(captions) != len(paths):
        raise ConfigError(f"{len(paths)} class images but {len(captions)} class captions; give one per image")
    if not captions:
        if len(cfg.class_prompts) > 1:
            raise ConfigError("several class prompts need class images made by the app (engine.train.priors."
                              "ensure_prior_set) or one caption per class image; or use a single class prompt")
        captions = [cfg.class_prompt.strip()] * len(paths)
    return paths, captions


def step4_data(setup: Setup, models: Models, class_paths: list[Path], class_captions: list[str]) -> Data:
    """Dataset, deterministic sampler, training generator and (optionally) cached VAE latents."""
    cfg, c, acc = setup.cfg, models.components, setup.acc
    data = DreamBoothData(cfg, class_paths, c.tokenizer, models.resolution, class_captions)
    images = ck.image_hashes(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * acc.process_index)  # own noise per rank
    if cfg.cache_latents:  # the VAE is frozen and crops are centred, so each image's latent distribution is fixed
        cache = {}
        with torch.no_grad():
            for kind, imgs in data.images.items():
                for i, img in enumerate(imgs):
                    top, left, _ = data.place(img, None)
                    for flip in ((False, True) if cfg.random_flip else (False,)):
                        px = data.pixels(kind, i, top, left, flip)[None].to(acc.device, models.weight_dtype)
                        dist = c.vae.encode(px).latent_dist
                        cache[(kind, i, flip)] = (dist.mean.float(), dist.std.float())
        data.latent_cache = cache
    empty_ids = base_empty = None
    if cfg.uncond_preservation_weight > 0 or cfg.onpolicy_prior_weight > 0:  # the base model's empty prompt, once
        from engine.generate.sampler import tokenize

        empty_ids = tokenize(c.tokenizer, [""])
        with torch.no_grad(), adapters_off(c.text_encoder):
            base_empty = c.text_encoder(empty_ids.to(acc.device), return_dict=False)[0]
    return Data(data, EpochSampler(data.n, cfg.seed), gen, images, ck.dataset_hash(images), empty_ids=empty_ids,
                base_empty=base_empty)


def make_optimizer(setup: Setup, models: Models) -> Trainable:
    """AdamW over LoRA params only (UNet group, text-encoder group with its own LR), the LR schedule, prepare()."""
    from diffusers.optimization import get_scheduler

    cfg, acc, c = setup.cfg, setup.acc, models.components
    groups = [{"params": [p for p in c.unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        groups.append({"params": [p for p in c.text_encoder.parameters() if p.requires_grad],
                       "lr": cfg.text_encoder_lr})
    opt_cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("`use_8bit_adam` needs bitsandbytes, an optional extra: pip install "
                              "'stylebooth[adam8bit]' (or pip install bitsandbytes), or turn 8-bit Adam off") from None
        opt_cls = bnb.optim.AdamW8bit
    # fused=True: one kernel for every parameter's AdamW update instead of a dozen per tensor (GPU only; its
    # rounding differs from the loop version, so CPU keeps the default and its bit-exact numbers).
    fused = {"fused": True} if opt_cls is torch.optim.AdamW and acc.device.type == "cuda" else {}
    optimizer = opt_cls(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, **fused)
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps else cfg.lr_scheduler
    # Not prepared: accelerate would step it once per process per step; we step it exactly once per step.
    lr_scheduler = get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
    if cfg.train_text_encoder:
        unet, te, optimizer = acc.prepare(c.unet, c.text_encoder, optimizer)
    else:  # DDP refuses a module without trainable parameters
        (unet, optimizer), te = acc.prepare(c.unet, optimizer), c.text_encoder
    return Trainable(unet, te, optimizer, lr_scheduler)
