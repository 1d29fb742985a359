"""DreamBooth + LoRA training on the UNet and the text encoder (VAE frozen), as numbered steps.

Ruiz et al. 2023 ("DreamBooth") with LoRA adapters (Hu et al. 2021) through peft, following diffusers'
`examples/dreambooth/train_dreambooth_lora.py` but cut into small functions: 1 load, 2 add LoRA, 3 priors,
4 data, 5 loop, 6 save (engine/train_output.py). Checkpoints resume bit-exactly (engine/checkpoints.py; job
state in engine/jobs.py). Runs in-process for the UI, and under `accelerate launch` / `torchrun` through engine/train.py (only rank 0 writes files).
"""
from __future__ import annotations

import gc
import hashlib
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import checkpoints as ck
from . import jobs
from .config import ConfigError
from .events import (TrainCheckpoint, TrainEvent, TrainingDiverged, TrainingError, TrainingOOM,  # noqa: F401
                     TrainLog, TrainPreview, TrainProgress, TrainResult)
from .train_config import TrainConfig, check_trigger_token

__all__ = ["train", "TrainingError", "TrainingDiverged", "TrainingOOM", "TrainCheckpoint", "TrainLog", "TrainPreview",
           "TrainProgress", "TrainResult"]



# ---- typed events, results and errors: engine/events.py (no torch there, so the UI can match on them) ----------

# ---- math and data: engine/train_math.py, engine/train_data.py ------------------------------------------------
from .train_data import DreamBoothData, EpochSampler  # noqa: E402,F401
from .train_math import diffusion_target, dreambooth_loss, is_oom, min_snr_weights, offset_noise  # noqa: E402,F401
from .train_output import log_preview, step6_save  # noqa: E402


# ---- the run: everything the steps share -------------------------------------------------------------------------

@dataclass
class Run:
    cfg: TrainConfig
    run_dir: Path
    acc: object  # accelerate.Accelerator
    emit: Callable[[TrainEvent], None]
    stop_event: threading.Event | None
    model: object = None  # engine.models.LoadedModel
    noise_scheduler: object = None
    unet: torch.nn.Module | None = None  # prepared (DDP-wrapped under several processes)
    te: torch.nn.Module | None = None
    data: DreamBoothData | None = None
    sampler: EpochSampler | None = None
    gen: torch.Generator | None = None  # noise, timesteps, latents, crops, flips: one stream, saved in checkpoints
    optimizer: object = None
    lr_scheduler: object = None
    weight_dtype: torch.dtype = torch.float32
    resolution: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    bad_in_a_row: int = 0
    micro_batch: int = 1
    last_ckpt: int | None = None
    images: list[dict] = field(default_factory=list)  # name + sha256 of each training image
    dataset_hash: str = ""

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def te_active(self, step: int) -> bool:
        """Train the text encoder only for the first `text_encoder_stop_fraction` of the steps (it overfits fast)."""
        return self.cfg.train_text_encoder and step < math.ceil(self.cfg.text_encoder_stop_fraction
                                                                * self.cfg.max_train_steps)

    def lora_params(self) -> dict[str, torch.nn.Parameter]:
        """Every LoRA parameter by a stable name ("unet." / "text_encoder." + peft name)."""
        out = {}
        for prefix, m in (("unet", self.unet), ("text_encoder", self.te)):
            for n, p in self.acc.unwrap_model(m).named_parameters():
                if "lora_" in n:
                    out[f"{prefix}.{n}"] = p
        return out


# ---- 0..4: accelerator, load, LoRA, priors, data -----------------------------------------------------------------

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


def step1_load(run: Run) -> None:
    """Load the base model (demo model when `base_model` is empty) and freeze it; training scheduler = DDPM."""
    from diffusers import DDPMScheduler

    from .models import load_base_model

    cfg, acc = run.cfg, run.acc
    run.model = load_base_model(cfg.base_model or None, device=str(acc.device))
    c = run.model.components
    check_trigger_token(cfg.trigger_token, c.tokenizer)  # TrainConfig knows only a word list; this model knows more
    run.noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
    run.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
    for m in (c.vae, c.unet, c.text_encoder):
        m.requires_grad_(False)
        if run.weight_dtype != torch.float32:
            m.to(dtype=run.weight_dtype)  # frozen weights in the compute dtype; LoRA stays fp32 (step 2)
    run.resolution = cfg.resolution or c.default_size


