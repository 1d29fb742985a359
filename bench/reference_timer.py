"""Run another project's training script unchanged, timing its optimizer steps from inside the same way as ours.

    python bench/reference_timer.py RESULT.json WARMUP SCRIPT.py [script arguments...]

A global optimizer step hook (torch.optim.optimizer.register_optimizer_step_post_hook) stamps every step after
synchronising the GPU, exactly where our trainer's TrainProgress event is emitted (after the step's loss is read);
Accelerator.backward is wrapped to keep each step's loss. Peak memory is torch.cuda.max_memory_allocated from step
WARMUP to the last step. Nothing of the script is copied or edited: it runs by path (runpy), as its authors ship it.
"""
from __future__ import annotations

import atexit
import json
import runpy
import sys
import time


def main() -> None:
    out_path, warmup, script, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    import accelerate
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    cuda = torch.cuda.is_available()
    stamps: list[float] = []
    losses: list[float] = []
    peak: list[float] = []

    def on_step(optimizer, args_, kwargs):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if cuda and len(stamps) == warmup:
            torch.cuda.reset_peak_memory_stats()
        if cuda and len(stamps) > warmup:  # the peak of the timed steps only, not of the final save or inference
            peak[:] = [torch.cuda.max_memory_allocated() / 2**20]

    register_optimizer_step_post_hook(on_step)
    backward = accelerate.Accelerator.backward

    def timed_backward(self, loss, **kw):
        losses.append(float(loss.detach()))  # our trainer reads each step's loss too: the same sync
        return backward(self, loss, **kw)

    accelerate.Accelerator.backward = timed_backward

    def report():
        if len(stamps) <= warmup:
            return
        s0, t0, s1, t1 = warmup, stamps[warmup - 1], len(stamps), stamps[-1]
        with open(out_path, "w") as f:
            json.dump({"steps_per_s": (s1 - s0) / (t1 - t0), "timed_steps": s1 - s0, "device": "cuda" if cuda else "cpu",
                       "peak_mib": peak[0] if peak else 0.0, "first_loss": losses[0] if losses else float("nan"),
                       "last_loss": losses[-1] if losses else float("nan"), "threads": torch.get_num_threads()}, f)

    atexit.register(report)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
