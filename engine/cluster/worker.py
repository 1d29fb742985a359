"""The job bodies that run on a Ray worker: fetch what the spec names by content hash, run, send results back.

A worker process keeps the base models it loaded (by content hash) and their LoRA cache between tasks, as the
app's own Engine does. Generation samples exactly as Engine.generate does (same seeds, trigger words, callbacks)
and returns each image as PNG bytes with what its recipe needs; the app writes the files. Training runs
engine/train/loop.train in a run folder of its own, seeded with the newest checkpoint the app's node holds, and
ships every checkpoint back as soon as it is saved (before the next step), so a worker that dies loses only the
steps since its last checkpoint, and the task Ray retries elsewhere resumes from it, exactly (TR-4).

Paths the config names (the training images, the base model) are under the cluster's `root`, the same on every
worker, so a checkpoint made on one worker passes the config check on another.
"""
from __future__ import annotations

import dataclasses
import io
import shutil
import threading
from pathlib import Path

import ray

from engine.cluster.content import materialize
from engine.core.errors import Cancelled

_MODELS: dict[str, list] = {}  # model content hash -> [LoadedModel, AdapterCache | None], per worker process
_LOCK = threading.Lock()


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def fetch(store, h: str, root: Path) -> Path:
    """The bundle `h` in this machine's cache (fetched from the app's node the first time)."""
    manifest = ray.get(store.manifest.remote(h))
    return materialize(h, manifest, lambda rel, off, n: ray.get(store.read.remote(h, rel, off, n)),
                       Path(root) / "content")


def _watch_cancel(store, job_id: str, stop: threading.Event, done: threading.Event) -> threading.Thread:
    """Set `stop` when the app cancels the job (asked every half second while the task runs)."""
    def poll():
        while not done.wait(0.5):
            try:
                if ray.get(store.cancelled.remote(job_id)):
                    stop.set()
                    return
            except Exception:  # noqa: BLE001 - the app's node is gone: stop, the task's result has no reader
                stop.set()
                return
    t = threading.Thread(target=poll, daemon=True, name="stylebooth-cancel-watch")
    t.start()
    return t


# ---- generation ------------------------------------------------------------------------------------------------

def _model(spec: dict, store, device: str, dtype):
    from engine.models.loading import load_base_model

    h = spec["model"]["hash"]
    if h not in _MODELS:
        folder = fetch(store, h, Path(spec["root"])) / spec["model"]["entry"]
        _MODELS.clear()  # one base model per worker process, as in the app: memory is the limit
        _MODELS[h] = [load_base_model(folder, device=device, dtype=dtype, cache_dir=Path(spec["root"]) / "cache"),
                      None]
    return _MODELS[h]


