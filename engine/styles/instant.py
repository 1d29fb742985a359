"""Instant styles: a style from reference images, no training (IP-Adapter, Ye et al. 2023; InstantStyle, Wang et
al. 2024).

An IP-Adapter adds a second, "decoupled" cross-attention to every cross-attention block of the UNet: image tokens
(from an image encoder's embedding through a small projection) get their own `to_k_ip`/`to_v_ip`, and the block
adds `scale * attention(image tokens)` to its text attention. We use diffusers' machinery for all of it
(`UNet2DConditionModel._load_ip_adapter_weights`, `IPAdapterAttnProcessor2_0`, `ImageProjection`), so the files are
the standard ones (`ip_adapter.safetensors` with `image_proj.*`/`ip_adapter.*` keys, an `image_encoder/` folder)
and plain `pipe.load_ip_adapter(...)` reproduces our images.

InstantStyle's "style only": the image tokens are injected only into the blocks that carry style (scale 0
elsewhere), so the reference's *content* (its shape, its subject) does not leak into the image. Which block that
is was measured for the demo UNet (see `STYLE_BLOCKS` and README "Instant style").

A version of kind "instant" stores: the reference images (re-encoded PNGs named by the sha256 of their bytes),
their image embeddings (`image_embeds.safetensors`, cached; recomputed if the adapter changed), and in style.json
the adapter's fingerprint and the default strength and style-only switch.
"""
from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.files import sha256_file
from engine.core.errors import LibraryError
from engine.models.safety import check_model_file

ROOT = Path(__file__).resolve().parents[2]
DEMO_IP_ADAPTER = ROOT / "assets" / "demo-ip-adapter"
MAX_REFERENCES = 8
EMBEDS_FILE = "image_embeds.safetensors"
# Blocks that carry style, by UNet. SD 1.x: InstantStyle injects into the up blocks (decoder) only. The demo UNet
# uses the same decoder-only rule (its decoder cross-attention: up_blocks.1 and up_blocks.2), and the demo adapter is
# trained for it: 75% of its steps run with exactly these blocks on (scripts/train_demo_ip_adapter.py). Probe
# (scripts/probe_demo_ip_adapter.py, random references, seeds 700+; reference texture reproduced, style only):
# checkered 0.17, striped 0.50 (the earlier adapter, trained with every block on: 0.06 / 0.38).
STYLE_BLOCKS = {"demo": ("up_blocks.1.", "up_blocks.2."), "sd": ("up_blocks.1.", "up_blocks.2.", "up_blocks.3.")}
# Weight files of the standard release (h94/IP-Adapter: models/ip-adapter_sd15.safetensors, models/image_encoder/).
WEIGHT_NAMES = ("ip_adapter.safetensors", "ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.safetensors")



def find_adapter_files(folder: Path) -> tuple[Path, Path]:
    """(weights file, image encoder folder) in a local IP-Adapter folder: ours, or the h94 layout (models/...)."""
    for base in (folder, folder / "models"):
        for name in WEIGHT_NAMES:
            if (base / name).is_file() and (base / "image_encoder" / "config.json").is_file():
                return base / name, base / "image_encoder"
    raise LibraryError(f"{folder} is not an IP-Adapter folder: it needs one of {', '.join(WEIGHT_NAMES)} (safetensors "
                       "only) and an image_encoder/ folder beside it (config.json + model.safetensors)")


def resolve_adapter(source: str, *, demo: bool) -> Path:
    """The local folder of the IP-Adapter to use: `source` (a folder or a hub id) or, for the demo model, ours."""
    if not source:
        if demo:
            return DEMO_IP_ADAPTER
        raise LibraryError("instant styles need an IP-Adapter for this model: set `ip_adapter` in the settings to a "
                           "local folder (e.g. a download of h94/IP-Adapter with models/ip-adapter_sd15.safetensors "
                           "and models/image_encoder/) or to the hub id 'h94/IP-Adapter' when online")
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.exists() or source.count("/") != 1:
        raise LibraryError(f"`ip_adapter` {source!r} is neither a folder nor a hub id like 'h94/IP-Adapter'")
    from huggingface_hub import snapshot_download

    patterns = ["models/ip-adapter_sd15.safetensors", "models/image_encoder/config.json",
                "models/image_encoder/model.safetensors"]  # safetensors only: never the .bin files
    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown or gated repo: one clear message
        raise LibraryError(f"could not get the IP-Adapter {source!r} from the Hugging Face hub ({type(e).__name__}). "
                           "If this machine is offline, download it on a connected machine and set `ip_adapter` to "
                           "its folder.") from None


