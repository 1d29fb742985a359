"""scripts/learning_table.py --every N measures the LoRA of each evaluated checkpoint: the run's evaluation exports
(evaluation/step-<N>/lora.safetensors) of the checkpoints its scores.json records, in step order; step 0 (the base
model, no LoRA), folders without a LoRA and stale exports skipped."""
from __future__ import annotations

from scripts.learning_table import checkpoint_loras


def test_finds_every_evaluated_lora_in_step_order(tmp_path):
    import json

    steps = (0, 150, 1200, 300)
    for step in steps:
        d = tmp_path / "evaluation" / f"step-{step}"
        d.mkdir(parents=True)
        (d / "style.json").write_text("{}")
        if step:
            (d / "lora.safetensors").write_bytes(b"x")
    # A resume renames exports past its checkpoint (engine/train/evaluate.py); scores.json no longer lists them.
    stale = tmp_path / "evaluation" / "step-450.old-20261129-101500-abcdef"
    stale.mkdir()
    (stale / "lora.safetensors").write_bytes(b"x")
    records = [{"step": s, "likeness": 0.5, "fidelity": 0.9} for s in steps]
    (tmp_path / "evaluation" / "scores.json").write_text(json.dumps({"records": records}))
    found = checkpoint_loras(tmp_path)
    assert [s for s, _ in found] == [150, 300, 1200]  # numeric order, not "1200" < "150"
    assert all(f.name == "lora.safetensors" and f.parent.name == f"step-{s}" for s, f in found)


def test_no_evaluation_no_checkpoints(tmp_path):
    assert checkpoint_loras(tmp_path) == []
