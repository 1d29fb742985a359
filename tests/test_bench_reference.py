"""bench/reference_timer.py times another program's optimizer steps from inside without editing it: checked on a
toy accelerate training script (the real reference, diffusers' train_dreambooth_lora.py, needs torchvision and a
GPU machine; see bench/train.py --reference)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = """
import sys, torch
from accelerate import Accelerator
acc = Accelerator(cpu=True)
model = torch.nn.Linear(4, 1)
opt = torch.optim.AdamW(model.parameters(), lr=0.1)
model, opt = acc.prepare(model, opt)
x, y = torch.randn(64, 4), torch.randn(64, 1)
for step in range(int(sys.argv[1])):
    loss = ((model(x) - y) ** 2).mean()
    acc.backward(loss)
    opt.step()
    opt.zero_grad()
"""


def test_reference_timer_counts_the_scripts_steps_and_losses(tmp_path):
    script = tmp_path / "toy_train.py"
    script.write_text(TOY)
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "reference_timer.py"), str(out), "3", str(script), "12"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["timed_steps"] == 9 and res["steps_per_s"] > 0 and res["device"] == "cpu"
    assert res["last_loss"] < res["first_loss"]  # the script really trained, and its losses were read
