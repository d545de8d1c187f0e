"""SVD of LoRA deltas: resize a LoRA's rank, and extract a LoRA from a fine-tuned model and its base.

Rank is chosen per layer either as a fixed `rank` or as the smallest rank that keeps `energy` of the
delta's squared Frobenius norm (kohya's `sv_fro`), capped at `rank`. Factors are split evenly
(`U·√S`, `√S·Vᵀ`) so fp16 files keep the precision of both halves; alpha equals the new rank (scale 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.lora
import comfy.model_management
import torch

from . import kohya_lora
from .kohya_lora import LoraStateDict
from .lora_convert import KeySpace, Module, full_delta, lora_module, output_metadata, resolve_lora, write_modules

RANK_MODES = ("fixed", "energy")


@dataclass
class LayerReport:
    target: str
    old_rank: int | None
    new_rank: int
    kept_energy: float

    def line(self) -> str:
        old = "full" if self.old_rank is None else str(self.old_rank)
        return f"{self.target}: rank {old} -> {self.new_rank}, kept energy {100 * self.kept_energy:.4f}%"


def max_layer_rank(shape) -> int:
    return min(int(shape[0]), int(torch.Size(shape[1:]).numel()))


def check_rank(rank: int, shapes, *, input_name: str = "rank") -> None:
    """Refuse a rank no layer can hold (per layer it is capped at min(out, in·k·k))."""
    largest = max((max_layer_rank(s) for s in shapes), default=0)
    if rank < 1:
        raise ValueError(f"`{input_name}` must be at least 1, got {rank}.")
    if largest and rank > largest:
        raise ValueError(f"`{input_name}`={rank} is above the size of every layer (the largest layer allows rank "
                         f"{largest}). Choose a rank of at most {largest}.")


def choose_rank(singular_values: torch.Tensor, rank: int, mode: str, energy: float) -> tuple[int, float]:
    """(rank to keep, fraction of squared singular values kept)."""
    if mode not in RANK_MODES:
        raise ValueError(f"`rank_mode` must be one of {list(RANK_MODES)}, got {mode!r}.")
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0, 1.0
    cumulative = torch.cumsum(power, 0) / total
    if mode == "energy":
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"`energy` must be in (0, 1], got {energy}.")
        # Small tolerance: a threshold of exactly 1.0 must not fail on float rounding.
        needed = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64,
                                                                  device=cumulative.device))) + 1
        keep = min(needed, rank)
    else:
        keep = rank
    keep = max(1, min(keep, singular_values.numel()))
    return keep, float(cumulative[keep - 1])


def svd_of_factors(up: torch.Tensor, down: torch.Tensor):
    """Exact SVD of up @ down ([o, k] @ [k, i]) through QR of the thin factors: O(k³) instead of O(o·i·min)."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u_core, s, vh_core @ q_down.T


def svd_of_delta(delta: torch.Tensor):
    return torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)


def low_rank(u, s, vh, rank: int, mode: str, energy: float):
    """Split the kept part of an SVD into balanced factors; returns (up, down, kept_energy) or None for a zero delta."""
    keep, kept = choose_rank(s, rank, mode, energy)
    if keep == 0:
        return None
    root = s[:keep].sqrt()
    return (u[:, :keep] * root).float(), (root[:, None] * vh[:keep]).float(), kept


def _device():
    return comfy.model_management.get_torch_device()


def compress_module(module: Module, base_weight: torch.Tensor, rank: int, mode: str, energy: float,
                    scale: float = 1.0):
    """A plain LoRA Module at the chosen rank for `scale`·ΔW of `module`, plus its LayerReport."""
    if module.is_plain_lora:
        up, down, module_scale = module.factors()
        u, s, vh = svd_of_factors(up.to(_device()) * (module_scale * scale), down.to(_device()))
        old_rank = down.shape[0]
    else:
        u, s, vh = svd_of_delta(full_delta(module, base_weight) * scale)
        old_rank = None
    return _from_svd(u, s, vh, module.target, module.part, old_rank, rank, mode, energy)


def _from_svd(u, s, vh, target, part, old_rank, rank, mode, energy):
    result = low_rank(u, s, vh, rank, mode, energy)
    if result is None:
        return None, LayerReport(target, old_rank, 0, 1.0)
    up, down, kept = result
    return lora_module(up, down, target, part), LayerReport(target, old_rank, down.shape[0], kept)


