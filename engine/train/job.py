"""A training job as the app runs it: ingest images, make or reuse prior images, train, publish the style.

The Engine runs this under its one model lock, so training and generation share one queue. Events are the
trainer's typed events (engine/train/loop.py) plus `TrainLog` lines for the steps around it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import socket
import uuid
from pathlib import Path
from typing import Callable

from engine.core.config import ConfigError
from engine.core.events import ResumableRun, TrainJobResult, TrainLog, TrainProgress
from engine.core.files import atomic_write_bytes
from engine.core.images import ingest_dataset
from engine.core.train_config import TrainConfig, check_trigger_token
from engine.jobs import state as jobs
from engine.styles.store import publish
from engine.train.checkpoints import latest_step
from engine.train.evaluate import best_record, checkpoint_export, read_scores
from engine.train.loop import train
from engine.train.priors import PriorSpec, ensure_prior_set


def new_run_dir(data_dir: Path, name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return data_dir / "runs" / f"{stamp}-{uuid.uuid4().hex[:6]}"


def run_training(model, data_dir: Path, cfg: TrainConfig, name: str, *, run_dir: Path | None = None,
                 on_event: Callable | None = None, stop_event=None, style_id: str | None = None,
                 on_run_dir: Callable[[Path], None] | None = None) -> TrainJobResult:
    """Run one training job on the loaded base `model` (an engine.models.loading.LoadedModel); the result is a new
    style, or the next version of the library entry `style_id` ("train it properly" for an instant style)."""
    emit = on_event or (lambda e: None)
    name = name.strip()
    if not name:
        raise ConfigError("give the style a name, e.g. 'my heart shape'")
    # Before any file is written: the model's tokenizer knows far more common words than TrainConfig's list.
    check_trigger_token(cfg.trigger_token, model.components.tokenizer)
    resuming = run_dir is not None
    run_dir = run_dir or new_run_dir(data_dir, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if on_run_dir is not None:  # the engine records who owns the run before any work, so a crash keeps it theirs
        on_run_dir(run_dir)
    write_run_name(run_dir, name)
    resolution = cfg.resolution or model.components.default_size

    # 1. images in: only decoded, re-encoded PNGs reach training (IM-3); every refusal names its file
    captions = cfg.instance_captions
    if resuming:
        kept, rejected, notices = [Path(p) for p in cfg.instance_images], [], []
    else:
        report = ingest_dataset(cfg.instance_images, run_dir / "dataset", resolution=resolution)
        kept, rejected, notices = report.kept, report.rejected, report.notices
        captions = tuple(captions[i] for i in report.sources) if captions else ()  # follow refusals/duplicates
        for fname, why in rejected:
            emit(TrainLog(f"skipped {fname}: {why}", "warning"))
        for n in notices:
            emit(TrainLog(n, "warning"))
    cfg = dataclasses.replace(cfg, instance_images=tuple(str(p) for p in kept), instance_captions=captions,
                              base_model=cfg.base_model or model.source)

    # 2. class-prior images through the shared sampler, cached by key (topped up, never reused for another key)
    class_images: list[Path] = []
    class_captions: list[str] = []
    if cfg.with_prior_preservation:
        spec = PriorSpec(model.fingerprint, cfg.class_prompts[0], resolution=resolution)

        def prior_progress(done, total):
            emit(TrainProgress(0, cfg.max_train_steps, float("nan"), 0.0, 0.0))
            emit(TrainLog(f"prior images: {done}/{total} generated"))

        class_images, class_captions, made = ensure_prior_set(
            model.components, spec, cfg.class_prompts, data_dir / "priors", cfg.num_class_images,
            on_progress=prior_progress, should_stop=(stop_event.is_set if stop_event else None))
        emit(TrainLog(f"prior images: {len(class_images)} ready ({made} new, {len(class_images) - made} from the "
                      f"cache)"))

    # 3. train (resumes from the newest valid checkpoint in run_dir)
    result = train(cfg, run_dir, class_images=class_images, class_captions=class_captions, on_event=emit,
                   stop_event=stop_event, resume=True)
    if result.cancelled or result.lora_path is None:
        return TrainJobResult(run_dir, result, None, rejected, notices)

    # 4. publish the style where the Generate tab (and later the library) finds it
    preview = result.style_json_path.parent / "preview.png"
    style = publish(data_dir, name, result.lora_path, result.style_json_path, preview, style_id=style_id)
    # so "publish checkpoint N as the style" (publish_checkpoint) makes the next version of this style
    record_published(run_dir, style.id)
    emit(TrainLog(f"style '{style.name}' ready: use trigger '{style.trigger_token}' in the Generate tab"))
    best = best_record(read_scores(run_dir), cfg.eval_fidelity_floor)
    if best is not None and best.step != result.steps:
        emit(TrainLog(f"the best checkpoint by the rule is step {best.step} (likeness {best.likeness:.2f}, prompt "
                      f"fidelity {best.fidelity:.2f}); the style has step {result.steps}: publish checkpoint "
                      f"{best.step} as the style from the Train tab if its images look better"))
    return TrainJobResult(run_dir, result, style, rejected, notices)


PUBLISHED = "published.json"  # {"schema_version": 1, "style_id": ...}: the style a run published


def record_published(run_dir: Path, style_id: str) -> None:
    atomic_write_bytes(Path(run_dir) / PUBLISHED, json.dumps({"schema_version": 1, "style_id": style_id}).encode())


def write_run_name(run_dir: Path, name: str) -> None:
    """The style name the run publishes under (read_run_name), also for a checkpoint published later."""
    atomic_write_bytes(Path(run_dir) / "style-name.json", json.dumps({"schema_version": 1, "name": name}).encode())


def published_style(run_dir: Path) -> str | None:
    """The id of the style this run published, or None (cancelled, failed, or made before this file existed)."""
    try:
        sid = json.loads((Path(run_dir) / PUBLISHED).read_text("utf-8"))["style_id"]
        return sid if isinstance(sid, str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish_checkpoint(data_dir: Path, run_dir: Path, step: int, *, style_id: str | None = None):
    """Publish checkpoint `step` of a run (its export by engine/train/evaluate.py: LoRA, style.json, grid) through
    the same library path as the final LoRA: a new style with the run's name, or the next version of `style_id`."""
    folder = checkpoint_export(run_dir, step)
    style_json = folder / "style.json"
    steps = sorted(r.step for r in read_scores(run_dir) if r.step > 0)
    try:
        if step not in steps:
            raise KeyError(step)
        style = json.loads(style_json.read_text("utf-8"))
        lora_file = style["lora_file"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"checkpoint {step} of this run was not evaluated and exported; pick one of the evaluated "
                          f"checkpoints ({', '.join(map(str, steps)) or 'none yet'})") from None
    if not isinstance(lora_file, str) or Path(lora_file).name != lora_file:
        raise ConfigError(f"checkpoint {step}'s export is incomplete (no LoRA file); pick another checkpoint")
    if not (folder / lora_file).is_file() and style.get("method") == "full":
        from engine.train.full import PENDING, complete_export

        if style.get("extraction") == PENDING:  # a full fine-tuning checkpoint: its LoRA is extracted on publish
            complete_export(run_dir, step, folder)
    if not (folder / lora_file).is_file():
        raise ConfigError(f"checkpoint {step}'s export is incomplete (no LoRA file); pick another checkpoint")
    return publish(data_dir, read_run_name(run_dir), folder / lora_file, style_json, folder / "preview.png",
                   style_id=style_id)


