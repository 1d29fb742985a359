"""Command line: `python -m engine.train --config run.toml [--run-dir DIR] [--resume] [--class-dir DIR]`.

Also runs under `accelerate launch` and `torchrun --nproc_per_node N` (the Accelerator reads the ranks from the
environment; only rank 0 writes files and prints events). Exit status: 0 done, 1 cancelled, 2 error.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train", description="Train a DreamBooth LoRA (Stylebooth).")
    p.add_argument("--config", required=True, type=Path, help="run.toml (a TrainConfig)")
    p.add_argument("--run-dir", type=Path, help="where checkpoints, logs and output go (default: the config's folder)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in the run dir")
    p.add_argument("--class-dir", type=Path, help="folder of class-prior images (for with_prior_preservation)")
    return p


def _print_event(e) -> None:
    from engine.core.events import TrainCheckpoint, TrainEvaluation, TrainLog, TrainPreview, TrainProgress

    if isinstance(e, TrainProgress):
        line = f"step {e.step}/{e.total} loss {e.loss:.4f} lr {e.lr:.3g} eta {e.eta_s:.0f}s"
    elif isinstance(e, TrainCheckpoint):
        line = f"checkpoint {e.step}: {e.path}"
    elif isinstance(e, TrainPreview):
        line = f"preview at step {e.step}: {len(e.images)} images (see tensorboard)"
    elif isinstance(e, TrainEvaluation):
        _, like, fid = e.scores[-1]
        scores = "scores not available" if like is None else f"likeness {like:.3f}, prompt fidelity {fid:.3f}"
        line = f"evaluation at step {e.step}: {scores}; best checkpoint: {e.best_step}"
    elif isinstance(e, TrainLog):
        line = f"{e.level}: {e.message}" if e.level != "info" else e.message
    else:
        line = repr(e)
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one training job from a TOML config; errors print one clear line on stderr."""
    args = _parser().parse_args(argv)
    from engine.core.captions import read_captions
    from engine.core.config import ConfigError
    from engine.core.errors import CheckpointError, DiskFullError, TrainingError
    from engine.core.train_config import load_train_config
    from engine.train.loop import train

    try:
        cfg = load_train_config(args.config)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or args.config.resolve().parent
    class_images = sorted(p for p in args.class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if args.class_dir else []
    try:  # captions next to class images (kohya-style .txt), e.g. for several class prompts
        class_captions, _ = read_captions(class_images, None, (cfg.class_prompts or [""])[0])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    # SIGTERM (a scheduler or the app stopping us) ends at the next step with a checkpoint, not mid-write.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        result = train(cfg, run_dir, class_images=class_images, class_captions=class_captions, on_event=_print_event, stop_event=stop,
                       resume=args.resume)
    except (ValueError, TrainingError, CheckpointError, DiskFullError) as e:  # ConfigError, ImageRejected
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"lora": str(result.lora_path) if result.lora_path else None,
                          "style_json": str(result.style_json_path) if result.style_json_path else None,
                          "steps": result.steps, "cancelled": result.cancelled, "resumed_from": result.resumed_from,
                          "skipped_steps": result.skipped_steps}), flush=True)
    return 1 if result.cancelled else 0

