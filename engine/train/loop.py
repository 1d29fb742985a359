"""DreamBooth + LoRA training on the UNet and the text encoder (VAE frozen), as numbered steps.

Ruiz et al. 2023 ("DreamBooth") with LoRA adapters (Hu et al. 2021) through peft, following diffusers'
`examples/dreambooth/train_dreambooth_lora.py` but cut into small functions: 0 accelerator, 1 load, 2 add LoRA,
3 priors, 4 data, optimizer (engine/train/prepare.py), 5 loop, 6 save (engine/train/output.py). Checkpoints
resume bit-exactly (engine/train/checkpoints.py; job state in engine/jobs/state.py). Runs in-process for the app,
and under `accelerate launch` / `torchrun` through `python -m engine.train` (only rank 0 writes files).

The run's state comes in pieces with one owner each (engine/train/state.py).
"""
from __future__ import annotations

import gc
import hashlib
import math
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from engine.core.config import ConfigError
from engine.core.errors import TrainingDiverged, TrainingError, TrainingOOM
from engine.core.events import TrainCheckpoint, TrainEvent, TrainLog, TrainProgress, TrainResult
from engine.core.train_config import TrainConfig
from engine.jobs import state as jobs
from engine.train import checkpoints as ck
from engine.train import full, onpolicy
from engine.train.evaluate import evaluate_checkpoint
from engine.train.state import Counters, Run, Setup, adapters_off, trainable_params
from engine.train.math import (diffusion_target, dreambooth_loss, is_oom, min_snr_weights, offset_noise,
                               sample_timesteps, uncond_preservation_mse)
from engine.train.output import log_preview, step6_save
from engine.train.prepare import (make_optimizer, step0_accelerator, step1_load, step2_add_lora, step3_priors,
                                  step4_data)


# ---- 5: the loop (previews and step 6 are in engine/train/output.py) ---------------------------------------------