def generate_task(spec: dict, store) -> dict:
    """Run one generation job; returns {"node", "model", "images": [{png, seed, prompt, width, height}], ...}."""
    import torch

    from engine.core.config import GenerateRequest, from_dict
    from engine.core.events import Progress
    from engine.generate.sampler import decode, sample, to_pil
    from engine.styles.adapters import AdapterCache
    from engine.styles.blend import check_same_base
    from engine.styles.store import StyleInfo, apply_trigger

    job_id = spec["job_id"]
    attempt = ray.get(store.started.remote(job_id, node_id()))
    if ray.get(store.cancelled.remote(job_id)):  # cancelled while it waited for a worker
        return {"node": node_id(), "attempt": attempt, "images": [], "cancelled": True, "model": {}, "styles": []}
    device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
    req = from_dict(GenerateRequest, spec["request"])
    root = Path(spec["root"])
    styles = []
    for s in spec["styles"]:  # resolved by the app: (StyleInfo fields, UNet weight, text-encoder weight, bundle)
        folder = fetch(store, s["hash"], root)
        styles.append((StyleInfo(**{**s["info"], "folder": folder}), s["unet"], s["te"]))
    with _LOCK:  # one job at a time per worker process (a Ray task slot), like the app's model lock
        entry = _model(spec, store, device, dtype)
        m = entry[0]
        c = m.components
        check_same_base([s for s, _, _ in styles], m.fingerprint, m.name)
        if styles and entry[1] is None:
            entry[1] = AdapterCache(c, fuse=bool(spec.get("fuse_styles", True)))
        if entry[1] is not None:
            entry[1].activate_many([(s, wu if wu == wt else {"unet": wu, "text_encoder": wt})
                                    for s, wu, wt in styles if (wu, wt) != (0.0, 0.0)])
        prompts = []
        for p in req.prompts:  # each applied style's trigger word, as engine.api.support.with_triggers
            for s, wu, wt in styles:
                if (wu, wt) != (0.0, 0.0):
                    p = apply_trigger(p, s)
            prompts.append(p)
        n = len(prompts)
        width, height = req.width or c.default_size, req.height or c.default_size
        total = req.num_inference_steps * req.batch_count
        preview_every = max(1, req.num_inference_steps // 4)
        stop, done = threading.Event(), threading.Event()
        _watch_cancel(store, job_id, stop, done)
        images, cancelled = [], False
        try:
            for b in range(req.batch_count):
                seeds = [req.seed + b * n + i for i in range(n)]

                def cb(i, steps, latents, b=b):
                    if stop.is_set():
                        raise Cancelled("cancelled")
                    preview = None
                    if (i + 1) % preview_every == 0 and i + 1 < steps:
                        preview = to_pil(decode(c, latents[:1]))[0]
                    store.emit.remote(job_id, Progress(b * steps + i + 1, total,
                                                       f"batch {b + 1}/{req.batch_count}, step {i + 1}/{steps}",
                                                       preview))

                imgs = sample(c, entry[1].expand_prompts(prompts) if entry[1] else prompts, [req.negative_prompt] * n,
                              seeds, num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                              guidance_rescale=req.guidance_rescale, scheduler=req.scheduler, height=height,
                              width=width, callback=cb)
                for seed, prompt, img in zip(seeds, prompts, to_pil(imgs)):
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")  # lossless; the app writes the file with its recipe
                    images.append({"png": buf.getvalue(), "seed": seed, "prompt": prompt, "width": width,
                                   "height": height})
        except Cancelled:
            cancelled = True
        finally:
            done.set()
    ray.get(store.barrier.remote())  # every progress event is with the app before the result
    return {"node": node_id(), "attempt": attempt, "images": images, "cancelled": cancelled,
            "model": {"name": m.name, "fingerprint": m.fingerprint, "prediction_type": m.prediction_type}}


# ---- training --------------------------------------------------------------------------------------------------

def train_task(spec: dict, store) -> dict:
    """Run (or resume) one training job; returns the trainer's result and the output files as bytes."""
    from engine.core.config import from_dict
    from engine.core.events import TrainCheckpoint, TrainEvaluation, TrainLog
    from engine.core.train_config import TrainConfig
    from engine.train.evaluate import EVAL_DIR, checkpoint_export
    from engine.train.loop import train

    job_id = spec["job_id"]
    attempt = ray.get(store.started.remote(job_id, node_id()))
    root = Path(spec["root"])
    model_dir = fetch(store, spec["model"]["hash"], root) / spec["model"]["entry"]
    cfg = from_dict(TrainConfig, {**spec["config"], "base_model": str(model_dir)})
    cfg, rejected, notices = _ingest(spec, cfg, root, store)
    run_dir = root / "runs" / job_id
    # What this machine may hold of the job (an earlier attempt here) is never trusted: the app's node is the truth.
    shutil.rmtree(run_dir, ignore_errors=True)
    latest = ray.get(store.latest_checkpoint.remote(job_id))
    if latest is not None:
        step, files = latest
        ckpt = run_dir / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        for name, data in files.items():
            (ckpt / name).write_bytes(data)
        store.emit.remote(job_id, TrainLog(f"attempt {attempt} on node {node_id()[:8]}: resuming from "
                                           f"checkpoint-{step} held by the app"))
    scores = ray.get(store.scores.remote(job_id))
    if scores is not None:  # the evaluations so far continue where the app's node has them
        (run_dir / EVAL_DIR).mkdir(parents=True, exist_ok=True)
        (run_dir / EVAL_DIR / "scores.json").write_bytes(scores)
    class_images, class_captions = _priors(spec, cfg, root, store)

    def on_event(e):
        if isinstance(e, TrainCheckpoint):  # to the app's node before the next step runs
            files = {p.name: p.read_bytes() for p in Path(e.path).iterdir() if p.is_file()}
            ray.get(store.put_checkpoint.remote(job_id, e.step, files))  # the store reports it to the app
        elif isinstance(e, TrainEvaluation):  # its export too, so the app can publish that checkpoint
            folder = checkpoint_export(run_dir, e.step)
            export = ({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
                      if e.images and folder.is_dir() else {})  # no images: re-shown after a resume, held already
            ray.get(store.put_evaluation.remote(job_id, e, export,
                                                (run_dir / EVAL_DIR / "scores.json").read_bytes()))
        else:
            store.emit.remote(job_id, e)

    stop, done = threading.Event(), threading.Event()
    _watch_cancel(store, job_id, stop, done)
    try:
        r = train(cfg, run_dir, class_images=class_images, class_captions=class_captions, on_event=on_event,
                  stop_event=stop, resume=True)
    finally:
        done.set()
    out = {"node": node_id(), "attempt": attempt, "steps": r.steps, "losses": list(r.losses),
           "cancelled": r.cancelled, "resumed_from": r.resumed_from, "skipped": r.skipped_steps,
           "micro_batch": r.micro_batch_size, "accumulation": r.gradient_accumulation, "files": {},
           "rejected": rejected, "notices": notices}
    if r.lora_path is not None:
        folder = Path(r.lora_path).parent
        out["files"] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    shutil.rmtree(run_dir, ignore_errors=True)  # everything that matters is on the app's node now
    ray.get(store.barrier.remote())  # every event is with the app before the result
    return out


def _ingest(spec: dict, cfg, root: Path, store):
    """The artist's images as clean PNGs (engine.core.images.ingest_dataset, as run_training does), under a folder
    named by the bundle's hash and the resolution: the same paths on every worker and every attempt (the files are
    named by the sha256 of their bytes), so the config a checkpoint was made with matches on a retry."""
    from engine.core.events import TrainLog
    from engine.core.images import ingest_dataset

    raw = fetch(store, spec["dataset"], root)
    resolution = cfg.resolution or _native_size(spec, store)
    out = root / "ingested" / f"{spec['dataset']}-{resolution}"
    report = ingest_dataset([raw / n for n in spec["images"]], out, resolution=resolution)
    for fname, why in report.rejected:
        store.emit.remote(spec["job_id"], TrainLog(f"skipped {fname}: {why}", "warning"))
    for n in report.notices:
        store.emit.remote(spec["job_id"], TrainLog(n, "warning"))
    captions = tuple(cfg.instance_captions[i] for i in report.sources) if cfg.instance_captions else ()
    cfg = dataclasses.replace(cfg, instance_images=tuple(str(p) for p in report.kept), instance_captions=captions)
    return cfg, [list(r) for r in report.rejected], list(report.notices)


def _native_size(spec: dict, store) -> int:
    """The base model's native resolution: from a folder's configs (UNet sample size times the VAE's downscale),
    without loading it; a single-file model is loaded (and kept for the next job)."""
    import json

    model_dir = Path(spec["root"]) / "content" / spec["model"]["hash"] / spec["model"]["entry"]
    if not model_dir.is_dir():
        import torch

        device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
        with _LOCK:
            return _model(spec, store, device, dtype)[0].components.default_size
    unet = json.loads((model_dir / "unet" / "config.json").read_text("utf-8"))
    vae = json.loads((model_dir / "vae" / "config.json").read_text("utf-8"))
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _priors(spec: dict, cfg, root: Path, store) -> tuple[list[Path], list[str]]:
    """Class-prior images for prior preservation, made here with this worker's copy of the base model and cached
    under `root`/priors by their key (engine/train/priors.py), as the app does locally."""
    if not cfg.with_prior_preservation:
        return [], []
    import torch

    from engine.core.events import TrainLog
    from engine.train.priors import PriorSpec, ensure_prior_set

    device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
    with _LOCK:
        m = _model(spec, store, device, dtype)[0]
        if _MODELS[spec["model"]["hash"]][1] is not None:
            _MODELS[spec["model"]["hash"]][1].activate_many([])  # priors come from the base model alone
        resolution = cfg.resolution or m.components.default_size
        images, captions, made = ensure_prior_set(m.components, PriorSpec(m.fingerprint, cfg.class_prompts[0],
                                                                          resolution=resolution),
                                                  cfg.class_prompts, root / "priors", cfg.num_class_images)
    store.emit.remote(spec["job_id"], TrainLog(f"prior images: {len(images)} ready ({made} new)"))
    return images, captions
