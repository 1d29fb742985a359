"""Applying styles to the loaded base model: LoRA adapters loaded once, switched by name (diffusers + peft)."""
from __future__ import annotations

from engine.models.safety import check_model_file
from engine.styles.store import StyleInfo


class AdapterCache:
    """LoRA adapters loaded into the base model's modules, kept loaded so switching back is quick.

    It wraps the same UNet/text-encoder objects in a diffusers pipeline only to use its LoRA loader and
    `set_adapters`; call it under the engine's lock (adapter changes and denoising must not interleave, MU-6).
    """

    def __init__(self, components):
        from diffusers import StableDiffusionPipeline

        c = components
        self.pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                            unet=c.unet, scheduler=c.scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
        self.loaded: set[str] = set()
        self.embeddings: dict[str, str] = {}  # token -> adapter name of the embedding style that added it

    def activate(self, style: StyleInfo | None, strength: float = 1.0) -> None:
        if style is not None and style.kind == "embedding":
            self._load_embedding(style)
            if self.loaded:
                self.pipe.disable_lora()  # an embedding works through its token alone
            return
        if style is None:
            if self.loaded:
                self.pipe.disable_lora()
            return
        if style.adapter_name not in self.loaded:
            check_model_file(style.lora)
            self.pipe.load_lora_weights(str(style.lora), adapter_name=style.adapter_name, use_safetensors=True)
            self.loaded.add(style.adapter_name)
        self.pipe.enable_lora()
        self.pipe.set_adapters([style.adapter_name], adapter_weights=[strength])

    def _load_embedding(self, style: StyleInfo) -> None:
        """Add the embedding's vectors as new tokens (once); a token another style added is replaced."""
        from safetensors.torch import load_file

        token = style.trigger_token
        if self.embeddings.get(token) == style.adapter_name:
            return
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