@dataclass
class IPAdapter:
    """A loaded IP-Adapter: its image encoder + preprocessor and its state dict for the UNet loader."""

    folder: Path
    fingerprint: str  # sha256 of the weights file: cached embeddings are only valid for the encoder they came from
    encoder: torch.nn.Module
    processor: object
    state: dict  # {"image_proj": {...}, "ip_adapter": {...}} as diffusers' load_ip_adapter builds it

    @property
    def plus(self) -> bool:
        """IP-Adapter Plus (a Resampler over the encoder's patch features) rather than the basic ImageProjection."""
        return "latents" in self.state["image_proj"]

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.encoder.parameters())
        if self.plus:  # the penultimate hidden states, as the pipeline's encode_image(output_hidden_states=True)
            out = self.encoder(pixels.to(p.device, p.dtype), output_hidden_states=True).hidden_states[-2]
        else:
            out = self.encoder(pixels.to(p.device, p.dtype)).image_embeds
        return out.float().cpu()

    def embed(self, images) -> torch.Tensor:
        """PIL images -> image embeddings, [N, D] (basic) or [N, patches + 1, width] (Plus), float32 on the CPU, as
        the pipeline's `encode_image`."""
        return self._encode(self.processor(images, return_tensors="pt").pixel_values)

    def negative(self, embeds: torch.Tensor) -> torch.Tensor:
        """The unconditional image condition for classifier-free guidance, as diffusers' `encode_image`: zeros for
        the basic adapter; for Plus the hidden states of an all-zero pixel tensor."""
        if not self.plus:
            return torch.zeros_like(embeds)
        return self._zero_image_states.expand_as(embeds).contiguous()

    @functools.cached_property
    def _zero_image_states(self) -> torch.Tensor:
        """The all-zero image's hidden states: one encoder pass per loaded adapter, not per generation."""
        size = self.encoder.config.image_size
        return self._encode(torch.zeros(1, 3, size, size))


def load_adapter(folder: Path, *, device="cpu", dtype=torch.float32) -> IPAdapter:
    """Load an IP-Adapter folder; every weights file is checked like a model file (safetensors only, finite)."""
    from safetensors import safe_open
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    weights, enc_dir = find_adapter_files(Path(folder))
    check_model_file(weights)
    for f in enc_dir.iterdir():
        if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise LibraryError(f"{f.name}: pickle weights are refused; use the image encoder's model.safetensors")
        if f.suffix == ".safetensors":
            check_model_file(f)
    state = {"image_proj": {}, "ip_adapter": {}}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        for key in f.keys():
            head, _, rest = key.partition(".")
            if head not in state:
                raise LibraryError(f"{weights.name}: unexpected key {key!r}; an IP-Adapter file holds image_proj.* "
                                   "and ip_adapter.* keys")
            state[head][rest] = f.get_tensor(key)
    if "proj.weight" not in state["image_proj"] and "latents" not in state["image_proj"]:
        raise LibraryError(f"{weights.name}: only the basic IP-Adapter (image_proj.proj) and IP-Adapter Plus "
                           "(image_proj.latents, a Resampler) are supported")
    encoder = CLIPVisionModelWithProjection.from_pretrained(enc_dir, use_safetensors=True).to(device, dtype).eval()
    size = encoder.config.image_size
    processor = CLIPImageProcessor(size=size, crop_size=size)  # as diffusers' load_ip_adapter builds it
    return IPAdapter(Path(folder), sha256_file(weights)[:16], encoder, processor, state)


class IPAdapterHook:
    """Attaches an IP-Adapter to a UNet (diffusers' loader) and detaches it exactly (original processors back).

    Attached only while an instant style is in use: a bare request then pays nothing for it. Call under the
    engine's model lock (like the LoRA adapter cache)."""

    def __init__(self, unet):
        self.unet = unet
        self.attached: IPAdapter | None = None
        self._saved: dict | None = None

    def attach(self, adapter: IPAdapter) -> None:
        if self.attached is adapter:
            return
        self.detach()
        self._saved = dict(self.unet.attn_processors)
        self.unet._load_ip_adapter_weights([adapter.state], low_cpu_mem_usage=False)
        self.attached = adapter

    def detach(self) -> None:
        if self.attached is None:
            return
        self.unet.encoder_hid_proj = None
        self.unet.config.encoder_hid_dim_type = None
        self.unet.set_attn_processor(self._saved)
        self.attached, self._saved = None, None

    def set_scale(self, strength: float, style_blocks: tuple[str, ...] | None) -> None:
        """IP-Adapter scale `strength` in every cross-attention block, or only in `style_blocks` (InstantStyle)."""
        from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

        for name, proc in self.unet.attn_processors.items():
            if isinstance(proc, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
                on = style_blocks is None or name.startswith(style_blocks)
                proc.scale = [float(strength) if on else 0.0]


def style_blocks_for(demo: bool) -> tuple[str, ...]:
    return STYLE_BLOCKS["demo" if demo else "sd"]


def reference_pngs(images) -> list[tuple[int, str, bytes]]:
    """(index, sha256, PNG bytes) per image, duplicates (same bytes) dropped, order kept."""
    out, seen = [], set()
    for i, im in enumerate(images):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = buf.getvalue()
        h = hashlib.sha256(data).hexdigest()
        if h not in seen:
            seen.add(h)
            out.append((i, h, data))
    return out


def combine_embeds(embeds: torch.Tensor) -> torch.Tensor:
    """Several references -> one conditioning embedding [1, D]: their **mean**.

    Why averaging and not diffusers' concatenation of 4 tokens per image: the mean keeps the adapter's token count
    (and cost) the same for 1 or 8 references and puts the references on the same footing as the single image the
    adapter was trained with; what the references share (their look) adds up while what differs between them (the
    subject of each) partly cancels, which is what a *style* wants. Concatenation would pass every reference's
    content at full weight.
    """
    return embeds.float().mean(dim=0, keepdim=True)


def preview_strip(images, cell: int = 64):
    """The reference images side by side (the library card's picture)."""
    from PIL import Image

    strip = Image.new("RGB", (cell * len(images), cell), (255, 255, 255))
    for i, im in enumerate(images):
        strip.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (i * cell, 0))
    return strip
