"""Refinement: version N+1 of a style from the ratings of version N, by a short training round.

Starts from v(N)'s LoRA (UNet and text encoder, loaded as the trainer saved it), trains the UNet LoRA only with
  - rating-weighted denoising on the liked images (dpo.rated_sft_loss), and
  - Diffusion-DPO (dpo.diffusion_dpo_loss, Wallace et al. 2024 eq. 14) on liked x disliked pairs, each pair with
    one timestep and one noise draw, and v(N) itself as the reference model: a frozen copy of v(N)'s UNet LoRA
    weights is swapped in for the reference prediction, so "the style is the anchor".
It reuses the trainer's pieces (engine.train: the diffusion target, the run folder's job.json, TrainProgress /
TrainLog events, the job's cancel token checked every step) and writes the new version atomically next to the
old one; v(N)'s folder is only ever read.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from engine.core.errors import ConfigError
from engine.core.events import TrainCheckpoint, TrainLog, TrainProgress
from engine.core.feedback_config import RefineRequest, RefineResult
from engine.feedback.dpo import diffusion_dpo_loss, per_sample_mse, rated_sft_loss
from engine.feedback.ratings import Rating
from engine.jobs import state as jobs


def _load_policy(model_source, style, device, dtype):
    """A fresh copy of the base model with v(N)'s LoRA loaded as adapter "default" (TE frozen, UNet LoRA trainable)."""
    from diffusers import StableDiffusionPipeline

    from engine.models.loading import load_base_model

    base = load_base_model(model_source, device=device, dtype=dtype)
    if style.base_model_fingerprint and base.fingerprint != style.base_model_fingerprint:
        raise ConfigError(f"style {style.name!r} was trained on another base model; load that model to refine it")
    c = base.components
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(style.lora), adapter_name="default", use_safetensors=True)
    for m in (c.vae, c.text_encoder, c.unet):
        m.requires_grad_(False)
    params = {n: p for n, p in c.unet.named_parameters() if "lora_" in n}
    if not params:
        raise ConfigError(f"style {style.name!r} has no UNet LoRA layers to refine")
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return base, params


@contextlib.contextmanager
def fresh_policy(model_source, style, device, dtype):
    """A second copy of the base model with v(N)'s LoRA as adapter "default" (scripts; the engine uses
    live_policy). Yields (components, trainable UNet LoRA parameters by name, adapter name)."""
    base, params = _load_policy(model_source, style, device, dtype)
    yield base.components, params, "default"


@contextlib.contextmanager
def live_policy(model, adapters, style):
    """v(N)'s adapter in the engine's loaded model (AdapterCache.training): no second copy of the base model.
    Call under the engine's model lock; on exit the cached adapter is v(N) again, exactly."""
    if style.base_model_fingerprint and model.fingerprint != style.base_model_fingerprint:
        raise ConfigError(f"style {style.name!r} was trained on another base model; load that model to refine it")
    with adapters.training(style) as params:
        if not params:
            raise ConfigError(f"style {style.name!r} has no UNet LoRA layers to refine")
        yield model.components, params, style.adapter_name


def _file_key(param_name: str, adapter: str = "default") -> str:
    """The peft parameter name of `adapter` -> the key in the style's lora.safetensors."""
    return "unet." + param_name.replace(f".{adapter}.", ".")


@torch.no_grad()
def _encode(c, ratings: list[Rating], data_dir: Path):
    from PIL import Image

    from engine.feedback.fabric import encode_images
    from engine.generate.sampler import encode_prompts

    images = []
    for r in ratings:
        with Image.open(data_dir / r.image) as im:
            images.append(im.convert("RGB"))
    return encode_images(c, images).float(), encode_prompts(c, [r.prompt for r in ratings]).float()


def new_run_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "runs" / f"refine-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def resumable_refines(runs_dir: Path) -> list[dict]:
    """Refinements that can continue from a checkpoint, newest first: left running / checkpointed by a worker that
    is gone (on this host), or cancelled after a step. {"run_id", "style", "state", "step", "total"} each."""
    found = []
    for job_file in sorted(Path(runs_dir).glob("refine-*/job.json"), reverse=True):
        job = jobs.read_job(job_file.parent)
        if not isinstance(job, dict) or job.get("kind") != "refine" or not isinstance(job.get("request"), dict):
            continue
        state = job.get("state")
        if state in ("running", "checkpointed"):
            if job.get("host") == socket.gethostname() and jobs.alive(int(job.get("pid", -1))):
                continue  # still refining
            state = "interrupted"
        elif state != "cancelled":
            continue
        if _latest_checkpoint(job_file.parent) is None:
            continue  # stopped before its first checkpoint: nothing to resume from
        found.append({"run_id": job_file.parent.name, "style": job.get("parent", ""), "state": state,
                      "step": int(job.get("step", 0)), "total": int(job["request"].get("steps", 0))})
    return found


def _latest_checkpoint(run_dir: Path) -> Path | None:
    steps = [d for d in (run_dir / "checkpoints").glob("step-*") if (d / "trainer_state.pt").is_file()]
    return max(steps, key=lambda d: int(d.name.split("-")[1]), default=None)


