"""Generation speed and memory: our engine vs diffusers' StableDiffusionPipeline, same process, same everything.

    python bench/generate.py [--model PATH] [--steps 20] [--batch 4] [--repeats 3] [--scheduler dpmpp_2m]

Prints images/s and peak memory of both and their ratios (ours / diffusers: > 1.0 means we are faster; memory
ratio < 1.0 means we use less), plus the demo-model latency check "4 images of 4 prompts". Memory: on CUDA,
torch.cuda.max_memory_allocated; on CPU, the peak resident set size above the idle baseline, sampled every 2 ms.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.core.config import GenerateRequest, Settings  # noqa: E402
from engine.api import Engine  # noqa: E402
from engine.generate.sampler import make_scheduler  # noqa: E402


class PeakMemory:
    """Peak memory during a block, in MiB above the level at entry."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0.0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.proc, self.base, self.run = psutil.Process(), psutil.Process().memory_info().rss, True
            self.max_rss = self.base
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def reset(self):
        """Forget the peak so far (e.g. a model load's transient copies); the level at entry stays the zero."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.max_rss = self.proc.memory_info().rss

    def current_peak(self) -> float:
        """The peak so far, in MiB above the level at entry (while still inside the block)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (max(self.max_rss, self.proc.memory_info().rss) - self.base) / 2**20

    def _poll(self):
        while self.run:
            self.max_rss = max(self.max_rss, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device != "cuda":
            self.run = False
            self.thread.join()
        self.peak = self.current_peak()


def run_ours(engine, req):
    return engine.generate(req)


def run_diffusers(pipe, req, size):
    gens = [torch.Generator().manual_seed(req.seed + i) for i in range(req.batch_size)]
    return pipe(req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.num_inference_steps,
                guidance_scale=req.guidance_scale, num_images_per_prompt=req.batch_size, height=size, width=size,
                generator=gens).images


def measure(fn, repeats, device):
    fn()  # warm-up
    times, peaks = [], []
    for _ in range(repeats):
        with PeakMemory(device) as pm:
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peaks.append(pm.peak)
    return min(times), max(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model folder / file / hub id (default: the bundled demo model)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scheduler", default="dpmpp_2m")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog
    dlog.disable_progress_bar()

    engine = Engine(Settings(model=a.model, data_dir=tempfile.mkdtemp(prefix="sb-bench-")))
    m = engine.model
    c = m.components
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=make_scheduler(a.scheduler, c.scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    req = GenerateRequest(prompt="a red circle on a blue background", negative_prompt="", batch_size=a.batch,
                          num_inference_steps=a.steps, guidance_scale=a.guidance, scheduler=a.scheduler, seed=1)
    ours_t, ours_mem = measure(lambda: run_ours(engine, req), a.repeats, engine.device)
    ref_t, ref_mem = measure(lambda: run_diffusers(pipe, req, c.default_size), a.repeats, engine.device)
    n = req.batch_size
    print(f"model {m.name} ({m.prediction_type}, {c.default_size}px) on {engine.device}, torch threads "
          f"{torch.get_num_threads()}; {a.scheduler}, {a.steps} steps, batch {n}, guidance {a.guidance}")
    print(f"ours:      {n / ours_t:8.2f} images/s  peak {ours_mem:8.1f} MiB  ({ours_t:.3f} s per batch)")
    print(f"diffusers: {n / ref_t:8.2f} images/s  peak {ref_mem:8.1f} MiB  ({ref_t:.3f} s per batch)")
    print(f"speed ratio ours/diffusers: {ref_t / ours_t:.3f} (goal >= 1.0); "
          f"memory ratio ours/diffusers: {ours_mem / max(ref_mem, 1e-9):.3f}")

    # Demo-model latency: four images of four different prompts, as one request with one prompt per line (one
    # batch), and as four requests one after the other (what pressing Generate four times costs).
    prompts = ["a red circle on a blue background", "a green square on a white background",
               "a striped yellow triangle on a black background", "a purple ring on an orange background"]
    one = GenerateRequest(prompt="\n".join(prompts), prompt_per_line=True, num_inference_steps=20,
                          guidance_scale=5.0, seed=0)
    reqs = [GenerateRequest(prompt=p, num_inference_steps=20, guidance_scale=5.0, seed=i) for i, p in enumerate(prompts)]
    batched = min(_timed(lambda: engine.generate(one)) for _ in range(a.repeats))
    apart = min(_timed(lambda: [engine.generate(r) for r in reqs]) for _ in range(a.repeats))
    print(f"4 images of 4 prompts (20 steps each) through the engine, best of {a.repeats}: {batched:.2f} s as one "
          f"request (one prompt per line; goal <= 2 s), {apart:.2f} s as four requests")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
