"""What the Train tab draws: the loss plot, and the evaluation at each checkpoint (engine/train/evaluate.py) as a
plot of likeness and prompt fidelity, a note and the list of checkpoints to publish. Torch-free."""
from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from engine.core.events import TrainEvaluation


def loss_frame(steps: list[int], losses: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"step": steps, "loss": losses})


def eval_frame(scores) -> pd.DataFrame:
    """Long format for one LinePlot with a line per metric; checkpoints without scores are left out."""
    rows = [(step, value, metric) for step, like, fid in scores if like is not None
            for value, metric in ((like, "likeness"), (fid, "prompt fidelity")) if value is not None]
    return pd.DataFrame(rows, columns=["step", "score", "metric"])


def evaluation_note(ev: TrainEvaluation) -> str:
    lines = [f"**Evaluation** at step {ev.step}: {ev.metric}."]
    if ev.best_step is not None:
        like, fid = next((lk, f) for s, lk, f in ev.scores if s == ev.best_step)
        lines.append(f"Best checkpoint: **step {ev.best_step}** (likeness {like:.2f}, prompt fidelity {fid:.2f}); "
                     f"{ev.rule}.")
    if ev.warning:
        lines.append(f"⚠️ {ev.warning}")
    return "\n\n".join(lines)


def evaluation_view(ev: TrainEvaluation) -> dict[str, Any]:
    """The plot of likeness and prompt fidelity per checkpoint, the note (what the scores are, the rule, the
    best step, the over-training warning) and the checkpoints to publish, best one selected."""
    choices = []
    for step, like, fid in ev.scores:
        if step > 0:  # step 0 is the base model: nothing to publish
            scores = "scores not available" if like is None else f"likeness {like:.2f} · fidelity {fid:.2f}"
            choices.append((f"step {step} · {scores}" + (" · best" if step == ev.best_step else ""), step))
    value = ev.best_step if ev.best_step is not None else (choices[-1][1] if choices else None)
    return {"eval_plot": eval_frame(ev.scores), "eval_note": evaluation_note(ev), "eval_run": ev.run_id,
            "checkpoint": gr.Dropdown(choices=choices, value=value)}