def step2_add_lora(run: Run) -> None:
    """LoRA on the UNet attention projections and (optionally) the text-encoder ones; trainable params in fp32."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model

    cfg, c = run.cfg, run.model.components
    set_seed(cfg.seed)  # same LoRA init on every rank and every run with this seed
    c.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                  target_modules=list(cfg.unet_target_modules)))
    if cfg.train_text_encoder:  # peft directly: works on transformers 5.23 and 5.24 (LIBRARY-NOTES §0.1)
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                           target_modules=list(cfg.text_encoder_target_modules)), c.text_encoder)
    cast_training_params([c.unet, c.text_encoder], torch.float32)
    if cfg.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            c.text_encoder.gradient_checkpointing_enable()
    c.unet.train()
    c.text_encoder.train(cfg.train_text_encoder)
    run.unet, run.te = c.unet, c.text_encoder  # replaced by the prepared (wrapped) models in make_optimizer


def step3_priors(run: Run, class_images, class_captions=()) -> tuple[list[Path], list[str]]:
    """The class-prior images to use (made by engine.priors) and the prompt of each; the first `num_class_images`.
    Without captions every class image is trained on the class prompt, which must then be a single one."""
    cfg = run.cfg
    if not cfg.with_prior_preservation:
        return [], []
    paths = [Path(p) for p in class_images][: cfg.num_class_images]
    if not paths:
        raise ConfigError("`with_prior_preservation` is on but no class images were given: generate them first "
                          "(engine.priors) or turn prior preservation off")
    if len(paths) < cfg.num_class_images:
        run.emit(TrainLog(f"only {len(paths)} of num_class_images={cfg.num_class_images} class images given; "
                          "training with those", "warning"))
    captions = list(class_captions)[: len(paths)]
    if captions and len(captions) != len(paths):
        raise ConfigError(f"{len(paths)} class images but {len(captions)} class captions; give one per image")
    if not captions:
        if len(cfg.class_prompts) > 1:
            raise ConfigError("several class prompts need class images made by the app (engine.priors."
                              "ensure_prior_set) or one caption per class image; or use a single class prompt")
        captions = [cfg.class_prompt.strip()] * len(paths)
    return paths, captions


def step4_data(run: Run, class_paths: list[Path], class_captions: list[str]) -> None:
    """Dataset, deterministic sampler, training generator and (optionally) cached VAE latents."""
    cfg, c = run.cfg, run.model.components
    run.data = DreamBoothData(cfg, class_paths, c.tokenizer, run.resolution, class_captions)
    run.images = ck.image_hashes(cfg)
    run.dataset_hash = ck.dataset_hash(run.images)
    run.sampler = EpochSampler(run.data.n, cfg.seed)
    run.gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * run.acc.process_index)  # own noise per rank
    run.micro_batch = cfg.train_batch_size
    if cfg.cache_latents:  # the VAE is frozen and crops are centred, so each image's latent distribution is fixed
        cache = {}
        with torch.no_grad():
            for kind, imgs in run.data.images.items():
                for i, img in enumerate(imgs):
                    top, left, _ = run.data.place(img, None)
                    for flip in ((False, True) if cfg.random_flip else (False,)):
                        px = run.data.pixels(kind, i, top, left, flip)[None].to(run.acc.device, run.weight_dtype)
                        dist = c.vae.encode(px).latent_dist
                        cache[(kind, i, flip)] = (dist.mean.float(), dist.std.float())
        run.data.latent_cache = cache


def make_optimizer(run: Run) -> None:
    """AdamW over LoRA params only (UNet group, text-encoder group with its own LR), the LR schedule, prepare()."""
    from diffusers.optimization import get_scheduler

    cfg, acc, c = run.cfg, run.acc, run.model.components
    groups = [{"params": [p for p in c.unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        groups.append({"params": [p for p in c.text_encoder.parameters() if p.requires_grad],
                       "lr": cfg.text_encoder_lr})
    opt_cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("`use_8bit_adam` needs bitsandbytes: pip install bitsandbytes") from None
        opt_cls = bnb.optim.AdamW8bit
    optimizer = opt_cls(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps else cfg.lr_scheduler
    # Not prepared: accelerate would step it once per process per step; we step it exactly once per step.
    run.lr_scheduler = get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                     num_training_steps=cfg.max_train_steps)
    if cfg.train_text_encoder:
        run.unet, run.te, run.optimizer = acc.prepare(c.unet, c.text_encoder, optimizer)
    else:  # DDP refuses a module without trainable parameters
        run.unet, run.optimizer = acc.prepare(c.unet, optimizer)
        run.te = c.text_encoder


# ---- 5: the loop (previews and step 6 are in engine/train_output.py) -----------------------------------------------------------------------------------------------

def encode_latents(run: Run, batch: dict) -> torch.Tensor:
    """z = (μ + σ·n) · scaling_factor, from the VAE or the latent cache, noise drawn from the run's generator."""
    vae = run.model.components.vae
    if run.data.latent_cache is not None:
        mean = torch.cat([run.data.latent_cache[k][0] for k in batch["keys"]])
        std = torch.cat([run.data.latent_cache[k][1] for k in batch["keys"]])
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixels"].to(run.acc.device, run.weight_dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
    z = mean + std * torch.randn(mean.shape, generator=run.gen).to(mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def forward_loss(run: Run, batch: dict, te_on: bool) -> torch.Tensor:
    """One micro-batch: noise the latents at random timesteps, predict, compare with the target."""
    from diffusers.training_utils import compute_snr

    cfg, ns, dev = run.cfg, run.noise_scheduler, run.acc.device
    latents = encode_latents(run, batch)
    noise = offset_noise(latents.shape, run.gen, cfg.noise_offset).to(dev)
    t = torch.randint(0, ns.config.num_train_timesteps, (latents.shape[0],), generator=run.gen).to(dev)
    noisy = ns.add_noise(latents, noise, t)
    ids = batch["ids"].to(dev)
    with run.acc.autocast():
        if te_on:
            enc = run.te(ids, return_dict=False)[0]
        else:  # frozen (or stopped): skip the DDP wrapper, which would wait for gradients that never come
            with torch.no_grad():
                enc = run.acc.unwrap_model(run.te)(ids, return_dict=False)[0]
        pred = run.unet(noisy, t, enc, return_dict=False)[0]
    target = diffusion_target(ns, latents, noise, t)
    weights = torch.ones(latents.shape[0], device=dev)
    if cfg.snr_gamma > 0:
        weights = min_snr_weights(compute_snr(ns, t), cfg.snr_gamma, ns.config.prediction_type)
    return dreambooth_loss(pred, target, weights, cfg.with_prior_preservation, cfg.prior_loss_weight)


def accumulate(run: Run, indices: list[int], te_on: bool) -> float:
    """Backward over micro-batches of `run.micro_batch`; each loss is scaled so the sum is the batch mean."""
    from contextlib import ExitStack

    chunks = [indices[i:i + run.micro_batch] for i in range(0, len(indices), run.micro_batch)]
    total = 0.0
    for k, chunk in enumerate(chunks):
        batch = run.data.batch(chunk, run.gen)
        with ExitStack() as stack:
            if k < len(chunks) - 1:  # all-reduce gradients only once per optimizer step
                for m in (run.unet, run.te) if te_on else (run.unet,):
                    stack.enter_context(run.acc.no_sync(m))
            loss = forward_loss(run, batch, te_on) * (len(chunk) / len(indices))
            run.acc.backward(loss)
        total += float(loss.detach())
    return total


def optimizer_step(run: Run) -> float:
    """One optimizer step with OOM back-off (TR-7) and the NaN/Inf guard (TR-6); returns the step's loss."""
    cfg, acc = run.cfg, run.acc
    te_on = run.te_active(run.step)
    if cfg.train_text_encoder and not te_on:
        for name, p in run.lora_params().items():
            if name.startswith("text_encoder."):
                p.requires_grad_(False)  # no grad → AdamW skips the param: no momentum or decay after the stop
    n = cfg.train_batch_size * cfg.gradient_accumulation_steps  # the effective batch; OOM back-off keeps it
    indices = run.sampler.take(n * acc.num_processes)[n * acc.process_index: n * (acc.process_index + 1)]
    gen_state = run.gen.get_state()
    while True:
        try:
            loss = accumulate(run, indices, te_on)
            params = [p for p in run.lora_params().values() if p.grad is not None]
            grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
            break
        except RuntimeError as e:
            if not is_oom(e):
                raise
            run.optimizer.zero_grad(set_to_none=True)  # back to the state before the step
            del e
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            run.gen.set_state(gen_state)
            if run.micro_batch == 1:
                raise TrainingOOM(f"out of memory at step {run.step + 1} even with a micro-batch of 1 at "
                                  f"{run.resolution}px: lower `resolution`, turn on `gradient_checkpointing`, "
                                  "`cache_latents` or mixed precision, or close other programs using the GPU") from None
            old = run.micro_batch
            run.micro_batch = max(1, old // 2)
            run.emit(TrainLog(f"out of memory at step {run.step + 1}: micro-batch {old} → {run.micro_batch}, "
                              f"gradient accumulation {math.ceil(n / old)} → {math.ceil(n / run.micro_batch)} "
                              f"(effective batch stays {n}); retrying the step", "warning"))
    if acc.num_processes > 1:  # one loss for all ranks, so every rank takes the same skip/step decision
        loss = float(acc.reduce(torch.tensor([loss], device=acc.device), "mean"))
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or acc.scaler is not None)  # fp16: scaler skips
    if finite:
        run.optimizer.step()
        run.bad_in_a_row = 0
    else:
        run.skipped += 1
        run.bad_in_a_row += 1
        run.emit(TrainLog(f"step {run.step + 1}: loss {loss} / grad norm {grad_norm} is not finite; update skipped "
                          f"({run.bad_in_a_row} in a row)", "warning"))
    run.optimizer.zero_grad(set_to_none=True)
    run.lr_scheduler.step()  # skipped steps still count: the schedule follows the step number
    if run.bad_in_a_row >= cfg.max_nonfinite_steps:
        kept = f"checkpoint-{run.last_ckpt} is kept" if run.last_ckpt else "no checkpoint was saved"
        raise TrainingDiverged(f"training diverged: {run.bad_in_a_row} steps in a row had a NaN/Inf loss or "
                               f"gradient (step {run.step + 1}). Lower the learning rate or use bf16/fp32 "
                               f"(mixed_precision 'bf16' or 'no'); {kept}, no LoRA was saved.")
    return loss


def save_state(run: Run) -> None:
    """Checkpoint now (every rank takes part; rank 0 writes), then report it."""
    path = ck.save_run(run, warn=lambda m: run.emit(TrainLog(m, "warning")))
    run.last_ckpt = run.step
    if run.main:
        run.emit(TrainCheckpoint(run.step, path))
        jobs.write_job(run.run_dir, "checkpointed", step=run.step, checkpoint=path.name)


def step5_loop(run: Run) -> bool:
    """Optimizer steps until max_train_steps or a stop request; returns True when cancelled."""
    cfg, acc = run.cfg, run.acc
    t0, first = time.perf_counter(), run.step
    while run.step < cfg.max_train_steps:
        if run.stop_event is not None and run.stop_event.is_set():
            if run.step > (run.last_ckpt or 0):
                save_state(run)  # so that "resume" continues from here
            return True
        loss = optimizer_step(run)
        run.step += 1
        run.losses.append(loss)
        lr = run.lr_scheduler.get_last_lr()[0]
        eta = (time.perf_counter() - t0) / (run.step - first) * (cfg.max_train_steps - run.step)
        run.emit(TrainProgress(run.step, cfg.max_train_steps, loss, lr, eta))
        acc.log({"loss": loss, "lr": lr}, step=run.step)
        if cfg.validation_steps and cfg.validation_prompts and run.step % cfg.validation_steps == 0 and run.main:
            log_preview(run)
        if (cfg.checkpointing_steps and run.step % cfg.checkpointing_steps == 0) or run.step == cfg.max_train_steps:
            save_state(run)
    return False


def check_ranks_in_sync(run: Run) -> None:
    """Compare a checksum of the LoRA weights across processes (accelerator.gather); DDP must keep them equal."""
    digest = hashlib.sha256(b"".join(p.detach().float().cpu().numpy().tobytes()
                                     for _, p in sorted(run.lora_params().items()))).digest()
    rows = run.acc.gather(torch.tensor(list(digest[:8]), dtype=torch.int64, device=run.acc.device)[None])
    if not bool((rows == rows[0]).all()):
        raise TrainingError(f"the {run.acc.num_processes} processes ended with different LoRA weights; "
                            "the result is not saved. Report this with the run folder.")
    run.emit(TrainLog(f"ranks in sync: LoRA checksum {digest[:8].hex()} identical on {run.acc.num_processes} ranks"))


# ---- the API -----------------------------------------------------------------------------------------------------

def train(config: TrainConfig, run_dir: Path, *, class_images=(), class_captions=(), on_event: Callable[[TrainEvent], None] | None = None,
          stop_event: threading.Event | None = None, resume: bool = True) -> TrainResult:
    """Train a DreamBooth LoRA into `run_dir` (checkpoints/, tensorboard/, output/, job.json); see module doc.

    Resumes from the newest valid checkpoint unless `resume` is False. `stop_event` stops at the next step boundary
    after a checkpoint (cancelled=True). Raises ConfigError, TrainingError, CheckpointError or DiskFullError with a
    message for the user; job.json then says "failed".
    """
    run_dir = Path(run_dir)
    main = int(os.environ.get("RANK", "0")) == 0  # only rank 0 reports and writes files
    emit = (on_event or (lambda e: None)) if main else (lambda e: None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        jobs.write_job(run_dir, "running", step=0, total=config.max_train_steps, message="", config=asdict(config))
    run = None
    try:
        missing = [p for p in config.instance_images if not Path(p).is_file()]
        if missing:  # before minutes of model loading
            raise ConfigError(f"training image(s) not found: {', '.join(missing[:5])}; add them again or fix the paths")
        run = Run(config, run_dir, step0_accelerator(config, run_dir, emit), emit, stop_event)
        step1_load(run)
        step2_add_lora(run)
        if main:  # TR-8: room for limit+1 checkpoints (LoRA + 2 Adam moments) and the result
            lora_bytes = ck.tensor_bytes(run.lora_params())
            ck.check_free_space(run_dir, lora_bytes * (3 * (config.checkpoints_total_limit + 1) + 1), "training")
        step4_data(run, *step3_priors(run, class_images, class_captions))
        make_optimizer(run)
        resumed_from = ck.restore_run(run, resume, warn=lambda m: emit(TrainLog(m, "warning")))
        if resumed_from is not None:
            emit(TrainLog(f"resumed from checkpoint-{resumed_from} (epoch {run.sampler.epoch})"))
        run.acc.init_trackers("stylebooth", config={k: (", ".join(v) if isinstance(v, tuple) else v)
                                                    for k, v in asdict(config).items()})
        cancelled = step5_loop(run)
        if run.acc.num_processes > 1:
            check_ranks_in_sync(run)
        lora_path = style_path = None
        if not cancelled and main:
            lora_path, style_path = step6_save(run)
        run.acc.wait_for_everyone()
        run.acc.end_training()
    except BaseException as e:
        if main:
            interrupted = isinstance(e, KeyboardInterrupt)
            jobs.write_job(run_dir, "cancelled" if interrupted else "failed", step=run.step if run else 0,
                         message="interrupted" if interrupted else str(e))
            emit(TrainLog(str(e) or type(e).__name__, "error"))
        for tracker in run.acc.trackers if run else ():
            tracker.finish()  # flush what was logged; the folder stays readable
        raise
    if main:
        jobs.write_job(run_dir, "cancelled" if cancelled else "done", step=run.step,
                     lora=str(lora_path) if lora_path else None)
    accumulation = math.ceil(config.train_batch_size * config.gradient_accumulation_steps / run.micro_batch)
    return TrainResult(lora_path, style_path, run.step, list(run.losses), cancelled, resumed_from, run.skipped,
                       run.micro_batch, accumulation)
