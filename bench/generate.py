"""Generation speed and memory: our engine vs diffusers' StableDiffusionPipeline, same process, same everything.

    python bench/generate.py [--model PATH] [--steps 20] [--batch 4] [--repeats 3] [--scheduler dpmpp_2m]

Then the cost of styles, same run, same model: bare base model, one style (plain LoRA layers, and fused into the
weights), two styles blended, and switching between two cached styles on every request; images/s and the ratio
to bare (goal: one style costs <= 5%). The styles are random-B LoRAs in the trainer's format on the subject
preset's layers (attention, feed-forward, ResNet convs; rank 4; text encoder too), or with --train-steps N two
LoRAs trained for N steps on the bundled examples. --skip-styles leaves that part out. On the demo model also an
instant style (IP-Adapter, 4 references; goal <= 15% over bare) and the time to create one (goal < 1 s).

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
    ap.add_argument("--skip-styles", action="store_true", help="leave out the styles part")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="styles part: train two LoRAs this many steps (0: random-B LoRAs, no training)")
    ap.add_argument("--rounds", type=int, default=5, help="styles part: interleaved rounds per variant")
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
    if not a.skip_styles:
        bench_styles(a)


def _make_styles(a, eng) -> tuple[list, str]:
    """Two styles on the engine's model: trained for a few steps, or random-B LoRAs (say which)."""
    if a.train_steps:
        from engine.core.captions import read_captions
        from engine.core.train_config import TrainConfig, demo_settings, presets
        from engine.styles.store import publish
        from engine.train.loop import train

        out = []
        for kind, folder in (("subject", "heart"), ("style", "checkered")):
            p = {**presets(kind, token="olis", class_noun="shape"), **demo_settings(kind)}
            p.update(max_train_steps=a.train_steps, validation_steps=0, report_to="none",
                     checkpointing_steps=10_000, with_prior_preservation=False)
            images = sorted((ROOT / "assets" / "examples" / folder).glob("*.png"))
            caps, _ = read_captions(images, "olis", p["instance_prompt"])
            cfg = TrainConfig(instance_images=tuple(map(str, images)), instance_captions=caps, **p)
            r = train(cfg, eng.data_dir / "runs" / folder, resume=False)
            out.append(publish(eng.data_dir, folder, r.lora_path, r.style_json_path))
        return out, f"two LoRAs trained {a.train_steps} steps each (heart subject rank 8, checkered style rank 8)"
    from tests.lora_support import make_random_style

    out = [make_random_style(eng.model, eng.data_dir, n, seed=k, rank=4, alpha=4, scale=0.3)
           for k, n in enumerate(("A", "B"))]
    return out, "two random-B LoRAs (subject-preset layers incl. ResNet convs, rank 4, UNet + text encoder)"


def bench_styles(a) -> None:
    """Throughput with styles vs the bare model, interleaved so that machine noise hits every variant alike."""
    data = tempfile.mkdtemp(prefix="sb-bench-styles-")
    bare = Engine(Settings(model=a.model, data_dir=data))  # never loads a LoRA: truly bare layers
    plain = Engine(Settings(model=a.model, data_dir=data), fuse_styles=False)
    fused = Engine(Settings(model=a.model, data_dir=data))  # the default: active styles are fused
    (sa, sb), how = _make_styles(a, plain)
    common = dict(prompt="a red circle on a blue background", batch_size=a.batch, num_inference_steps=a.steps,
                  guidance_scale=a.guidance, scheduler=a.scheduler, seed=1)
    one_a, one_b = GenerateRequest(style=sa.id, **common), GenerateRequest(style=sb.id, **common)
    flip = {"plain": 0, "fused": 0}

    def switching(engine, key):
        flip[key] += 1
        return engine.generate(one_a if flip[key] % 2 else one_b)
    variants = {
        "bare base model": lambda: bare.generate(GenerateRequest(**common)),
        "one style, fused (default)": lambda: fused.generate(one_a),
        "one style, LoRA layers (no fuse)": lambda: plain.generate(one_a),
        "two styles blended 0.5/0.5, fused": lambda: fused.generate(
            GenerateRequest(styles=((sa.id, 0.5), (sb.id, 0.5)), **common)),
        "two styles blended, no fuse": lambda: plain.generate(
            GenerateRequest(styles=((sa.id, 0.5), (sb.id, 0.5)), **common)),
        "switch A/B each request, fused": lambda: switching(fused, "fused"),
        "switch A/B each request, no fuse": lambda: switching(plain, "plain"),
    }
    instant_note = ""
    if not a.model:  # instant styles: the bundled demo IP-Adapter (a real model needs `ip_adapter` in settings)
        inst = Engine(Settings(model=a.model, data_dir=data))
        refs = sorted((ROOT / "assets" / "examples" / "checkered").glob("*.png"))[:4]
        t_first = _timed(lambda: inst.create_instant_style("bench", refs))  # includes loading the adapter once
        t_create = min(_timed(lambda: inst.create_instant_style("bench", refs)) for _ in range(3))
        sid = inst.create_instant_style("bench", refs).id
        instant_note = (f"create_instant_style with 4 references: {t_create:.3f} s (best of 3; first call, which "
                        f"also loads the IP-Adapter: {t_first:.3f} s; goal < 1 s)")
        variants["instant style, style only"] = lambda: inst.generate(GenerateRequest(instant_style=sid, **common))
        variants["instant style, style and content"] = lambda: inst.generate(
            GenerateRequest(instant_style=sid, instant_style_only=False, **common))
    for fn in variants.values():
        fn()  # warm-up: loads the LoRAs once (then cached)
    best = {k: float("inf") for k in variants}
    for _ in range(a.rounds):
        for k, fn in variants.items():
            best[k] = min(best[k], _timed(fn))
    n = a.batch
    print(f"\nstyles ({how}); {a.steps} steps, batch {n}; best of {a.rounds} interleaved rounds:")
    for k, t in best.items():
        print(f"  {k:34s} {n / t:8.2f} images/s  ratio vs bare {best['bare base model'] / t:6.3f}  "
              f"(cost {100 * (t / best['bare base model'] - 1):+6.1f}%)")
    if instant_note:
        print(instant_note + "; instant style cost goal <= 15% over bare")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
