"""Class-prior images for prior preservation (Ruiz et al. 2023, sec. 3.3), generated once and cached on disk.

The cache key is a hash of everything that changes the images: base-model fingerprint, class prompt, negative
prompt, resolution, scheduler, steps, guidance and the seed policy. A different key is a different folder, so
images are never reused for another model or prompt; the same key asked for more images is topped up.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from engine.core.files import atomic_write_bytes
from engine.core.errors import Cancelled
from engine.generate.sampler import Components, sample, to_pil

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PriorSpec:
    """What the prior images are made from; its hash names the cache folder."""

    model_fingerprint: str
    class_prompt: str
    negative_prompt: str = ""
    resolution: int = 32
    scheduler: str = "dpmpp_2m"
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    seed_policy: str = "seed=index"  # image i uses seed i: the set grows without changing earlier images

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


@dataclass(frozen=True)
class PriorResult:
    paths: list[Path]
    generated: int  # how many had to be made this time (0 on a full cache hit)
    folder: Path


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _read_manifest(folder: Path, spec: PriorSpec) -> dict[int, dict]:
    """Valid cached entries by seed; an entry whose file is missing or altered is dropped (and regenerated)."""
    try:
        m = json.loads((folder / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    if m.get("schema_version") != SCHEMA_VERSION or m.get("spec") != asdict(spec):
        return {}  # never reuse images made for another key, even if a folder name collided
    good = {}
    for e in m.get("images", []):
        p = folder / e["file"]
        if p.is_file() and _sha(p) == e["sha256"]:
            good[int(e["seed"])] = e
    return good


def ensure_class_images(c: Components, spec: PriorSpec, priors_dir: Path, n: int, *, batch_size: int = 8,
                        on_progress: Callable[[int, int], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> PriorResult:
    """Return `n` class images for `spec`, generating only the missing ones through the shared sampler."""
    folder = priors_dir / spec.key()
    folder.mkdir(parents=True, exist_ok=True)
    entries = _read_manifest(folder, spec)
    missing = [s for s in range(n) if s not in entries]
    with _base_weights_only(c):
        made = _generate(c, spec, folder, entries, missing, batch_size, on_progress, should_stop)
    if not missing:
        _write_manifest(folder, spec, entries)
    return PriorResult([folder / entries[s]["file"] for s in range(n)], made, folder)


@contextlib.contextmanager
def _base_weights_only(c: Components):
    """Switch off every LoRA layer in the UNet and text encoder for the duration: a style that Generate left
    active must not leak into class images, which are cached under the *base* model's fingerprint."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in (c.unet, c.text_encoder) for m in model.modules() if isinstance(m, BaseTunerLayer)]
    was_on = [not m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, on in zip(layers, was_on):
            if on:
                m.enable_adapters(True)


def _generate(c, spec, folder, entries, missing, batch_size, on_progress, should_stop) -> int:
    """Sample the `missing` seeds in batches into `folder`, updating `entries` and the manifest as it goes."""
    made = 0
    for i in range(0, len(missing), batch_size):
        if should_stop and should_stop():
            raise Cancelled()
        seeds = missing[i:i + batch_size]
        imgs = sample(c, [spec.class_prompt] * len(seeds), [spec.negative_prompt] * len(seeds), seeds,
                      num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                      scheduler=spec.scheduler, height=spec.resolution, width=spec.resolution)
        for seed, img in zip(seeds, to_pil(imgs)):
            p = folder / f"{seed:06d}.png"
            img.save(p, format="PNG")
            entries[seed] = {"file": p.name, "seed": seed, "sha256": _sha(p)}
        made += len(seeds)
        # the manifest is rewritten after each batch, so an interrupted run keeps what it made
        _write_manifest(folder, spec, entries)
        if on_progress:
            on_progress(made, len(missing))
    return made


def ensure_prior_set(c: Components, spec: PriorSpec, prompts: list[str], priors_dir: Path, n: int, *,
                     on_progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> tuple[list[Path], list[str], int]:
    """`n` class images spread over several class prompts, each cached under its own key (see `spec`, whose
    class_prompt is replaced by each prompt in turn). Returns (paths, the prompt of each, how many were new),
    interleaved prompt by prompt so that any first k images cover every prompt."""
    per = -(-n // len(prompts))  # ceil
    specs = [dataclasses.replace(spec, class_prompt=p) for p in prompts]
    cached = [_read_manifest(priors_dir / s.key(), s) for s in specs]
    missing = sum(1 for entries in cached for seed in range(per) if seed not in entries)
    results, made = [], 0
    for s in specs:
        res = ensure_class_images(c, s, priors_dir, per, should_stop=should_stop,
                                  on_progress=(lambda k, _t: on_progress(made + k, missing)) if on_progress else None)
        made += res.generated
        results.append(res)
    order = [(r.paths[k], p) for k in range(per) for r, p in zip(results, prompts)][:n]
    return [o[0] for o in order], [o[1] for o in order], made


def _write_manifest(folder: Path, spec: PriorSpec, entries: dict[int, dict]) -> None:
    data = {"schema_version": SCHEMA_VERSION, "spec": asdict(spec),
            "images": [entries[s] for s in sorted(entries)]}
    atomic_write_bytes(folder / "manifest.json", json.dumps(data, indent=1).encode())