def run_request(run_dir: Path) -> tuple[RefineRequest, list[int]]:
    """The request and rating ids a refinement ran with (its job.json), to resume it exactly."""
    job = jobs.read_job(run_dir) or {}
    try:
        req = RefineRequest(**{**job["request"], "raters": tuple(job["request"].get("raters", ()))})
        return req, [int(i) for i in job["ratings"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"refinement {run_dir.name} cannot be resumed: its job.json is incomplete ({e})") from None


def refine(model_source, data_dir: Path, library, ratings: list[Rating], req: RefineRequest, style, *,
           device: str = "cpu", dtype=torch.float32, on_event: Callable | None = None, stop_event=None,
           run_dir: Path | None = None, policy=None, resume: bool = False) -> RefineResult:
    """Train v(N+1) of `style` (v(N), a StyleInfo) from `ratings` (of v(N)'s images); see the module doc.
    `policy`: where v(N)'s LoRA is trained (live_policy: in the loaded model; default fresh_policy: a copy).
    `resume`: continue `run_dir` from its newest checkpoint (LoRA, AdamW state, both random generators, losses), so
    the result equals an uninterrupted run (tests/test_feedback_studio.py)."""
    from diffusers import DDPMScheduler

    from engine.train.math import diffusion_target

    t0 = time.perf_counter()
    emit = on_event or (lambda e: None)
    liked = [r for r in ratings if r.liked]
    disliked = [r for r in ratings if r.disliked]
    if not liked:
        raise ConfigError("refining needs at least one liked image (thumbs up or 4-5 stars) of this version")
    run_dir = run_dir or new_run_dir(data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = _latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise ConfigError(f"refinement {run_dir.name} has no checkpoint to resume from")
    jobs.write_job(run_dir, "running", total=req.steps, kind="refine", parent=f"{style.id}@v{style.version}",
                   request=asdict(req), ratings=[r.id for r in ratings], **({} if resume else {"step": 0}))
    stack = contextlib.ExitStack()
    try:
        c, params, adapter = stack.enter_context(policy if policy is not None else
                                                 fresh_policy(model_source, style, device, dtype))
        ref_weights = {n: p.detach().clone() for n, p in params.items()}  # v(N): the DPO reference, frozen
        ns = DDPMScheduler.from_config(c.scheduler.config)
        lat_w, enc_w = _encode(c, liked, data_dir)
        lat_l, enc_l = _encode(c, disliked, data_dir) if disliked else (None, None)
        w_sft = torch.tensor([r.weight for r in liked])
        gen = torch.Generator().manual_seed(req.seed)
        rng = random.Random(req.seed)
        pairs = [(i, j) for i in range(len(liked)) for j in range(len(disliked))]
        opt = torch.optim.AdamW(params.values(), lr=req.learning_rate, weight_decay=1e-2)
        losses, start = [], 0
        if ckpt is not None:
            start, losses = _restore(ckpt, params, opt, gen, rng, adapter)
            emit(TrainLog(f"resuming {run_dir.name} at step {start}"))
        c.unet.train()
        emit(TrainLog(f"refining {style.id} v{style.version}: {len(liked)} liked, {len(disliked)} disliked, "
                      f"{len(pairs)} pairs, {req.steps} steps"))

        # fp16/bf16 base weights with fp32 LoRA (as the trainer's mixed precision): autocast on CUDA; untested here
        # (this machine has no GPU), CPU runs in fp32 without it.
        amp = (torch.autocast("cuda", dtype=dtype) if str(device).startswith("cuda") and dtype != torch.float32
               else contextlib.nullcontext())

        def predict(lat, enc, noise, t):
            with amp:
                return c.unet(ns.add_noise(lat, noise, t), t, enc, return_dict=False)[0].float()

        def reference(lat, enc, noise, t):
            saved = {n: p.data for n, p in params.items()}
            try:
                for n, p in params.items():
                    p.data = ref_weights[n]
                with torch.no_grad():
                    return predict(lat, enc, noise, t)
            finally:
                for n, p in params.items():
                    p.data = saved[n]

        step, cancelled = start, False
        for step in range(start + 1, req.steps + 1):
            if stop_event is not None and stop_event.is_set():
                cancelled, step = True, step - 1
                break
            loss = torch.zeros(())
            if req.sft_weight > 0:
                idx = torch.multinomial(w_sft.clamp_min(1e-6), req.batch_size, replacement=True, generator=gen)
                noise = torch.randn(lat_w[idx].shape, generator=gen).to(lat_w)
                t = torch.randint(0, ns.config.num_train_timesteps, (len(idx),), generator=gen).to(lat_w.device)
                err = per_sample_mse(predict(lat_w[idx], enc_w[idx], noise, t),
                                     diffusion_target(ns, lat_w[idx], noise, t))
                loss = loss + req.sft_weight * rated_sft_loss(err, w_sft[idx])
            if req.dpo_weight > 0 and pairs:
                chosen = [pairs[rng.randrange(len(pairs))] for _ in range(req.batch_size)]
                iw, il = torch.tensor([p[0] for p in chosen]), torch.tensor([p[1] for p in chosen])
                lat = torch.cat([lat_w[iw], lat_l[il]])
                enc = torch.cat([enc_w[iw], enc_l[il]])
                noise = torch.randn(lat_w[iw].shape, generator=gen).repeat(2, 1, 1, 1).to(lat)  # same ε for w and l
                t = torch.randint(0, ns.config.num_train_timesteps, (len(iw),), generator=gen).repeat(2).to(lat.device)
                target = diffusion_target(ns, lat, noise, t)
                pol = per_sample_mse(predict(lat, enc, noise, t), target)
                ref = per_sample_mse(reference(lat, enc, noise, t), target)
                n = len(iw)
                loss = loss + req.dpo_weight * diffusion_dpo_loss(pol[:n], ref[:n], pol[n:], ref[n:], req.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            eta = (time.perf_counter() - t0) / step * (req.steps - step)
            emit(TrainProgress(step, req.steps, losses[-1], req.learning_rate, eta))
            if req.checkpoint_every and step % req.checkpoint_every == 0 and step < req.steps:
                emit(TrainCheckpoint(step, _checkpoint(run_dir, step, params, adapter, opt, gen, rng, losses)))
        if cancelled:
            if step:
                emit(TrainCheckpoint(step, _checkpoint(run_dir, step, params, adapter, opt, gen, rng, losses)))
            jobs.write_job(run_dir, "cancelled", step=step, kind="refine")
            emit(TrainLog(f"refinement cancelled at step {step}; {style.id} v{style.version} is unchanged"))
            return RefineResult(None, style, step, losses, len(liked), len(disliked), True,
                                time.perf_counter() - t0)
        new = _save_version(library, style, params, req, liked, disliked, losses, adapter)
    except BaseException as e:
        jobs.write_job(run_dir, "failed", step=0, kind="refine", message=str(e))
        raise
    finally:
        stack.close()  # the live model's adapter is v(N) again
    jobs.write_job(run_dir, "done", step=req.steps, kind="refine", style=f"{new.id}@v{new.version}")
    emit(TrainLog(f"saved {new.id} v{new.version}"))
    return RefineResult(new, style, req.steps, losses, len(liked), len(disliked), False, time.perf_counter() - t0)


def _restore(ckpt: Path, params, opt, gen, rng, adapter: str) -> tuple[int, list[float]]:
    """Load a checkpoint into the live run: LoRA tensors, AdamW state, both random generators; (step, losses)."""
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "unet_lora.safetensors"))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[_file_key(n, adapter)].to(p))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # tensors and numbers only: no code
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    meta = json.loads((ckpt / "state.json").read_text("utf-8"))
    version, internal, gauss = meta["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return int(meta["step"]), [float(x) for x in meta["losses"]]


def _checkpoint(run_dir: Path, step: int, params, adapter: str, opt, gen, rng, losses) -> Path:
    """The refined UNet LoRA so far and the state to continue exactly (AdamW, random generators, losses), in
    runs/<id>/checkpoints/step-<N>/ (complete under a temporary name, then renamed, as the trainer's checkpoints);
    never written into the style's folder."""
    from safetensors.torch import save_file

    final = run_dir / "checkpoints" / f"step-{step}"
    tmp = final.parent / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file({_file_key(n, adapter): p.detach().cpu().contiguous() for n, p in params.items()},
                  str(tmp / "unet_lora.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state()}, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"schema_version": 1, "step": step, "rng": rng.getstate(),
                                                    "losses": losses}), "utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    jobs.write_job(run_dir, "checkpointed", step=step)
    return final


def _save_version(library, style, params, req: RefineRequest, liked, disliked, losses, adapter: str):
    """Write styles/<id>/v<N+1>/ under a temporary name (v(N)'s file with the refined UNet tensors, its text-encoder
    tensors and metadata as they were), then rename and register it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(style.lora), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    for n, p in params.items():
        key = _file_key(n, adapter)
        if key not in tensors:
            raise ConfigError(f"refined layer {key} is not in {style.lora.name}; the style's format is not supported")
        tensors[key] = p.detach().cpu().to(tensors[key].dtype).contiguous()
    return library.add_version(style.id, style.version, lambda folder: _write(folder, style, tensors, meta, req,
                                                                             liked, disliked, losses, save_file))


def _write(folder: Path, style, tensors, meta, req, liked, disliked, losses, save_file) -> None:
    save_file(tensors, str(folder / style.lora_file), metadata=meta)
    info = json.loads((style.folder / "style.json").read_text("utf-8"))
    info.update(parent_version=style.version, source="refined",
                refinement={"steps": req.steps, "beta": req.beta, "learning_rate": req.learning_rate,
                            "sft_weight": req.sft_weight, "dpo_weight": req.dpo_weight, "liked": len(liked),
                            "disliked": len(disliked), "final_loss": losses[-1] if losses else None,
                            "ratings": [r.id for r in liked + disliked]},
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    info.pop("version", None)
    (folder / "style.json").write_text(json.dumps(info, indent=1), "utf-8")
    if style.preview:
        shutil.copyfile(style.preview, folder / style.preview_grid)
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
