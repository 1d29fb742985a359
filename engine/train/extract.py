"""A LoRA from a fully fine-tuned model: the truncated SVD of each layer's weight change.

For a Linear or Conv2d layer, ΔW = W_tuned − W_base (a conv kernel [out, in, kh, kw] read as the matrix
[out, in·kh·kw]) has the SVD U S Vᵀ. Keeping the r largest singular values gives ΔW ≈ U_r S_r V_rᵀ, split
evenly as up B = U_r S_r^½ ([out, r], a 1×1 conv for convolutions) and down A = S_r^½ V_rᵀ ([r, in] or
[r, in, kh, kw]), with alpha = r so the LoRA's scale is 1 and B·A is the approximation itself. By the
Eckart–Young–Mirsky theorem (Eckart & Young 1936) this is the best rank-r approximation in the Frobenius
norm, and its error is exactly ‖ΔW − B A‖_F = sqrt(Σ_{i>r} s_i²). kohya's sd-scripts
(networks/extract_lora_from_models.py) does the same.

What a LoRA cannot hold (biases, norms, embeddings, grouped convolutions) is reported, not dropped silently.
Pure functions on tensors and modules: the caller (engine/train/full.py) loads and saves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerLora:
    """One layer's extracted LoRA and how well it approximates the layer's change."""

    component: str  # "unet" | "text_encoder"
    path: str  # the module's dotted path in its model
    down: torch.Tensor  # A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # B: [out, r] or [out, r, 1, 1]
    delta_norm: float  # ‖ΔW‖_F
    error: float  # ‖ΔW − B A‖_F, measured

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def rel_error(self) -> float:
        return self.error / self.delta_norm if self.delta_norm > 0 else 0.0


@dataclass(frozen=True)
class Extraction:
    layers: tuple[LayerLora, ...]
    # Parameters that changed but that a LoRA cannot carry: (component.name, ‖Δ‖_F).
    unrepresented: tuple[tuple[str, float], ...]

    @property
    def rel_error(self) -> float:
        """sqrt(Σ ‖ΔW − BA‖²) / sqrt(Σ ‖ΔW‖²) over the extracted layers."""
        total = math.sqrt(sum(x.delta_norm ** 2 for x in self.layers))
        return math.sqrt(sum(x.error ** 2 for x in self.layers)) / total if total > 0 else 0.0

    @property
    def unrepresented_share(self) -> float:
        """The part of the whole change (all parameters, in Frobenius norm) that is in no LoRA layer."""
        rest = sum(n ** 2 for _, n in self.unrepresented)
        total = rest + sum(x.delta_norm ** 2 for x in self.layers)
        return math.sqrt(rest / total) if total > 0 else 0.0

    def report(self) -> dict:
        """JSON for style.json and the log: overall numbers and every layer's rank and relative error."""
        worst = sorted(self.unrepresented, key=lambda t: -t[1])[:10]
        return {"layers": len(self.layers), "rel_error": round(self.rel_error, 6),
                "unrepresented_share": round(self.unrepresented_share, 6),
                "ranks": {f"{x.component}.{x.path}": x.rank for x in self.layers},
                "layer_rel_error": {f"{x.component}.{x.path}": round(x.rel_error, 6) for x in self.layers},
                "largest_unrepresented": {k: round(v, 6) for k, v in worst}}


def choose_rank(s: torch.Tensor, max_rank: int, energy: float = 0.0) -> int:
    """How many singular values to keep: `max_rank`, or with 0 < energy ≤ 1 the fewest whose squares hold that
    fraction of Σ s_i² (= ‖ΔW‖_F²), never more than max_rank and never fewer than 1."""
    if max_rank < 1:
        raise ValueError(f"rank must be at least 1, got {max_rank}")
    r = min(max_rank, s.numel())
    if energy > 0:
        e = (s.double() ** 2).cumsum(0)
        # the first index whose cumulative share reaches `energy` (a tiny slack for float rounding at energy=1)
        r = min(r, int(torch.searchsorted(e / e[-1], torch.tensor([energy - 1e-12], dtype=e.dtype))[0]) + 1)
    return max(1, r)


def low_rank(delta: torch.Tensor, max_rank: int, energy: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up B, down A, ‖ΔW − B A‖_F) for a Linear [out, in] or Conv2d [out, in, kh, kw] weight change."""
    mat = delta.reshape(delta.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = choose_rank(s, max_rank, energy)
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    error = float(torch.linalg.matrix_norm(mat - up @ down))
    if delta.ndim == 4:
        up, down = up[:, :, None, None], down.reshape(r, *delta.shape[1:])
    return up.contiguous(), down.contiguous(), error


def _lora_layer(mod: torch.nn.Module) -> bool:
    """Layers a PEFT LoRA applies to exactly: Linear, and Conv2d without groups (A copies kernel/stride/padding)."""
    if isinstance(mod, torch.nn.Linear):
        return True
    return isinstance(mod, torch.nn.Conv2d) and mod.groups == 1


def extract_module(component: str, base: torch.nn.Module, tuned: torch.nn.Module, *, rank: int,
                   energy: float = 0.0, device: str | torch.device = "cpu") -> Extraction:
    """Extract every changed Linear/Conv2d weight of `tuned` against `base` (same architecture); every other
    changed parameter (bias, norm, embedding, ...) is listed with its ‖Δ‖_F as unrepresented."""
    base_params = dict(base.named_parameters())
    layers, covered = [], set()
    for path, mod in tuned.named_modules():
        if not _lora_layer(mod):
            continue
        key = f"{path}.weight"
        covered.add(key)
        delta = mod.weight.detach().to(device, torch.float32) - base_params[key].detach().to(device, torch.float32)
        norm = float(torch.linalg.vector_norm(delta))
        if norm == 0.0:
            continue  # unchanged (e.g. a text encoder that did not train)
        up, down, error = low_rank(delta, rank, energy)
        layers.append(LayerLora(component, path, down.cpu(), up.cpu(), norm, error))
    other = []
    for name, p in tuned.named_parameters():
        if name in covered:
            continue
        norm = float(torch.linalg.vector_norm(p.detach().float().cpu() - base_params[name].detach().float().cpu()))
        if norm > 0:
            other.append((f"{component}.{name}", norm))
    return Extraction(tuple(layers), tuple(other))


def merge(*parts: Extraction) -> Extraction:
    return Extraction(tuple(x for p in parts for x in p.layers), tuple(x for p in parts for x in p.unrepresented))
