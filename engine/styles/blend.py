"""Blending styles: the live blend (weighted LoRA sum) and baking a blend into a new style.

A LoRA changes a layer's weight by dW = (alpha/r) B A (Hu et al. 2021, "LoRA", eq. 3; rsLoRA, Kalajdzievski
2023, uses alpha/sqrt(r)). A blend of styles i with weights w_i is dW = sum_i w_i (alpha_i/r_i) B_i A_i: what
peft computes live when `set_adapters(names, adapter_weights=w)` runs the adapters side by side.

Baking writes that sum as one LoRA:
- exact: concatenate the ranks. B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (columns), A = [A_1; A_2; ...] (rows), with
  s_i = alpha_i/r_i folded into B and the new alpha equal to the new rank (scale 1). Then B A = sum_i w_i s_i B_i A_i
  exactly; the rank is the sum of the ranks.
- svd: the best rank-k approximation of each layer's summed dW in the Frobenius norm, from its truncated SVD
  (Eckart & Young 1936): B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T. The relative error over all layers,
  sqrt(sum of the discarded S_j^2) / ||dW||_F, is reported.
Convolution LoRA (LoCon: A is a k x k conv [r, in, kh, kw], B a 1x1 conv [out, r, 1, 1]) is the same algebra on
A flattened to [r, in*kh*kw]; the baked A is reshaped back into a kernel.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.blend_config import BakeRequest, BlendRequest, BlendStripRequest  # noqa: F401 - re-exported
from engine.core.config import ConfigError
from engine.models.safety import check_model_file
from engine.styles.store import StyleInfo, publish

__all__ = ["BakeRequest", "BlendRequest", "BlendStripRequest", "LoraFile", "bake", "bake_style", "check_same_base",
           "read_lora"]
COMPONENTS = ("unet", "text_encoder")


@dataclass
class LoraFile:
    """A LoRA file as factors: per component, module -> (A, B, scale), plus each component's peft config."""

    modules: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]
    configs: dict[str, dict]


def check_same_base(styles: list[StyleInfo], fingerprint: str, model_name: str = "the loaded model") -> None:
    """Every style applied together (or blended) must have been made on the loaded base model."""
    from engine.styles.records import base_model_mismatch

    for s in styles:
        mismatch = base_model_mismatch(s, fingerprint, model_name)
        if mismatch:
            raise ConfigError(f"style {s.name!r} cannot be used here: {mismatch}. Load that model first "
                              f"(fingerprint {s.base_model_fingerprint[:10]}), or pick styles of the loaded one")


