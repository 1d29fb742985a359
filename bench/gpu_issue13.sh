#!/usr/bin/env bash
# The GPU acceptance of issue "GPU speed" in one run (fits the device tool's 10-minute call): our trainer against
# diffusers' train_dreambooth_lora.py, UNet LoRA and UNet + text-encoder LoRA, and generation against diffusers'
# pipeline at batch 1, 4 and 8, all on the SD 1.5 architecture with random weights (no download), 512 px, fp16.
# On the device machine: carry the pinned wheels (README "Performance"), copy ../shared/anchors/train_dreambooth_lora.py
# into an ignored folder of the checkout (here: .anchors/), then:  bash bench/gpu_issue13.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${REF:-.anchors/train_dreambooth_lora.py}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python - <<'PY'
import sys; sys.path.insert(0, "bench")
from pathlib import Path
from train import build_sd15
if not Path("/tmp/sd15-random/model_index.json").exists():
    build_sd15(Path("/tmp/sd15-random"))
PY
python bench/train.py --reference "$REF" --gpu-sd15 --model /tmp/sd15-random --steps 40 --warmup 10
python bench/train.py --reference "$REF" --gpu-sd15 --model /tmp/sd15-random --steps 40 --warmup 10 --train-text-encoder
for b in 1 4 8; do python bench/generate.py --model /tmp/sd15-random --steps 25 --guidance 7.5 --batch "$b" --skip-styles; done
