"""Training speed and memory: DreamBooth+LoRA steps/s and peak memory, two settings side by side, and their ratio.

    python bench/train.py [--model PATH | --tiny] [--steps 30] [--warmup 5] [--threads 1]
        the demo model (default; assets/demo-model) or any diffusers folder, at its native size:
        cache_latents off vs on
    python bench/train.py --gpu-sd15 [--steps 20] [--warmup 5]
        the SD 1.5 architecture with random weights built from assets/configs/sd15 (no download), 512 px, fp16,
        batch 1: gradient checkpointing off vs on (needs a CUDA GPU)
    python bench/train.py --reference PATH/train_dreambooth_lora.py [--gpu-sd15] [--train-text-encoder]
        diffusers' DreamBooth LoRA script (../shared/anchors/, run by path, unchanged; it needs torchvision) against
        our trainer on the same model, images (assets/examples/heart), prompt and settings: UNet LoRA on attention
        (to_q/k/v/out.0, its targets), rank 4, constant LR 1e-4, batch 1, no priors, seed 0, fp16 on a GPU. Steps
        are timed from inside both (bench/reference_timer.py hooks the reference's optimizer steps); prints the
        ratio ours/reference and both first/last losses.

Each setting runs `engine.train.loop.train` in its own subprocess, so the memory of one run cannot leak into the
next (CPU allocators rarely hand memory back to the OS). Only training steps are timed: from the TrainProgress
event of step `warmup` to that of the last step (model load, latent caching, the first steps' warm-up and the
final save are outside). Memory: the peak from step `warmup` to the last step (a model load's transient fp32 copy
and the final preview grid are not counted), above the level before the run: on CUDA torch.cuda.max_memory_allocated, on CPU the resident set
size sampled every 2 ms; weights, LoRA, optimizer state and activations included.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLES = sorted(str(p) for p in (ROOT / "assets" / "examples" / "heart").glob("*.png"))
SD15 = ROOT / "assets" / "configs" / "sd15"


def make_config(model: str, steps: int, **over):
    """The fixed benchmark run: subject preset, 4 example images, no priors, previews or periodic checkpoints."""
    from engine.core.train_config import TrainConfig, presets

    base = {**presets("subject"), "instance_images": tuple(EXAMPLES), "base_model": model, "max_train_steps": steps,
            "with_prior_preservation": False,  # class images would double the batch and need a sampling phase
            "validation_steps": 0, "validation_prompts": (), "report_to": "none", "seed": 0,
            "checkpointing_steps": 0}  # 0: no periodic checkpoint; the final one is written after the timed steps
    return TrainConfig(**{**base, **over})


def run_one(spec: dict) -> dict:
    """One training run in this process (the child side); returns steps/s, peak MiB and the losses' ends."""
    import torch

    from engine.core.events import TrainProgress
    from engine.train.loop import train
    sys.path.insert(0, str(ROOT / "bench"))
    from generate import PeakMemory  # the same memory probe as bench/generate.py

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = make_config(spec["model"], spec["steps"], **spec["over"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stamps: list[tuple[int, float]] = []
    peak: list[float] = []

    def on_event(ev):
        if isinstance(ev, TrainProgress) and ev.step > 0:  # emitted after the step's loss is read: GPU synced
            stamps.append((ev.step, time.perf_counter()))
            if ev.step == spec["warmup"]:
                pm.reset()  # the peak of the training steps, not of loading (fp16 weights pass through fp32)
            if ev.step == cfg.max_train_steps:  # ... nor of the final save's preview grid (VAE decodes)
                peak.append(pm.current_peak())

    with tempfile.TemporaryDirectory(prefix="sb-bench-train-") as run_dir, PeakMemory(device) as pm:
        result = train(cfg, Path(run_dir), on_event=on_event, resume=False)
    (s0, t0), (s1, t1) = stamps[spec["warmup"] - 1], stamps[-1]
    return {"steps_per_s": (s1 - s0) / (t1 - t0), "timed_steps": s1 - s0, "peak_mib": peak[0], "device": device,
            "first_loss": result.losses[0], "last_loss": result.losses[-1], "threads": torch.get_num_threads()}


def in_subprocess(spec: dict) -> dict:
    """Run `run_one(spec)` in a fresh interpreter and read back its one RESULT line."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"benchmark run {spec['over']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def build_sd15(out: Path) -> Path:
    """A diffusers folder with the SD 1.5 architecture and random weights (fp16 safetensors), from our configs."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    # Random init of ~1.07 B parameters is several times faster on the GPU; the weights are then saved to disk
    # and this process lets them go before any measured run starts.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15 / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15 / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15 / "text_encoder"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(SD15 / "tokenizer"), unet=unet,
        scheduler=PNDMScheduler.from_config(PNDMScheduler.load_config(SD15 / "scheduler")), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=torch.float16)  # half the disk; load_base_model casts back and training picks its own dtype
    pipe.save_pretrained(out, safe_serialization=True)
    del pipe, unet, vae, te
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def report(title: str, labels: tuple[str, str], results: tuple[dict, dict], ratio_name: str) -> None:
    a, b = results
    mem = "CUDA max allocated" if a["device"] == "cuda" else "RSS above start"
    print(title)
    print(f"  device {a['device']}, torch threads {a['threads']}, timed steps {a['timed_steps']}")
    for label, r in zip(labels, results):
        print(f"  {label:<28} {r['steps_per_s']:8.3f} steps/s  peak {r['peak_mib']:9.1f} MiB ({mem})  "
              f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
    print(f"  ratio {ratio_name}: speed {b['steps_per_s'] / a['steps_per_s']:.3f}x, "
          f"memory {b['peak_mib'] / max(a['peak_mib'], 1e-9):.3f}x")


REFERENCE_PROMPT = "a photo of olis shape"


def reference_settings(model: str, steps: int, resolution: int, fp16: bool, te: bool) -> tuple[dict, list[str]]:
    """Our TrainConfig overrides and the reference script's arguments for one and the same run."""
    ours = {"instance_prompt": REFERENCE_PROMPT, "unet_target_modules": ("to_q", "to_k", "to_v", "to_out.0"),
            "lora_rank": 4, "lora_alpha": 4, "learning_rate": 1e-4, "text_encoder_lr": 1e-4, "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "train_batch_size": 1, "snr_gamma": 0.0, "noise_offset": 0.0, "random_flip": False,
            "train_text_encoder": te, "text_encoder_stop_fraction": 1.0, "mixed_precision": "fp16" if fp16 else "no",
            "resolution": resolution, "cache_latents": True}
    ref = ["--pretrained_model_name_or_path", model, "--instance_prompt", REFERENCE_PROMPT, "--resolution",
           str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", "1e-4",
           "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", "4", "--seed", "0",
           "--checkpointing_steps", str(steps + 100), "--mixed_precision", "fp16" if fp16 else "no"]
    return ours, ref + (["--train_text_encoder"] if te else [])


def run_reference(script: Path, args: list[str], warmup: int, tmp: Path) -> dict:
    """The reference script in its own process, timed from inside by bench/reference_timer.py."""
    images = tmp / "instance-images"
    images.mkdir()
    for p in EXAMPLES:  # images only: the reference reads every file in the folder as an image
        (images / Path(p).name).write_bytes(Path(p).read_bytes())
    out = tmp / "reference-result.json"
    cmd = [sys.executable, str(ROOT / "bench" / "reference_timer.py"), str(out), str(warmup), str(script), *args,
           "--instance_data_dir", str(images), "--output_dir", str(tmp / "reference-out")]
    proc = subprocess.run(cmd, cwd=tmp, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"the reference run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="diffusers folder (default: the bundled demo model)")
    ap.add_argument("--tiny", action="store_true", help="use the tests' tiny random model (a smoke run)")
    ap.add_argument("--gpu-sd15", action="store_true", help="SD 1.5 architecture, random weights, 512 px, fp16")
    ap.add_argument("--steps", type=int, default=0, help="training steps per run (default 30; 20 with --gpu-sd15)")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the runs (0: torch's default)")
    ap.add_argument("--reference", type=Path, help="diffusers' train_dreambooth_lora.py: time it against ours")
    ap.add_argument("--train-text-encoder", action="store_true", help="with --reference: LoRA on the text encoder too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(run_one(json.loads(a.child))), flush=True)
        return
    steps = a.steps or (20 if a.gpu_sd15 else 30)
    if not 1 <= a.warmup < steps:
        sys.exit(f"--warmup must be between 1 and --steps - 1 ({steps - 1}), not {a.warmup}")
    spec = {"steps": steps, "warmup": a.warmup, "threads": a.threads}
    with tempfile.TemporaryDirectory(prefix="sb-bench-model-") as tmp:
        if a.gpu_sd15:
            import torch

            if not torch.cuda.is_available():
                sys.exit("--gpu-sd15 needs a CUDA GPU (SD 1.5 at 512 px trains at seconds per step on a CPU)")
            t0 = time.perf_counter()
            model = a.model or str(build_sd15(Path(tmp) / "sd15-random"))  # --model: one built before, reused
            print(f"SD 1.5 (random weights) ready in {time.perf_counter() - t0:.1f} s")
        if a.reference:
            import torch

            model = model if a.gpu_sd15 else (a.model or str(ROOT / "assets" / "demo-model"))
            fp16 = torch.cuda.is_available()
            resolution = 512 if a.gpu_sd15 else 32
            ours, ref_args = reference_settings(model, steps, resolution, fp16, a.train_text_encoder)
            ref = run_reference(a.reference.resolve(), ref_args, a.warmup, Path(tmp))
            mine = in_subprocess({**spec, "model": model, "over": ours})
            report(f"diffusers' train_dreambooth_lora.py vs Stylebooth, {Path(model).name}, {resolution} px, "
                   f"{'fp16' if fp16 else 'fp32'}, batch 1, {steps} steps, UNet LoRA (attention) rank 4"
                   + (" + text-encoder LoRA" if a.train_text_encoder else ""),
                   ("diffusers (reference)", "Stylebooth"), (ref, mine), "ours/reference")
            return
        if a.gpu_sd15:
            over = {"resolution": 512, "mixed_precision": "fp16", "train_batch_size": 1,
                    "cache_latents": True}  # the VAE encodes before the timed steps: its peak would hide the UNet's
            runs = [in_subprocess({**spec, "model": model, "over": {**over, "gradient_checkpointing": gc}})
                    for gc in (False, True)]
            report(f"SD 1.5 architecture (random weights), 512 px, fp16, batch 1, {steps} steps, LoRA rank 4, "
                   "UNet + text encoder", ("gradient_checkpointing off", "gradient_checkpointing on"), tuple(runs),
                   "checkpointing on/off")
            return
        if a.tiny:
            from tests.conftest import build_tiny_sd

            model = str(build_tiny_sd(Path(tmp) / "tiny"))
        else:
            model = a.model
            demo = ROOT / "assets" / "demo-model"
            if not model and not demo.is_dir():
                sys.exit(f"the demo model is not built yet ({demo}); pass --model PATH or --tiny")
        runs = [in_subprocess({**spec, "model": model, "over": {"cache_latents": c}}) for c in (False, True)]
        report(f"{Path(model).name if model else 'demo model'}, native size, batch 1, {steps} steps, LoRA rank 4, "
               "UNet + text encoder", ("cache_latents off", "cache_latents on"), tuple(runs), "cached/uncached")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