def read_lora(path: Path) -> LoraFile:
    """Read a LoRA saved as our trainer saves it (PEFT keys with a component prefix, peft config in metadata)."""
    from safetensors import safe_open

    check_model_file(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    flat = json.loads(meta.get("lora_adapter_metadata", "{}"))
    configs = {c: {k[len(c) + 1:]: v for k, v in flat.items() if k.startswith(c + ".")} for c in COMPONENTS}
    modules: dict[str, dict] = {c: {} for c in COMPONENTS}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ConfigError(f"{path.name}: cannot blend key {key!r} (only plain LoRA A/B weights blend; "
                                  "DoRA and LoRA biases do not)")
            continue
        comp, module = key[: -len(".lora_A.weight")].split(".", 1)
        if comp not in COMPONENTS:
            raise ConfigError(f"{path.name}: unknown component {comp!r} in key {key!r}")
        b = tensors[f"{comp}.{module}.lora_B.weight"]
        modules[comp][module] = (a, b, _scale(configs[comp], module, a.shape[0]))
    for comp, cfg in configs.items():
        if cfg.get("use_dora"):
            raise ConfigError(f"{path.name}: DoRA adapters cannot be blended")
    return LoraFile(modules, configs)


def _scale(cfg: dict, module: str, r: int) -> float:
    """alpha/r for this module (alpha_pattern overrides lora_alpha; no metadata means alpha = r, as the loader)."""
    alpha = cfg.get("lora_alpha", r)
    for pattern, a in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
            alpha = a
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B A as an [out, in*kh*kw] matrix (a conv LoRA's 1x1 B times its k x k A, flattened)."""
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


def bake(loras: list[LoraFile], weights: list[tuple[float, float]], method: str = "exact", rank: int = 0):
    """Blend factors into one LoRA: (state dicts per component with PEFT keys, configs per component, rank,
    relative Frobenius error). `weights[i]` = (UNet weight, text-encoder weight) of lora i."""
    layers, configs, err2, norm2, out_rank = {}, {}, 0.0, 0.0, 0
    for ci, comp in enumerate(COMPONENTS):
        names = sorted(set().union(*(lo.modules[comp] for lo in loras)))
        if not names:
            continue
        w = [wt[ci] for wt in weights]
        if method == "exact":
            # One block of rows per source LoRA, each as wide as that LoRA's largest rank in this component
            # (zero-padded), so the baked LoRA has one rank everywhere.
            widths = [max((a.shape[0] for a, _, _ in lo.modules[comp].values()), default=0) for lo in loras]
            r_out = sum(widths)
        else:
            r_out = rank
        sd = {}
        for name in names:
            parts = [lo.modules[comp].get(name) for lo in loras]
            a0, b0, _ = next(p for p in parts if p is not None)
            kernel = tuple(a0.shape[1:])  # (in,) or (in, kh, kw)
            out_dim = b0.shape[0]
            if method == "exact":
                a_new = torch.zeros((r_out, *kernel))
                b_new = torch.zeros((out_dim, r_out, *b0.shape[2:]))
                at = 0
                for p, wi, width in zip(parts, w, widths):
                    if p is not None:
                        a, b, s = p
                        a_new[at:at + a.shape[0]] = a
                        b_new[:, at:at + a.shape[0]] = (wi * s) * b
                    at += width
            else:
                dw = sum(wi * s * _delta(a, b) for (a, b, s), wi in ((p, wi) for p, wi in zip(parts, w) if p))
                u, sv, vh = torch.linalg.svd(dw.double(), full_matrices=False)
                k = min(r_out, sv.shape[0])
                err2 += float((sv[k:] ** 2).sum())  # Eckart-Young: the discarded singular values are the error
                norm2 += float((sv ** 2).sum())
                root = sv[:k].sqrt()
                a_new = torch.zeros((r_out, *kernel))
                b_new = torch.zeros((out_dim, r_out, *b0.shape[2:]))
                a_new[:k] = (root[:, None] * vh[:k]).float().reshape(k, *kernel)
                b_new[:, :k] = (u[:, :k] * root).float().reshape(out_dim, k, *b0.shape[2:])
            sd[f"{name}.lora_A.weight"] = a_new.contiguous()
            sd[f"{name}.lora_B.weight"] = b_new.contiguous()
        cfg = dict(next((lo.configs[comp] for lo in loras if lo.configs[comp]), {}))  # dropout, bias, ...
        targets = sorted(set().union(*(set(lo.configs[comp].get("target_modules") or []) for lo in loras)))
        cfg.update(r=r_out, lora_alpha=r_out, rank_pattern={}, alpha_pattern={}, use_rslora=False, use_dora=False,
                   init_lora_weights=True, target_modules=targets or sorted({n.rsplit(".", 1)[-1] for n in names}))
        layers[comp], configs[comp] = sd, cfg
        out_rank = max(out_rank, r_out)
    rel = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
    return layers, configs, out_rank, rel


def bake_style(data_dir: Path, req: BakeRequest, styles: list[StyleInfo]):
    """Bake `req.blend` of `styles` (in the request's order) into a new published style; returns
    (StyleInfo, rank, relative error)."""
    from diffusers import StableDiffusionPipeline

    weighted = req.blend.weighted
    loras = [read_lora(s.lora) for s in styles]
    layers, configs, rank, rel = bake(loras, [(wu, wt) for _, wu, wt in weighted], req.method, req.rank)
    first = json.loads((styles[0].folder / "style.json").read_text("utf-8"))
    triggers = list(dict.fromkeys(s.trigger_token for s in styles))
    sources = [{"id": s.id, "version": s.version, "name": s.name, "weight": wu, "text_encoder_weight": wt}
               for s, (_, wu, wt) in zip(styles, weighted)]
    what = " + ".join(f"{s.name} v{s.version} ({wu:g})" for s, (_, wu, _) in zip(styles, weighted))
    style = {"schema_version": 1, "trigger_token": " ".join(triggers),
             "preset": styles[0].preset if len({s.preset for s in styles}) == 1 else "style",
             "base_model": first.get("base_model", ""), "base_model_fingerprint": styles[0].base_model_fingerprint,
             "prediction_type": first.get("prediction_type", ""), "lora_file": "lora.safetensors",
             "recommended_strength": 1.0,
             "training_config": {"class_prompt": first.get("training_config", {}).get("class_prompt", ""),
                                 "lora_rank": rank, "lora_alpha": rank},
             "provenance": {"kind": "blend", "description": f"blend of {what}", "method": req.method,
                            "rank": rank, "relative_error": rel, "sources": sources},
             "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    tmp = Path(tempfile.mkdtemp(prefix=".bake-", dir=data_dir))
    try:
        kw = {f"{c}_lora_layers": layers[c] for c in layers}
        kw.update({f"{c}_lora_adapter_metadata": configs[c] for c in configs})
        StableDiffusionPipeline.save_lora_weights(tmp, weight_name="lora.safetensors", **kw)
        (tmp / "style.json").write_text(json.dumps(style, indent=1), "utf-8")
        info = publish(data_dir, req.name.strip(), tmp / "lora.safetensors", tmp / "style.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info, rank, rel
