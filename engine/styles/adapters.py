"""Applying styles to the loaded base model: LoRA adapters loaded once, switched and blended by name (diffusers +
peft).

Several styles at once are one `set_adapters(names, adapter_weights=...)` call: peft then adds every adapter's
update, each times its weight, so the model computes W x + sum_i w_i (alpha_i/r_i) B_i A_i x (Hu et al. 2021,
eq. 3, summed over adapters). Weights may be one number per style or per component
({"unet": w, "text_encoder": w}, LIBRARY-NOTES §2), and the UNet's may be per block ({"down": w, "mid": w, "up": w},
the names of diffusers' block scales, set on every LoRA layer of each block: AdapterCache._set_block_scales).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence, Union

import torch

from engine.models.safety import check_model_file
from engine.styles.store import StyleInfo

Weight = Union[float, dict]  # one strength, or {"unet": w or {"down": w, "mid": w, "up": w}, "text_encoder": w}
BLOCK_NAMES = ("down", "mid", "up")


def unet_weight(w: float, blocks: dict | None) -> float | dict:
    """The UNet weight `w` spread over the down / mid / up blocks (each times its block weight), in diffusers'
    block-scale form {"down": .., "mid": .., "up": ..}; plain `w` when every block weight is 1."""
    if not blocks or all(float(blocks.get(b, 1.0)) == 1.0 for b in BLOCK_NAMES):
        return float(w)
    return {b: float(w) * float(blocks.get(b, 1.0)) for b in BLOCK_NAMES}


def _block_of(module_name: str) -> str | None:
    """"down_blocks.1.resnets.0.conv1" -> "down"; "mid_block..." -> "mid"; "up_blocks..." -> "up"; else None."""
    head = module_name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head)


class AdapterCache:
    """LoRA adapters loaded into the base model's modules, kept loaded so switching back is quick.

    It wraps the same UNet/text-encoder objects in a diffusers pipeline only to use its LoRA loader and
    `set_adapters`; call it under the engine's lock (adapter changes and denoising must not interleave, MU-6).

    With `fuse=True` the active styles at their weights are folded into the base weights (`fuse_lora`), which
    removes the LoRA layers' extra matmuls from every denoising step; a change of styles or weights unfuses first. The base weights it changes are copied first and copied back
    on the next change, so unfusing restores them bit for bit (peft's own unmerge subtracts the update again,
    which leaves rounding drift that grows with every switch).
    """

    def __init__(self, components, *, fuse: bool = False):
        from diffusers import StableDiffusionPipeline

        c = components
        self.pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                            unet=c.unet, scheduler=c.scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
        self.loaded: set[str] = set()
        self.fuse = fuse
        self._fused: tuple | None = None  # the (names, weights) folded into the base weights
        self._backup: list[tuple[torch.Tensor, torch.Tensor]] = []  # (live base weight, its pre-fuse copy)
        self.active: tuple[tuple[str, object], ...] = ()  # what set_adapters last applied, for callers/tests
        self.embeddings: dict[str, str] = {}  # token -> adapter name of the embedding style that added it

    def load(self, style: StyleInfo) -> str:
        """Load a style's LoRA once (file checked first); returns its adapter name."""
        name = style.adapter_name
        if name not in self.loaded:
            check_model_file(style.lora)
            self._unfuse()  # loading into fused layers would merge into already-changed weights
            self.pipe.load_lora_weights(str(style.lora), adapter_name=name, use_safetensors=True)
            self.loaded.add(name)
        return name

    def activate(self, style: StyleInfo | None, strength: float = 1.0) -> None:
        """One style at `strength`, or none (LoRA off)."""
        self.activate_many([(style, strength)] if style else [])

    def activate_many(self, weighted: Sequence[tuple[StyleInfo, Weight]]) -> None:
        """Make exactly these styles active with these weights, in one `set_adapters` call (no reloading).

        Embedding styles (textual inversion) work through their token alone: they are loaded into the tokenizer
        and text encoder, and their strength does not apply."""
        for s, _ in weighted:
            if s.kind == "embedding":
                self._load_embedding(s)
        weighted = [(s, w) for s, w in weighted if s.kind != "embedding"]
        names = [self.load(s) for s, _ in weighted]
        weights = [_weight(w) for _, w in weighted]
        if not names:
            self._unfuse()
            if self.loaded:
                self.pipe.disable_lora()
            self.active = ()
            return
        key = (tuple(names), repr(weights))
        if self.fuse and self._fused == key:
            return  # already folded into the weights
        self._unfuse()
        self.pipe.enable_lora()
        blocks = {n: w["unet"] for n, w in zip(names, weights) if isinstance(w, dict) and isinstance(w.get("unet"), dict)}
        self.pipe.set_adapters(names, adapter_weights=[{**w, "unet": 1.0} if n in blocks else w
                                                       for n, w in zip(names, weights)])
        for name, per_block in blocks.items():
            self._set_block_scales(name, per_block)
        self.active = tuple(zip(names, weights))
        if self.fuse:
            self._fuse(names, key)

    def _set_block_scales(self, name: str, per_block: dict) -> None:
        """Scale adapter `name`'s UNet LoRA layers by the block they sit in (down / mid / up blocks).

        diffusers' own block scales (`set_adapters` with {"unet": {"down": ..}}, `_maybe_expand_lora_scales`) reach
        only the layers of each block's transformer layers: the ResNet convs our styles also train (conv1, conv2) in
        blocks without attention and in the mid block stay at scale 1.0 (read in peft_utils.get_module_weight, and
        measured: "0 everywhere" still changed the image). So the same down / mid / up weights are set here on every
        LoRA layer of the block, through peft's own set_scale (scale · alpha / r, as set_adapters does)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [(n, m) for n, m in self.pipe.unet.named_modules()
                  if isinstance(m, BaseTunerLayer) and name in getattr(m, "scaling", {})]
        outside = [n for n, _ in layers if _block_of(n) is None]
        if outside:
            raise ValueError(f"this style has UNet LoRA layers outside the down / mid / up blocks ({outside[0]}), "
                             "which per-block weights cannot place: set the block weights back to 1")
        for n, m in layers:
            m.set_scale(name, float(per_block.get(_block_of(n), 1.0)))

    @contextlib.contextmanager
    def training(self, style: StyleInfo) -> Iterator[dict]:
        """`style`'s adapter alone at weight 1, unfused, with its UNet LoRA parameters trainable in fp32 (yielded by
        peft parameter name): refinement trains them in the loaded model instead of a second copy of it. On exit
        the adapter's tensors (the very objects, dtypes included), the parameters' flags and the UNet's mode are
        put back, so the cached style is exactly as loaded, and nothing is active (the next activate re-applies)."""
        name = self.load(style)
        self._unfuse()
        self.pipe.enable_lora()
        self.pipe.set_adapters([name], adapter_weights=[1.0])
        unet = self.pipe.unet
        params = {n: p for n, p in unet.named_parameters() if "lora_" in n and f".{name}." in n}
        saved = {n: (p.data, p.requires_grad) for n, p in params.items()}
        was_training = unet.training
        try:
            for p in params.values():
                # a copy, always (.float() of an fp32 tensor is the tensor itself, which training would change in
                # place); fp32 LoRA over fp16/bf16 base weights, as the trainer's mixed precision
                p.data = p.data.to(torch.float32, copy=True)
                p.requires_grad_(True)
            yield params
        finally:
            for n, p in params.items():
                p.requires_grad_(saved[n][1])
                p.data = saved[n][0]
                p.grad = None
            unet.train(was_training)
            self.pipe.disable_lora()
            self.active = ()

    def _load_embedding(self, style: StyleInfo) -> None:
        """Add the embedding's vectors as new tokens (once); a token another style added is replaced."""
        from safetensors.torch import load_file

        token = style.trigger_token
        if self.embeddings.get(token) == style.adapter_name:
            return
        self._unfuse()  # the text encoder's embedding matrix grows; fused weights must be plain first
        if token in self.embeddings:
            self.pipe.unload_textual_inversion(token)
            del self.embeddings[token]
        check_model_file(style.lora)
        vectors = load_file(str(style.lora))["emb_params"]
        self.pipe.load_textual_inversion(vectors, token=token)
        self.embeddings[token] = style.adapter_name

    def expand_prompts(self, prompts: list[str]) -> list[str]:
        """Multi-vector embeddings are tokens "<t> <t>_1 …": spell them out as diffusers' pipeline does."""
        if not self.embeddings:
            return list(prompts)
        return [self.pipe.maybe_convert_prompt(p, self.pipe.tokenizer) for p in prompts]

    def forget(self, style_ids: set[str]) -> None:
        """Drop the adapters and embedding tokens of styles that no longer exist (the trash was emptied)."""
        self._unfuse()
        for token, name in list(self.embeddings.items()):
            if name.rsplit("-v", 1)[0] in style_ids:
                self.pipe.unload_textual_inversion(token)
                del self.embeddings[token]
        names = [n for n in self.loaded if n.rsplit("-v", 1)[0] in style_ids]
        if names:
            self.pipe.delete_adapters(names)
            self.loaded.difference_update(names)
            if self.loaded:
                self.pipe.disable_lora()  # delete_adapters activates what is left; the next activate() picks again
        self.active = ()

    def unload_all(self) -> None:
        """Remove every adapter (the base model is exactly as loaded afterwards)."""
        self._unfuse()
        if self.loaded:
            self.pipe.unload_lora_weights()
        self.loaded.clear()
        self.active = ()

    # ---- fusing -------------------------------------------------------------------------------------------------
    def _fuse(self, names: list[str], key: tuple) -> None:
        from peft.tuners.lora import LoraLayer

        self._backup = []
        for model in (self.pipe.unet, self.pipe.text_encoder):
            for m in model.modules():
                if isinstance(m, LoraLayer) and any(n in m.lora_A for n in names):
                    w = m.get_base_layer().weight
                    # kept in host memory: on a GPU the copy of every targeted weight would cost as much VRAM
                    # as those layers; copying back on a switch is one host-to-device transfer
                    self._backup.append((w, w.detach().to("cpu", copy=True)))
        # set_adapters already put the weights into peft's scaling, which merging uses; lora_scale stays 1.
        self.pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=names)
        self._fused = key

    def _unfuse(self) -> None:
        if self._fused is None:
            return
        with warnings.catch_warnings():  # layers where only some of the fused adapters live say "already unmerged"
            warnings.filterwarnings("ignore", message="Already unmerged")
            self.pipe.unfuse_lora(components=["unet", "text_encoder"])
        with torch.no_grad():
            for live, saved in self._backup:
                live.copy_(saved.to(live.device))  # exact, whatever rounding unmerge left
        self._backup, self._fused = [], None


def _weight(w: Weight) -> Weight:
    if isinstance(w, dict):
        unknown = set(w) - {"unet", "text_encoder"}
        if unknown:
            raise ValueError(f"per-component weights take 'unet' and 'text_encoder', not {sorted(unknown)}")
        out = {}
        for k, v in w.items():
            if k == "unet" and isinstance(v, dict):
                if set(v) - set(BLOCK_NAMES):
                    raise ValueError(f"per-block UNet weights take {BLOCK_NAMES}, not {sorted(v)}")
                out[k] = {b: float(x) for b, x in v.items()}
            else:
                out[k] = float(v)
        return out
    return float(w)
