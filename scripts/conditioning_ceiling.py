"""How far conditioning alone can take a frozen base model towards a held-out texture (issues 14 and 15).

An IP-Adapter (instant style) and textual inversion only change what the UNet is *told*; the UNet itself stays as
it is. This script asks for the best such message there is, found by gradient descent on the concept's 4 example
images (the denoising loss of their captions), everything else frozen, then measures it like the learning table:

- `--via text`: textual inversion (Gal et al. 2022, eq. 2): only the trigger's row of the token embedding trains.
- `--via adapter`: the image embedding fed to the demo IP-Adapter (every block on, strength 1), starting from the
  embedding of the first two examples; the captions lose the trigger, as in instant style.
- `--via pathway`: the adapter's own layers as well (the image projection and every `to_k_ip` / `to_v_ip`), i.e.
  the best a decoupled cross-attention of this size can do for this one texture with the UNet frozen: an upper
  bound for any IP-Adapter trained on many textures. `--blocks style` injects (and trains) only InstantStyle's
  style blocks, as "style only" does. `--via tokens`: the image projection but not the keys / values (are the
  adapter's keys and values able to carry the texture, given the right tokens?).

If the best message does not make new shapes textured, no image encoder can through those layers; if even `pathway`
does not, no IP-Adapter of this size can, and the fix has to be in the base model (for checkered on the demo model,
text and embedding reach nothing, pathway 0.72 / 0.75: README "Instant style").

    python scripts/conditioning_ceiling.py checkered --via adapter|tokens|pathway [--blocks style] [--base DIR
        --adapter DIR] [--steps 800] [--lr 0.3]

Prints one JSON line: `examples` (texture rate on the 4 training captions, 8 seeds each: did the fit work at all),
and per seed set textured / shape kept / styled on the learning table's style prompts (ring, cross, new colours).
About 3 CPU minutes per run on one thread.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scripts.learning_table as LT  # noqa: E402
from engine.demo import world as W  # noqa: E402


def example_latents(c, images) -> torch.Tensor:
    from PIL import Image

    px = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                      for p in images])
    with torch.no_grad():
        z = c.vae.encode(px).latent_dist.mean
    return (z - (c.vae.config.shift_factor or 0)) * c.vae.config.scaling_factor


def without_trigger(captions) -> list[str]:
    return [cap.replace(LT.TOKEN + " ", "") for cap in captions]


def text_message(c, captions):
    """Textual inversion: (parameters, condition() -> (encoder states, added kwargs), after-step hook)."""
    emb = c.text_encoder.get_input_embeddings()
    row = c.tokenizer.convert_tokens_to_ids(LT.TOKEN + "</w>")
    frozen = emb.weight.detach().clone()
    others = torch.arange(len(frozen)) != row
    emb.weight.requires_grad_(True)
    ids = c.tokenizer(list(captions), padding="max_length", max_length=c.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids

    def restore():  # the captions' other words get gradients too: every row but the trigger's is put back
        with torch.no_grad():
            emb.weight[others] = frozen[others]

    return [emb.weight], lambda: (c.text_encoder(ids)[0], None), restore


def adapter_message(c, images, captions, folder: Path | None = None, train: str = "adapter",
                    style_only: bool = False):
    """The image embedding of the demo IP-Adapter (or the one in `folder`; every block or the style blocks,
    strength 1); `train` (the --via route) "tokens" fits its projection too, "pathway" also its keys and values;
    captions without the trigger."""
    from PIL import Image

    from engine.generate.sampler import encode_prompts
    from engine.styles.instant import DEMO_IP_ADAPTER, STYLE_BLOCKS, IPAdapterHook, combine_embeds, load_adapter

    adapter = load_adapter(folder or DEMO_IP_ADAPTER)
    hook = IPAdapterHook(c.unet)
    hook.attach(adapter)
    hook.set_scale(1.0, STYLE_BLOCKS["demo"] if style_only else None)
    c.unet.requires_grad_(False)
    e = torch.nn.Parameter(combine_embeds(adapter.embed([Image.open(p).convert("RGB") for p in images[:2]])))
    params = [e]
    if train != "adapter":  # the projection, and for "pathway" the decoupled keys / values of the blocks on
        params += list(c.unet.encoder_hid_proj.parameters())
        for proc in c.unet.attn_processors.values():
            if train == "pathway" and hasattr(proc, "to_k_ip") and proc.scale[0] > 0:
                params += list(proc.to_k_ip.parameters()) + list(proc.to_v_ip.parameters())
        for q in params[1:]:
            q.requires_grad_(True)
    with torch.no_grad():
        enc = encode_prompts(c, without_trigger(captions))
    return params, lambda: (enc, {"image_embeds": [e.unsqueeze(1).expand(len(enc), 1, -1)]}), lambda: None


def rates(checker, concept, images, shapes, backgrounds) -> dict[str, float]:
    preds = checker.predict(images)
    return {"textured": float(np.mean([p["texture"] == concept for p in preds])),
            "shape": float(np.mean([p["shape"] == s for p, s in zip(preds, shapes)])),
            "styled": float(np.mean(LT.styled(concept, preds, images, shapes, backgrounds)))}


def main() -> None:
    from diffusers import DDPMScheduler

    from engine.demo.checker import DemoChecker
    from engine.generate.sampler import sample, to_pil
    from engine.models.loading import DEMO_MODEL, load_base_model
    from engine.train.math import diffusion_target

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concept", choices=W.HELD_OUT_TEXTURES)
    ap.add_argument("--via", choices=("text", "adapter", "tokens", "pathway"), default="text")
    ap.add_argument("--blocks", choices=("all", "style"), default="all", help="--via adapter / tokens / pathway: the image "
                    "tokens in every cross-attention block, or in the style blocks only (\"style only\")")
    ap.add_argument("--base", default="", help="a diffusers folder (default: the bundled demo model)")
    ap.add_argument("--adapter", type=Path, help="--via adapter / tokens / pathway: an IP-Adapter folder trained for --base "
                    "(scripts/train_demo_ip_adapter.py --base DIR; default: the bundled demo IP-Adapter)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--layer-lr", type=float, default=1e-3, help="--via tokens / pathway: the adapter "
                    "layers' rate")
    ap.add_argument("--sets", default="tune", help="comma-separated seed sets of the learning table")
    ap.add_argument("--save", type=Path, help="--via text: write the base folder with the inverted trigger here "
                                               "(a pivot for a LoRA run: scripts/lever_sweep.py job's base)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = load_base_model(a.base or None)
    c = base.components
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
    images, captions = LT.example_files(a.concept)
    z = example_latents(c, images)
    params, condition, after_step = (text_message(c, captions) if a.via == "text"
                                     else adapter_message(c, images, captions, a.adapter, a.via,
                                                          a.blocks == "style"))
    sched = DDPMScheduler.from_config(c.scheduler.config)
    opt = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:], "lr": a.layer_lr}], lr=a.lr)
    t0 = time.time()
    for _ in range(a.steps):  # the denoising loss of the 4 examples (v or epsilon, as the base model predicts)
        noise, t = torch.randn_like(z), torch.randint(0, sched.config.num_train_timesteps, (len(z),))
        states, added = condition()
        pred = c.unet(sched.add_noise(z, noise, t), t, states, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred, diffusion_target(sched, z, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step()
    with torch.no_grad():
        states, added = condition()
    image_embeds = added["image_embeds"][0][:1, 0].detach() if added else None
    prefix = "" if image_embeds is not None else f"{LT.TOKEN} "  # instant style: no trigger in the prompt
    checker = DemoChecker.load()

    def draw(prompts, seed0):
        with torch.no_grad():
            out = sample(c, prompts, [""] * len(prompts), [seed0 + i for i in range(len(prompts))],
                         image_embeds=image_embeds)
        return [np.asarray(im) for im in to_pil(out)]

    ex = [(captions if prefix else without_trigger(captions))[i % 4] for i in range(32)]
    row = {"concept": a.concept, "via": a.via, "blocks": a.blocks, "base": a.base, "steps": a.steps, "lr": a.lr,
           "layer_lr": a.layer_lr if a.via in ("tokens", "pathway") else None,
           "fit_s": round(time.time() - t0),
           "examples": float(np.mean([p["texture"] == a.concept for p in checker.predict(draw(ex, 300))]))}
    for s in a.sets.split(","):
        prompts, shapes, backgrounds, seed0 = LT.style_prompts(a.concept, s, token=prefix.strip())
        row[s] = rates(checker, a.concept, draw(prompts, seed0), shapes, backgrounds)
    print(json.dumps(row), flush=True)
    if a.save and a.via == "text":
        import shutil

        shutil.copytree(Path(a.base) if a.base else DEMO_MODEL, a.save, dirs_exist_ok=True)
        c.text_encoder.save_pretrained(a.save / "text_encoder", safe_serialization=True)


if __name__ == "__main__":
    main()