def resize_lora(lora, keys: KeySpace, *, rank: int, rank_mode: str = "fixed", energy: float = 0.99,
                layout: str = "kohya", input_name: str = "lora") -> tuple[LoraStateDict, list[LayerReport]]:
    """Re-factor every module of `lora` at a new rank (any adapter type becomes a plain LoRA)."""
    resolved = resolve_lora(lora, keys, input_name=input_name)
    check_rank(rank, [keys.weight(t).shape for t in resolved.modules])
    modules, reports = {}, []
    for target, module in sorted(resolved.modules.items()):
        new, report = compress_module(module, keys.weight(target),
                                      min(rank, max_layer_rank(keys.weight(target).shape)), rank_mode, energy)
        reports.append(report)
        if new is not None:
            modules[target] = new
    meta = output_metadata([resolved.metadata], modules, {"resize": {"rank": rank, "rank_mode": rank_mode,
                                                                      "energy": energy}})
    return LoraStateDict(write_modules(modules, keys, layout, what="Resize"), meta), reports


# -- extraction ------------------------------------------------------------------------------------
def effective_weight(key_patches: dict, key: str) -> torch.Tensor:
    """A weight with its patches applied (fp32), from `ModelPatcher.get_key_patches()`: nothing is loaded or changed."""
    entry = key_patches[key]
    weight, convert = entry[0]
    weight = convert(weight.detach().to(_device(), torch.float32, copy=True), inplace=True)
    return comfy.lora.calculate_weight(entry[1:], weight, key) if len(entry) > 1 else weight


def _same_patches(a: list, b: list) -> bool:
    """Same stored weight and the very same patch entries (ModelPatcher.clone copies the lists, not the entries)."""
    return len(a) == len(b) and a[0][0] is b[0][0] and all(x is y for x, y in zip(a[1:], b[1:]))


def extract_lora(base_model, tuned_model, base_clip=None, tuned_clip=None, *, rank: int, rank_mode: str = "fixed",
                 energy: float = 0.99, layout: str = "kohya", min_change: float = 0.0
                 ) -> tuple[LoraStateDict, list[LayerReport]]:
    """LoRA of tuned − base for every linear/conv layer (UNet and text encoders) that changed.

    A layer counts as changed when max|ΔW| > `min_change`·max|W|; 0 keeps every layer whose weights differ.
    """
    if (base_clip is None) != (tuned_clip is None):
        raise ValueError("`base_clip` and `tuned_clip` go together: connect both to extract the text encoder, or neither.")
    keys = KeySpace(base_model, base_clip)
    if base_model.model.state_dict().keys() != tuned_model.model.state_dict().keys():
        raise ValueError("`tuned_model` and `base_model` are different architectures: extract from a fine-tune of "
                         "the base model.")
    layers = []  # (patcher pair, targets)
    unet_targets = [t for t in keys.names(layout) if t in keys.unet_sd and keys.unet_sd[t].ndim >= 2]
    layers.append((base_model, tuned_model, unet_targets))
    if base_clip is not None:
        if base_clip.cond_stage_model.state_dict().keys() != tuned_clip.cond_stage_model.state_dict().keys():
            raise ValueError("`tuned_clip` and `base_clip` are different text encoders.")
        clip_targets = [t for t in keys.names(layout) if t in keys.clip_sd and keys.clip_sd[t].ndim >= 2]
        layers.append((base_clip.patcher, tuned_clip.patcher, clip_targets))
    check_rank(rank, [keys.weight(t).shape for _, _, ts in layers for t in ts])
    modules, reports = {}, []
    for base, tuned, targets in layers:
        base_patches, tuned_patches = base.get_key_patches(), tuned.get_key_patches()
        for target in sorted(targets):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if _same_patches(base_patches[target], tuned_patches[target]):
                continue  # clones of one model with the same patches on this layer: no change, no copy
            w_base = effective_weight(base_patches, target)
            delta = effective_weight(tuned_patches, target) - w_base
            if float(delta.abs().max()) <= min_change * float(w_base.abs().max()):
                continue
            u, s, vh = svd_of_delta(delta)
            new, report = _from_svd(u, s, vh, target, keys.part_of(target), None,
                                    min(rank, max_layer_rank(delta.shape)), rank_mode, energy)
            reports.append(report)
            if new is not None:
                modules[target] = new
    if not modules:
        raise ValueError("`tuned_model` does not differ from `base_model` in any layer: nothing to extract.")
    family = kohya_lora.base_model_family(base_model)
    source = {"ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family, family)}
    meta = output_metadata([source], modules, {"extract": {"rank": rank, "rank_mode": rank_mode, "energy": energy}})
    return LoraStateDict(write_modules(modules, keys, layout, what="Extract"), meta), reports


def report_text(title: str, reports: list[LayerReport]) -> str:
    if not reports:
        return f"{title}: no layers"
    kept = [r.kept_energy for r in reports]
    head = (f"{title}: {len(reports)} layers, kept energy min {100 * min(kept):.4f}% / mean "
            f"{100 * sum(kept) / len(kept):.4f}%")
    return "\n".join([head, *(r.line() for r in reports)])