def encode_latents(run: Run, batch: dict) -> torch.Tensor:
    """z = (μ + σ·n) · scaling_factor, from the VAE or the latent cache, noise drawn from the run's generator."""
    vae, cache = run.models.components.vae, run.data.data.latent_cache
    if cache is not None:
        mean = torch.cat([cache[k][0] for k in batch["keys"]])
        std = torch.cat([cache[k][1] for k in batch["keys"]])
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixels"].to(run.setup.acc.device, run.models.weight_dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
    z = mean + std * torch.randn(mean.shape, generator=run.data.gen).to(mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def encode_text(run: Run, ids: torch.Tensor, te_on: bool) -> torch.Tensor:
    """Text-encoder outputs; once the encoder no longer trains they are computed once per distinct batch and
    reused (as diffusers' --pre_compute_text_embeddings, but also after `text_encoder_stop_fraction`)."""
    acc, te = run.setup.acc, run.trainable.te
    if te_on:
        return te(ids.to(acc.device), return_dict=False)[0]
    key = ids.numpy().tobytes()
    cached = run.data.text_cache.get(key)
    if cached is None:
        with torch.no_grad():  # skip the DDP wrapper, which would wait for gradients that never come
            cached = acc.unwrap_model(te)(ids.to(acc.device), return_dict=False)[0]
        run.data.text_cache[key] = cached
    return cached


def forward_loss(run: Run, batch: dict, te_on: bool) -> torch.Tensor:
    """One micro-batch: noise the latents at random timesteps, predict, compare with the target."""
    from diffusers.training_utils import compute_snr

    cfg, ns, acc, tr = run.setup.cfg, run.models.noise_scheduler, run.setup.acc, run.trainable
    dev, gen = acc.device, run.data.gen
    latents = encode_latents(run, batch)
    noise = offset_noise(latents.shape, gen, cfg.noise_offset).to(dev)
    t = sample_timesteps(latents.shape[0], cfg.min_timestep, cfg.max_timestep, ns.config.num_train_timesteps,
                         gen).to(dev)
    noisy = ns.add_noise(latents, noise, t)
    keep_uncond = cfg.uncond_preservation_weight > 0
    with acc.autocast():
        enc = encode_text(run, batch["ids"], te_on)
        if keep_uncond:  # one forward for the prompts and the empty prompt (see uncond_preservation_mse)
            n = noisy.shape[0]
            empty = encode_text(run, run.data.empty_ids, te_on).expand(n, -1, -1)
            both = tr.unet(torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([enc, empty]), return_dict=False)[0]
            pred, pred_empty = both[:n], both[n:]
        else:
            pred = tr.unet(noisy, t, enc, return_dict=False)[0]
    target = diffusion_target(ns, latents, noise, t)
    if cfg.with_prior_preservation and cfg.prior_target == "base":
        target = base_prior_target(run, target, noisy, t, batch["ids"])
    weights = torch.ones(latents.shape[0], device=dev)
    if cfg.snr_gamma > 0:
        weights = min_snr_weights(compute_snr(ns, t), cfg.snr_gamma, ns.config.prediction_type)
    loss = dreambooth_loss(pred, target, weights, cfg.with_prior_preservation, cfg.prior_loss_weight)
    if keep_uncond:
        with torch.no_grad(), acc.autocast(), adapters_off(acc.unwrap_model(tr.unet)) as base_unet:
            base = base_unet(noisy, t, run.data.base_empty.expand(n, -1, -1), return_dict=False)[0]
        loss = loss + cfg.uncond_preservation_weight * uncond_preservation_mse(pred_empty, base)
    if cfg.onpolicy_prior_weight > 0:
        loss = loss + cfg.onpolicy_prior_weight * onpolicy_loss(run, te_on)
    return loss


def onpolicy_loss(run: Run, te_on: bool) -> torch.Tensor:
    """The LoRA model against the base model on its own sampling states of class prompts (engine/train/onpolicy.py),
    for the class prompt and the empty prompt. Through the unwrapped UNet: DDP prepares its reducer for one forward
    per backward (the main loss's); autograd sums both graphs' gradients into each parameter before DDP's hook
    all-reduces it (tests/test_onpolicy_prior.py: two torchrun CPU ranks end in sync although each draws its own)."""
    acc, tr = run.setup.acc, run.trainable
    x, t, ids = onpolicy.draw(run)
    x, t = torch.cat([x, x]).to(acc.device), torch.cat([t, t]).to(acc.device)
    ids = torch.cat([ids, run.data.empty_ids.expand(ids.shape[0], -1)])
    with acc.autocast():
        if te_on:
            enc = tr.te(ids.to(acc.device), return_dict=False)[0]
        else:  # not through encode_text's cache: the pool's prompts change every draw
            with torch.no_grad():
                enc = acc.unwrap_model(tr.te)(ids.to(acc.device), return_dict=False)[0]
        pred = acc.unwrap_model(tr.unet)(x, t, enc, return_dict=False)[0]
    base = base_prediction(run, x, t, ids)
    return torch.nn.functional.mse_loss(pred.float(), base.float())


def base_prior_target(run: Run, target: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
    """The class half of the batch (the second, see dreambooth_loss) gets the frozen base model's prediction as its
    target (TrainConfig.prior_target "base"), computed with every LoRA layer bypassed. DreamBooth's prior term
    (Ruiz et al. 2023, eq. 2) pulls it to the noise of one class sample; its minimiser over all of the base model's
    samples is E[noise | noisy latent, prompt], which the base model's prediction approximates (it was trained to
    be that expectation), given here directly."""
    half = noisy.shape[0] // 2
    base = base_prediction(run, noisy[half:], t[half:], ids[half:], cached=True)
    return torch.cat([target[:half], base.to(target.dtype)])


def base_prediction(run: Run, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, cached: bool = False
                    ) -> torch.Tensor:
    """The frozen base model's prediction: every LoRA layer of the UNet and the text encoder bypassed. `cached`: a
    frozen encoder's outputs come from encode_text's cache (they are the base model's)."""
    acc, tr = run.setup.acc, run.trainable
    with torch.no_grad(), acc.autocast(), adapters_off(acc.unwrap_model(tr.unet)) as base_unet:
        if run.setup.cfg.train_text_encoder or not cached:  # its LoRA bypassed too, also after the stop fraction
            with adapters_off(acc.unwrap_model(tr.te)) as base_te:
                enc = base_te(ids.to(acc.device), return_dict=False)[0]
        else:
            enc = encode_text(run, ids, False)
        return base_unet(noisy, t, enc, return_dict=False)[0]


def accumulate(run: Run, indices: list[int], te_on: bool) -> torch.Tensor:
    """Backward over micro-batches of `counters.micro_batch`; each loss is scaled so the sum is the batch mean."""
    from contextlib import ExitStack

    acc, tr, mb = run.setup.acc, run.trainable, run.counters.micro_batch
    chunks = [indices[i:i + mb] for i in range(0, len(indices), mb)]
    total = torch.zeros((), device=acc.device)
    for k, chunk in enumerate(chunks):
        batch = run.data.data.batch(chunk, run.data.gen)
        with ExitStack() as stack:
            if k < len(chunks) - 1:  # all-reduce gradients only once per optimizer step
                for m in (tr.unet, tr.te) if te_on else (tr.unet,):
                    stack.enter_context(acc.no_sync(m))
            loss = forward_loss(run, batch, te_on) * (len(chunk) / len(indices))
            acc.backward(loss)
        total += loss.detach().float()  # no .item() here: one host sync per step, in optimizer_step
    return total


def optimizer_step(run: Run) -> float:
    """One optimizer step with OOM back-off (TR-7) and the NaN/Inf guard (TR-6); returns the step's loss."""
    cfg, acc, tr, n_ = run.setup.cfg, run.setup.acc, run.trainable, run.counters
    te_on = run.te_active(n_.step)
    if cfg.train_text_encoder and not te_on:
        for name, p in run.lora_params().items():
            if name.startswith("text_encoder."):
                p.requires_grad_(False)  # no grad → AdamW skips the param: no momentum or decay after the stop
    n = cfg.train_batch_size * cfg.gradient_accumulation_steps  # the effective batch; OOM back-off keeps it
    indices = run.data.sampler.take(n * acc.num_processes)[n * acc.process_index: n * (acc.process_index + 1)]
    gen_state = run.data.gen.get_state()
    while True:
        try:
            loss_t = accumulate(run, indices, te_on)
            params = [p for p in run.lora_params().values() if p.grad is not None]
            norm_t = acc.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            # The step's one device-to-host sync: the loss and the gradient norm read together.
            loss, grad_norm = torch.stack([loss_t, torch.as_tensor(norm_t, device=loss_t.device).float()]).tolist()
            break
        except RuntimeError as e:
            if not is_oom(e):
                raise
            tr.optimizer.zero_grad(set_to_none=True)  # back to the state before the step
            del e
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            run.data.gen.set_state(gen_state)
            if n_.micro_batch == 1:
                raise TrainingOOM(f"out of memory at step {n_.step + 1} even with a micro-batch of 1 at "
                                  f"{run.models.resolution}px: lower `resolution`, turn on `gradient_checkpointing`, "
                                  "`cache_latents` or mixed precision, or close other programs using the GPU") from None
            old = n_.micro_batch
            n_.micro_batch = max(1, old // 2)
            run.setup.emit(TrainLog(f"out of memory at step {n_.step + 1}: micro-batch {old} → {n_.micro_batch}, "
                                    f"gradient accumulation {math.ceil(n / old)} → {math.ceil(n / n_.micro_batch)} "
                                    f"(effective batch stays {n}); retrying the step", "warning"))
    if acc.num_processes > 1:  # one loss for all ranks, so every rank takes the same skip/step decision
        loss = float(acc.reduce(torch.tensor([loss], device=acc.device), "mean"))
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or acc.scaler is not None)  # fp16: scaler skips
    if finite:
        tr.optimizer.step()
        n_.bad_in_a_row = 0
    else:
        n_.skipped += 1
        n_.bad_in_a_row += 1
        run.setup.emit(TrainLog(f"step {n_.step + 1}: loss {loss} / grad norm {grad_norm} is not finite; update "
                                f"skipped ({n_.bad_in_a_row} in a row)", "warning"))
    tr.optimizer.zero_grad(set_to_none=True)
    tr.lr_scheduler.step()  # skipped steps still count: the schedule follows the step number
    if n_.bad_in_a_row >= cfg.max_nonfinite_steps:
        kept = f"checkpoint-{n_.last_ckpt} is kept" if n_.last_ckpt else "no checkpoint was saved"
        raise TrainingDiverged(f"training diverged: {n_.bad_in_a_row} steps in a row had a NaN/Inf loss or "
                               f"gradient (step {n_.step + 1}). Lower the learning rate or use bf16/fp32 "
                               f"(mixed_precision 'bf16' or 'no'); {kept}, no LoRA was saved.")
    return loss


def save_state(run: Run) -> None:
    """Checkpoint now (every rank takes part; rank 0 writes), then report it."""
    setup = run.setup
    path = ck.save_run(run, warn=lambda m: setup.emit(TrainLog(m, "warning")))
    run.counters.last_ckpt = run.counters.step
    if setup.main:
        setup.emit(TrainCheckpoint(run.counters.step, path))
        jobs.write_job(setup.run_dir, "checkpointed", step=run.counters.step, checkpoint=path.name)
        evaluate_checkpoint(run)  # scores, export and TrainEvaluation (engine/train/evaluate.py)


def step5_loop(run: Run) -> bool:
    """Optimizer steps until max_train_steps or a stop request; returns True when cancelled."""
    cfg, acc, n_ = run.setup.cfg, run.setup.acc, run.counters
    t0, first = time.perf_counter(), n_.step
    while n_.step < cfg.max_train_steps:
        if run.setup.stop is not None and run.setup.stop.is_set():
            if n_.step > (n_.last_ckpt or 0):
                save_state(run)  # so that "resume" continues from here
            return True
        loss = optimizer_step(run)
        n_.step += 1
        n_.losses.append(loss)
        lr = run.trainable.lr_scheduler.get_last_lr()[0]
        eta = (time.perf_counter() - t0) / (n_.step - first) * (cfg.max_train_steps - n_.step)
        run.setup.emit(TrainProgress(n_.step, cfg.max_train_steps, loss, lr, eta))
        acc.log({"loss": loss, "lr": lr}, step=n_.step)
        if cfg.validation_steps and cfg.validation_prompts and n_.step % cfg.validation_steps == 0 and run.setup.main:
            log_preview(run)
        if (cfg.checkpointing_steps and n_.step % cfg.checkpointing_steps == 0) or n_.step == cfg.max_train_steps:
            save_state(run)
    return False


def check_ranks_in_sync(run: Run) -> None:
    """Compare a checksum of the LoRA weights across processes (accelerator.gather); DDP must keep them equal."""
    acc = run.setup.acc
    digest = hashlib.sha256(b"".join(p.detach().float().cpu().numpy().tobytes()
                                     for _, p in sorted(run.lora_params().items()))).digest()
    rows = acc.gather(torch.tensor(list(digest[:8]), dtype=torch.int64, device=acc.device)[None])
    if not bool((rows == rows[0]).all()):
        raise TrainingError(f"the {acc.num_processes} processes ended with different LoRA weights; "
                            "the result is not saved. Report this with the run folder.")
    run.setup.emit(TrainLog(f"ranks in sync: LoRA checksum {digest[:8].hex()} identical on {acc.num_processes} ranks"))


# ---- the API -----------------------------------------------------------------------------------------------------

def train(config: TrainConfig, run_dir: Path, *, class_images=(), class_captions=(),
          on_event: Callable[[TrainEvent], None] | None = None, stop_event: threading.Event | None = None,
          resume: bool = True) -> TrainResult:
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
    setup = run = None
    try:
        missing = [p for p in config.instance_images if not Path(p).is_file()]
        if missing:  # before minutes of model loading
            raise ConfigError(f"training image(s) not found: {', '.join(missing[:5])}; add them again or fix the paths")
        setup = Setup(config, run_dir, step0_accelerator(config, run_dir, emit), emit, stop_event)
        models = step1_load(setup)
        full_ft = config.method == "full"  # full fine-tuning: engine/train/full.py
        (full.step2_full if full_ft else step2_add_lora)(setup, models)
        if main:  # TR-8: room for limit+1 checkpoints (weights + 2 Adam moments) and the result
            params = trainable_params(config, setup.acc, models.components.unet, models.components.text_encoder)
            need = (full.checkpoint_bytes(params, config.checkpoints_total_limit) if full_ft else
                    ck.tensor_bytes(params) * (3 * (config.checkpoints_total_limit + 1) + 1))
            ck.check_free_space(run_dir, need, "full fine-tuning" if full_ft else "training")
        data = step4_data(setup, models, *step3_priors(setup, class_images, class_captions))
        run = Run(setup, models, data, make_optimizer(setup, models), Counters(micro_batch=config.train_batch_size))
        run = ck.restore_run(run, resume, warn=lambda m: emit(TrainLog(m, "warning")))
        resumed_from = run.counters.last_ckpt
        if resumed_from is not None:
            emit(TrainLog(f"resumed from checkpoint-{resumed_from} (epoch {data.sampler.epoch})"))
        setup.acc.init_trackers("stylebooth", config={k: (", ".join(v) if isinstance(v, tuple) else v)
                                                      for k, v in asdict(config).items()})
        evaluate_checkpoint(run)  # the base model (step 0), or a resumed checkpoint not evaluated yet
        cancelled = step5_loop(run)
        if setup.acc.num_processes > 1:
            check_ranks_in_sync(run)
        lora_path = style_path = None
        if not cancelled and main:
            lora_path, style_path = (full.step6_save_full if full_ft else step6_save)(run)
        setup.acc.wait_for_everyone()
        setup.acc.end_training()
    except BaseException as e:
        if main:
            interrupted = isinstance(e, KeyboardInterrupt)
            jobs.write_job(run_dir, "cancelled" if interrupted else "failed", step=run.counters.step if run else 0,
                           message="interrupted" if interrupted else str(e))
            emit(TrainLog(str(e) or type(e).__name__, "error"))
        for tracker in setup.acc.trackers if setup else ():
            tracker.finish()  # flush what was logged; the folder stays readable
        raise
    n_ = run.counters
    if main:
        jobs.write_job(run_dir, "cancelled" if cancelled else "done", step=n_.step,
                       lora=str(lora_path) if lora_path else None)
    accumulation = math.ceil(config.train_batch_size * config.gradient_accumulation_steps / n_.micro_batch)
    return TrainResult(lora_path, style_path, n_.step, list(n_.losses), cancelled, resumed_from, n_.skipped,
                       n_.micro_batch, accumulation)
