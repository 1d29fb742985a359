"""scripts/style_diagnosis.py (docs/learning-log.md's account of what the shipped style LoRAs learned) trains a
style LoRA and answers its five questions: one line per sampler, per timestep, per LoRA part, per first step and
per group of UNet blocks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_answers_every_question(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "style_diagnosis.py"), "polka", "--workdir",
                          str(tmp_path), "--override", "max_train_steps=2", "--images", "2", "--seeds", "1"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    counts = {q: sum(line.startswith(q + " ") or line.startswith(q + ":") for line in lines)
              for q in ("fit", "denoise", "parts", "steps", "blocks")}
    assert counts == {"fit": 4, "denoise": 5, "parts": 4, "steps": 5, "blocks": 2}, lines
    base = next(line for line in lines if line.startswith("parts: base model"))
    assert "textured 0.00" in base  # the base model has never seen polka dots
    assert list(tmp_path.glob("polka-*/output/lora.safetensors"))  # trained with the shipped preset, kept
