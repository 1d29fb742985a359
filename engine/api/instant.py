"""The Engine's instant-style methods (engine/styles/instant.py): a style from reference images through an
IP-Adapter (Ye et al. 2023) with InstantStyle's style-only block scales (Wang et al. 2024), and "train it
properly" into the next version. A mixin of engine.api.Engine, which owns the state these methods use."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import torch

from engine.core.config import ConfigError
from engine.core.train_config import TrainConfig
from engine.models.loading import DEMO_MODEL
from engine.styles.blend import check_same_base
from engine.styles.store import StyleInfo


class InstantMethods:
    # ---- instant styles (IP-Adapter) ---------------------------------------------------------------------------
    def _is_demo(self) -> bool:
        try:
            return Path(self.model.source).resolve() == DEMO_MODEL.resolve()
        except OSError:
            return False

    def _ip_adapter(self):
        """The IP-Adapter for the loaded model (the demo one, or `settings.ip_adapter`), loaded once."""
        from engine.styles.instant import load_adapter, resolve_adapter

        folder = resolve_adapter(self.settings.ip_adapter, demo=self._is_demo())
        key = str(folder)
        if key not in self._ip_adapters:
            c = self.model.components
            self._ip_adapters[key] = load_adapter(folder, device=c.device, dtype=c.dtype)
        return self._ip_adapters[key]

    def create_instant_style(self, name: str, reference_image_paths, *, style_only: bool = True,
                             strength: float = 1.0) -> StyleInfo:
        """A style from 1-8 reference images, ready at once (no training): the images go through the image intake
        (IM checks), are stored by content hash with their cached image embeddings as v1 of a new library entry
        of kind "instant". Generate with it through GenerateRequest.instant_style."""
        from engine.core.images import load_image
        from engine.styles.instant import (EMBEDS_FILE, MAX_REFERENCES, preview_strip, reference_pngs)
        from engine.styles.records import clean_name
        from engine.styles.store import publish_files

        name = clean_name(name)
        paths = [p for p in (reference_image_paths or []) if p]
        if not 1 <= len(paths) <= MAX_REFERENCES:
            raise ConfigError(f"give 1 to {MAX_REFERENCES} reference images; {len(paths)} were given")
        if not 0.0 <= float(strength) <= 2.0:
            raise ConfigError(f"`strength` must be between 0 and 2 but is {strength}")
        images = [load_image(p)[0] for p in paths]
        refs = reference_pngs(images)
        with self._lock:
            adapter = self._ip_adapter()
            embeds = adapter.embed(images)
            m = self.model
        from safetensors.torch import save as save_tensors

        files = {f"ref-{h[:16]}.png": data for _, h, data in refs}
        keep = [i for i, _, _ in refs]  # one embedding per stored reference
        files[EMBEDS_FILE] = save_tensors({"image_embeds": embeds[keep].contiguous()},
                                          metadata={"adapter": adapter.fingerprint})
        buf = io.BytesIO()
        preview_strip(images).save(buf, format="PNG")
        files["preview.png"] = buf.getvalue()
        meta = {"kind": "instant", "preset": "style", "trigger_token": "instant", "weights_file": EMBEDS_FILE,
                "source": "instant", "base_model_fingerprint": m.fingerprint, "base_model": m.name,
                "recommended_strength": float(strength),
                "instant": {"references": [f"ref-{h[:16]}.png" for _, h, _ in refs], "sha256": [h for _, h, _ in refs],
                            "adapter": adapter.folder.name, "adapter_fingerprint": adapter.fingerprint,
                            "strength": float(strength), "style_only": bool(style_only), "combine": "mean"}}
        return publish_files(self.data_dir, name, files, meta)

    def instant_references(self, style_id: str) -> list[Path]:
        """The reference images of an instant style's newest instant version (for its library card)."""
        import json

        v = next((v for v in reversed(self.library.versions(style_id)) if v.kind == "instant"), None)
        if v is None:
            return []
        meta = json.loads((v.folder / "style.json").read_text("utf-8"))
        return [v.folder / f for f in meta.get("instant", {}).get("references", []) if (v.folder / f).is_file()]

    def _instant_embeds(self, v: StyleInfo, adapter) -> "torch.Tensor":
        """The version's cached embeddings, recomputed from its references if made with another adapter."""
        from PIL import Image
        from safetensors import safe_open

        from engine.styles.instant import combine_embeds

        with safe_open(str(v.lora), framework="pt") as f:
            cached = f.metadata().get("adapter") == adapter.fingerprint
            embeds = f.get_tensor("image_embeds") if cached else None
        if embeds is None:
            refs = [v.folder / p.name for p in self.instant_references(v.id)]
            embeds = adapter.embed([Image.open(p).convert("RGB") for p in refs])
        return combine_embeds(embeds)

    def _activate_instant(self, style_id: str, strength: float, style_only: bool):
        """Attach the IP-Adapter with InstantStyle block scales and return (version, (embedding, unconditional
        embedding)), the sampler's `image_embeds` (each [1, D], or [1, patches + 1, width] hidden states for
        IP-Adapter Plus), or detach it and return (None, None). Call under the model lock."""
        from engine.styles.instant import IPAdapterHook, style_blocks_for

        if not style_id:
            self._detach_instant()
            return None, None
        v = self.library.find_version(style_id)
        if v.kind != "instant":
            v = next((x for x in reversed(self.library.versions(v.id)) if x.kind == "instant"), None)
            if v is None:
                raise ConfigError(f"style {style_id!r} is not an instant style; pick it among the LoRA styles")
        check_same_base([v], self.model.fingerprint, self.model.name)
        adapter = self._ip_adapter()
        embeds = self._instant_embeds(v, adapter)
        unet = self.model.components.unet
        if self._ip_hook is None or self._ip_hook.unet is not unet:
            self._ip_hook = IPAdapterHook(unet)
        self._ip_hook.attach(adapter)
        self._ip_hook.set_scale(strength, style_blocks_for(self._is_demo()) if style_only else None)
        return v, (embeds, adapter.negative(embeds))

    def _detach_instant(self) -> None:
        if self._ip_hook is not None:
            self._ip_hook.detach()

    def train_from_instant(self, style_id: str, *, max_train_steps: int | None = None, user: str = "local",
                           job_id: str | None = None) -> Iterator:
        """"Train it properly": a DreamBooth run (the style preset) on an instant style's reference images; the
        result is published as the next version of the same library entry. Yields the trainer's events, then the
        TrainJobResult (see `train_iter`)."""
        from engine.core.train_config import demo_settings, presets, suggest_trigger_token

        refs = self.instant_references(style_id)
        if not refs:
            raise ConfigError(f"style {style_id!r} has no instant version with reference images to train on")
        style = self.get_style(style_id)
        token = suggest_trigger_token(self.model.components.tokenizer)
        values = presets("style", token=token)
        if self._is_demo():
            values.update(demo_settings("style"))
        if max_train_steps:
            values["max_train_steps"] = int(max_train_steps)
        cfg = TrainConfig(instance_images=tuple(str(p) for p in refs), **values)
        return self.train_iter(cfg, style.name, user=user, job_id=job_id, into_style=style.id)
