"""LoRA and embedding files as tensors: read the key formats in the wild, match them to the loaded model, write
ours (PEFT keys) and kohya/A1111's.

Formats read:
  PEFT (what we save):   unet.<path>.lora_A.weight / lora_B.weight, alpha in `lora_adapter_metadata`
  older diffusers:       unet.<path>.lora.down.weight / .lora.up.weight, text_encoder.<path>.lora_linear_layer.*
  kohya / A1111:         lora_unet_<path with _>.lora_down.weight / lora_up.weight / alpha, lora_te_text_model_<…>
                         (LoCon convolutions are the same keys with 4-d tensors)
Module names are resolved against the loaded model's own modules (a kohya name is the module path with "_"), so
a match means "this layer exists here with these shapes" and not only "the name parsed".

Why not diffusers' kohya converter for reading: with per-module alphas or ranks (what kohya writes for LoCon or
dynamic-rank LoRAs) `load_lora_weights` scales about 40% of the layers wrongly (measured on diffusers 0.42.1: 31 of
72 modules off by up to 7.5); PEFT keys with explicit `rank_pattern`/`alpha_pattern` reload exactly, so imports are
stored that way. Its `convert_state_dict_to_kohya` writes alpha = rank and `lora_te1_` names without `text_model_`
(LIBRARY-NOTES §4), so exports are written here too.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import torch

from engine.core.errors import LibraryError

COMPONENTS = ("unet", "text_encoder")
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_EMBEDDING_KEYS = ("emb_params", "*", "string_to_param.*", "string_to_param")


@dataclass(frozen=True)
class LoraModule:
    component: str  # "unet" | "text_encoder"
    name: str  # as the file names it: a dotted module path, or a kohya name (lora_unet_…)
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float | None  # None: alpha = rank (scale 1)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclass(frozen=True)
class Resolved:
    """A module of the file found in the model: its dotted path there."""
    component: str
    path: str
    module: LoraModule


@dataclass(frozen=True)
class MatchReport:
    total: int
    matched: tuple[Resolved, ...]
    unmatched: tuple[tuple[str, str], ...]  # (name in the file, why)

    @property
    def summary(self) -> str:
        return f"{len(self.matched)} of {self.total} layers matched"


def is_lora(keys) -> bool:
    return any(k.endswith((".lora_A.weight", ".lora_down.weight", ".lora.down.weight", ".down.weight")) for k in keys)


def parse_lora(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[LoraModule]:
    """The file's LoRA modules (down, up, alpha); raises LibraryError for keys of kinds we cannot apply."""
    downs: dict[tuple[str, str], str] = {}
    for key in sd:
        for suffix, up_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
                                  (".lora.down.weight", ".lora.up.weight"),
                                  (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")):
            if key.endswith(suffix):
                downs[(key[: -len(suffix)], suffix)] = up_suffix
                break
    used: set[str] = set()
    peft_meta = _peft_metadata(metadata)
    out = []
    for (stem, suffix), up_suffix in sorted(downs.items()):
        up_key = stem + up_suffix
        if up_key not in sd:
            raise LibraryError(f"the LoRA file has {stem + suffix!r} but not its partner {up_key!r}: it is incomplete")
        used.update((stem + suffix, up_key))
        component, name = _split_component(stem)
        alpha = None
        for alpha_key in (f"{stem}.alpha", f"{stem}.lora.alpha"):
            if alpha_key in sd:
                alpha = float(sd[alpha_key].float().reshape(-1)[0])
                used.add(alpha_key)
        if alpha is None and suffix == ".lora_A.weight":
            alpha = _peft_alpha(peft_meta.get(component), name)
        down, up = sd[stem + suffix], sd[up_key]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise LibraryError(f"{stem}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair")
        out.append(LoraModule(component, name, down, up, alpha))
    rest = sorted(set(sd) - used)
    if rest:
        kinds = "DoRA" if any("dora_scale" in k for k in rest) else \
            "LyCORIS LoHa/LoKr" if any(re.search(r"hada_|lokr_", k) for k in rest) else "unknown"
        raise LibraryError(f"the file has {len(rest)} {kinds} keys that Stylebooth cannot apply (e.g. {rest[0]!r}); "
                           "only plain LoRA (and LoCon) files can be imported")
    return out


def _split_component(stem: str) -> tuple[str, str]:
    for prefix, comp in _KOHYA_PREFIX.items():
        if stem.startswith(prefix):
            return comp, stem
    head, _, rest = stem.partition(".")
    if head in COMPONENTS and rest:
        if head == "text_encoder" and rest.startswith("text_model."):
            rest = rest[len("text_model."):]  # transformers 5 dropped the prefix (LIBRARY-NOTES §0.2)
        return head, rest
    if stem.startswith("lora_te2_") or head == "text_encoder_2":
        return "text_encoder_2", stem  # SDXL's second text encoder: never matches an SD 1/2 model
    return "unet", stem  # bare PEFT keys (no component prefix) are UNet keys in diffusers' loader


def _peft_metadata(metadata: dict[str, str]) -> dict[str, dict]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise LibraryError("the file's lora_adapter_metadata is not valid JSON") from None
    out: dict[str, dict] = {}
    for k, v in (flat.items() if isinstance(flat, dict) else ()):
        comp, _, field = k.partition(".")
        out.setdefault(comp, {})[field] = v
    return out


def _peft_alpha(cfg: dict | None, path: str) -> float | None:
    """PEFT's scale rule: alpha_pattern entry whose key matches the path's end, else lora_alpha."""
    if not cfg:
        return None
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            return float(value)
    return float(cfg["lora_alpha"]) if cfg.get("lora_alpha") is not None else None


def module_index(unet, text_encoder) -> dict[tuple[str, str], tuple[str, torch.nn.Module]]:
    """(component, name) -> (dotted path, layer) for every Linear/Conv2d, under each name a file may use."""
    index = {}
    for comp, root in (("unet", unet), ("text_encoder", text_encoder)):
        for path, mod in root.named_modules():
            if "lora_" in path or "base_layer" in path:
                continue
            layer = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod  # adapters already loaded
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            flat = path.replace(".", "_")
            names = [path, f"lora_unet_{flat}"] if comp == "unet" else \
                [path, f"lora_te_text_model_{flat}", f"lora_te_{flat}", f"lora_te1_text_model_{flat}"]
            for n in names:
                index[(comp, n)] = (path, layer)
    return index


def match(modules: list[LoraModule], unet, text_encoder) -> MatchReport:
    """Which of the file's LoRA modules exist in this model with shapes that fit (MF-8)."""
    index = module_index(unet, text_encoder)
    matched, unmatched = [], []
    for m in modules:
        hit = index.get((m.component, m.name))
        if hit is None:
            unmatched.append((m.name, "no such layer in this model"))
            continue
        path, layer = hit
        why = _shape_problem(m, layer)
        if why:
            unmatched.append((m.name, why))
        else:
            matched.append(Resolved(m.component, path, m))
    return MatchReport(len(modules), tuple(matched), tuple(unmatched))


def _shape_problem(m: LoraModule, layer) -> str | None:
    d, u = m.down.shape, m.up.shape
    if isinstance(layer, torch.nn.Linear):
        ok = m.down.ndim == 2 and d[1] == layer.in_features and u[0] == layer.out_features
        want = f"[r, {layer.in_features}] / [{layer.out_features}, r]"
    else:
        k = tuple(layer.kernel_size)
        ok = (m.down.ndim == 4 and d[1] == layer.in_channels and tuple(d[2:]) == k and u[0] == layer.out_channels
              and tuple(u[2:]) == (1, 1)) or (k == (1, 1) and m.down.ndim == 2 and d[1] == layer.in_channels
                                              and u[0] == layer.out_channels)
        want = f"[r, {layer.in_channels}, {k[0]}, {k[1]}] / [{layer.out_channels}, r, 1, 1]"
    return None if ok else f"shapes {tuple(d)} / {tuple(u)} do not fit this layer ({want})"


def lora_layout(modules: list[Resolved], component: str) -> dict | None:
    """PEFT LoraConfig fields for one component with every module's rank and alpha spelled out, so any mix of
    ranks and alphas reloads exactly (the file's `lora_adapter_metadata`)."""
    mine = [r for r in modules if r.component == component]
    if not mine:
        return None
    rank = Counter(r.module.rank for r in mine).most_common(1)[0][0]
    alpha = Counter(r.module.alpha if r.module.alpha is not None else r.module.rank
                    for r in mine).most_common(1)[0][0]
    # full paths as patterns: PEFT matches a pattern against the end of a module path, so a full path is exact
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(r.path for r in mine),
            "rank_pattern": {r.path: r.module.rank for r in mine},
            "alpha_pattern": {r.path: (r.module.alpha if r.module.alpha is not None else r.module.rank)
                              for r in mine},
            "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True, "use_dora": False, "peft_type": "LORA"}


def to_peft(modules: list[Resolved]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our stored format: PEFT keys, with per-module rank/alpha in `lora_adapter_metadata`."""
    sd, flat = {}, {}
    for r in modules:
        sd[f"{r.component}.{r.path}.lora_A.weight"] = r.module.down.contiguous()
        sd[f"{r.component}.{r.path}.lora_B.weight"] = r.module.up.contiguous()
    for comp in COMPONENTS:
        layout = lora_layout(modules, comp)
        if layout:
            flat.update({f"{comp}.{k}": v for k, v in layout.items()})
    return sd, {"format": "pt", "lora_adapter_metadata": json.dumps(flat, sort_keys=True)}


def to_kohya(modules: list[Resolved]) -> dict[str, torch.Tensor]:
    """kohya/A1111 SD1 names: lora_unet_<path>, lora_te_text_model_<path> (transformers 5 dropped text_model),
    with each module's alpha, so A1111 and ComfyUI apply the same scale we do."""
    out = {}
    for r in modules:
        flat = r.path.replace(".", "_")
        name = f"lora_unet_{flat}" if r.component == "unet" else f"lora_te_text_model_{flat}"
        out[f"{name}.lora_down.weight"] = r.module.down.contiguous()
        out[f"{name}.lora_up.weight"] = r.module.up.contiguous()
        alpha = r.module.alpha if r.module.alpha is not None else float(r.module.rank)
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def resolve_own(modules: list[LoraModule]) -> list[Resolved]:
    """Our own stored files name modules by dotted path already: no model needed to resolve them."""
    bad = [m.name for m in modules if m.name.startswith("lora_")]
    if bad:
        raise LibraryError(f"the stored LoRA has kohya names ({bad[0]!r}); re-import it")
    return [Resolved(m.component, m.name, m) for m in modules]


# ---- textual inversion ---------------------------------------------------------------------------------------

def parse_embedding(sd: dict[str, torch.Tensor]) -> tuple[str | None, torch.Tensor]:
    """(token named by the file or None, vectors [n, dim]) for diffusers {"<tok>": t} and A1111/kohya
    "emb_params" / "string_to_param" single-tensor files; SDXL's clip_l/clip_g pairs and others are refused."""
    if set(sd) == {"clip_l", "clip_g"}:
        raise LibraryError("0 of 2 layers matched: this is an SDXL embedding (clip_l + clip_g); it is for another "
                           "architecture")
    if len(sd) != 1:
        raise LibraryError(f"this file is neither a LoRA (no lora_down/lora_A keys) nor an embedding (one tensor): it "
                           f"holds {len(sd)} tensors such as {sorted(sd)[0]!r}. A full model file goes in the Model "
                           "tab, not the library")
    key, t = next(iter(sd.items()))
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or not t.is_floating_point():
        raise LibraryError(f"the embedding {key!r} has shape {tuple(t.shape)}; expected [vectors, width] floats")
    token = None if key in _EMBEDDING_KEYS or key.startswith("string_to_param") else key
    return token, t