def read_run_name(run_dir: Path) -> str:
    """The style name a run publishes (style-name.json), or the folder name when it cannot be read."""
    try:
        return str(json.loads((run_dir / "style-name.json").read_text("utf-8"))["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return run_dir.name


def resumable_runs(runs_dir: Path) -> list[ResumableRun]:
    """Runs that can continue, newest first: left `running`/`checkpointed` by a worker that is gone (on this host:
    power cut, kill), or cancelled after at least one step (a checkpoint was saved exactly for this)."""
    found = []
    for job_file in sorted(Path(runs_dir).glob("*/job.json"), reverse=True):
        run_dir = job_file.parent
        job = jobs.read_job(run_dir)
        if not isinstance(job, dict) or not isinstance(job.get("config"), dict):
            continue
        state = job.get("state")
        if state in ("running", "checkpointed"):
            if job.get("host") == socket.gethostname() and jobs.alive(int(job.get("pid", -1))):
                continue  # still training
            state = "interrupted"
        elif not (state == "cancelled" and int(job.get("step", 0)) > 0):
            continue
        found.append(ResumableRun(run_dir.name, read_run_name(run_dir), state, int(job.get("step", 0)),
                                  int(job["config"].get("max_train_steps", 0)), latest_step(run_dir / "checkpoints"),
                                  job["config"]))
    return found
