"""`python -m engine.train`: config errors, an in-process run, and two CPU ranks under torchrun (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from engine.train.cli import main
from engine.core.train_config import TrainConfig, presets, save_train_config

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def write_run(tmp_path: Path, model: Path, **over) -> Path:
    (tmp_path / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(4):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse([8 + 2 * i, 8, 56, 56], fill=(200, 40 * i, 40))
        img.save(tmp_path / "img" / f"{i}.png")
        names.append(f"img/{i}.png")  # relative to run.toml
    cfg = TrainConfig(**{**presets("subject"), "instance_images": tuple(names), "base_model": str(model),
                         "max_train_steps": 3, "checkpointing_steps": 3, "validation_steps": 0,
                         "validation_prompts": (), "report_to": "none", "with_prior_preservation": False,
                         "learning_rate": 1e-3, **over})
    save_train_config(cfg, tmp_path / "run.toml")
    return tmp_path / "run.toml"


def test_config_errors_are_one_clear_line(tmp_path, tiny_sd, capsys):
    toml = write_run(tmp_path, tiny_sd)
    toml.write_text(toml.read_text() + "lora_rnak = 8\n")
    assert main(["--config", str(toml)]) == 2
    assert "unknown key(s) for TrainConfig: lora_rnak" in capsys.readouterr().err
    toml = write_run(tmp_path, tiny_sd)
    (tmp_path / "img" / "2.png").unlink()
    assert main(["--config", str(toml), "--run-dir", str(tmp_path / "run")]) == 2
    assert "2.png" in capsys.readouterr().err


def test_cli_trains_in_process(tmp_path, tiny_sd, capsys, monkeypatch):
    monkeypatch.setattr("engine.train.output.PREVIEW_STEPS", 2)
    toml = write_run(tmp_path, tiny_sd, max_train_steps=2, checkpointing_steps=1)
    assert main(["--config", str(toml)]) == 0  # run dir defaults to the config's folder
    out = capsys.readouterr().out
    assert "step 2/2 loss" in out and "checkpoint 2:" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and Path(summary["lora"]).is_file() and summary["resumed_from"] is None
    assert main(["--config", str(toml), "--resume"]) == 0  # already complete: re-exports from checkpoint 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 2


def test_torchrun_two_cpu_ranks_stay_in_sync(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline

    toml = write_run(tmp_path, tiny_sd, lora_alpha=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "engine.train", "--config", str(toml), "--run-dir", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.count("step 1/3") == 1  # only rank 0 reports
    assert "ranks in sync: LoRA checksum" in out and "identical on 2 ranks" in out
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    assert (ckpt / "rng-rank0.safetensors").is_file() and (ckpt / "rng-rank1.safetensors").is_file()
    lora = Path(json.loads(out.strip().splitlines()[-1])["lora"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    kw = dict(prompt="a photo of olis shape", num_inference_steps=2, output_type="pt")
    base = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(lora))
    tuned = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 1e-4
