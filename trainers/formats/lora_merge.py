"""Merge several LoRAs into one, and bake LoRAs into a checkpoint saved by ComfyUI's own saver.

Methods, per patched layer (ΔWᵢ = scaleᵢ·upᵢ·downᵢ of input i, weight wᵢ):
- `concat`: the factors side by side (rank Σrᵢ); exactly Σ wᵢ·ΔWᵢ, what applying each LoRA with its weight
  gives. Layers where an input is not a plain LoRA (LoHa, LoKr, ...) are stored as their exact full delta.
- `svd`: Σ wᵢ·ΔWᵢ re-factored at `rank` (exact SVD through the thin factors).
- `ties`, `dare_linear`, `dare_ties`: peft's `merge_utils` on the full per-layer deltas, then SVD at `rank`
  (`rank` 0 keeps the full delta). This is what peft's `add_weighted_adapter` does for its `*_svd` types;
  we call the math directly because `add_weighted_adapter` needs a PeftModel injected into the network and,
  for its factor-wise types, the same rank in every input, no conv layers and no LoHa/LoKr.
DARE's random masks come from `seed` and the layer's name, so a merge is reproducible.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import comfy.sd
import torch
from peft.utils import merge_utils

from .files import write_new_file
from .kohya_lora import LoraStateDict
from .lora_convert import (
    KeySpace,
    Module,
    check_same_base,
    diff_module,
    full_delta,
    lora_module,
    output_metadata,
    resolve_lora,
    write_modules,
)
from .lora_svd import LayerReport, _from_svd, check_rank, max_layer_rank, svd_of_delta, svd_of_factors

MERGE_METHODS = ("concat", "svd", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def layer_seed(seed: int, target: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(target.encode())) % (2**63)


def merge_task_deltas(deltas: list[torch.Tensor], weights: list[float], method: str, *, density: float,
                      sign_method: str, seed: int) -> torch.Tensor:
    """peft's merge of full deltas (`ties`, `dare_linear`, `dare_ties`), DARE masks drawn from `seed`."""
    weight_tensor = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device)
    with torch.random.fork_rng(devices=[deltas[0].device] if deltas[0].device.type == "cuda" else []):
        torch.manual_seed(seed)
        if method == "ties":
            return merge_utils.ties(deltas, weight_tensor, density, sign_method)
        if method == "dare_linear":
            return merge_utils.dare_linear(deltas, weight_tensor, density)
        return merge_utils.dare_ties(deltas, weight_tensor, density, sign_method)


def _check_options(method, weights, rank, density, sign_method):
    if method not in MERGE_METHODS:
        raise ValueError(f"`method` must be one of {list(MERGE_METHODS)}, got {method!r}.")
    if not weights:
        raise ValueError("`loras` is empty: connect at least one LoRA.")
    if method in ("ties", "dare_linear", "dare_ties"):
        if not 0.0 < density <= 1.0:
            raise ValueError(f"`density` must be in (0, 1], got {density}.")
        if sign_method not in SIGN_METHODS:
            raise ValueError(f"`majority_sign` must be one of {list(SIGN_METHODS)}, got {sign_method!r}.")
    if method == "svd" and rank < 1:
        raise ValueError("`rank` must be at least 1 for the `svd` method (0 means full rank only for ties/dare).")


def merge_loras(loras: list[tuple[dict, float]], keys: KeySpace, *, method: str = "concat", rank: int = 16,
                density: float = 0.5, sign_method: str = "total", seed: int = 0, layout: str = "kohya"
                ) -> tuple[LoraStateDict, list[LayerReport]]:
    """Merge `(lora, weight)` pairs, all for the MODEL/CLIP of `keys`, into one LoRA in `layout`."""
    weights = [float(w) for _, w in loras]
    _check_options(method, weights, rank, density, sign_method)
    resolved = [resolve_lora(sd, keys, input_name=f"loras #{i}") for i, (sd, _) in enumerate(loras, 1)]
    check_same_base([r.metadata for r in resolved])
    targets = sorted(set().union(*(r.modules for r in resolved)))
    if method != "concat" and rank > 0:
        check_rank(rank, [keys.weight(t).shape for t in targets])
    modules: dict[str, Module] = {}
    reports: list[LayerReport] = []
    for target in targets:
        present = [(r.modules[target], w) for r, w in zip(resolved, weights) if target in r.modules]
        base_weight = keys.weight(target)
        part = present[0][0].part
        layer_rank = min(rank, max_layer_rank(base_weight.shape))
        if method in ("concat", "svd") and all(m.is_plain_lora for m, _ in present):
            ups, downs = [], []
            for module, weight in present:
                up, down, scale = module.factors()
                ups.append(up * (scale * weight))
                downs.append(down)
            up, down = torch.cat(ups, 1), torch.cat(downs, 0)
            if method == "concat":
                modules[target] = lora_module(up, down, target, part)
                continue
            new, report = _from_svd(*svd_of_factors(up, down), target, part, down.shape[0], layer_rank, "fixed", 1.0)
        else:
            if method in ("concat", "svd"):
                merged = sum(full_delta(m, base_weight) * w for m, w in present)
            else:
                deltas = [full_delta(r.modules[target], base_weight) if target in r.modules else None
                          for r in resolved]
                # Inputs that do not patch this layer contribute a zero task vector, as in peft.
                zero = torch.zeros_like(next(d for d in deltas if d is not None))
                deltas = [zero if d is None else d for d in deltas]
                merged = merge_task_deltas(deltas, weights, method, density=density, sign_method=sign_method,
                                           seed=layer_seed(seed, target))
            if method == "concat" or rank == 0:
                modules[target] = diff_module(merged, target, part)
                continue
            new, report = _from_svd(*svd_of_delta(merged), target, part, None, layer_rank, "fixed", 1.0)
        reports.append(report)
        if new is not None:
            modules[target] = new
    extra = {"merge": {"method": method, "weights": weights, "rank": rank, "density": density,
                       "majority_sign": sign_method, "seed": seed,
                       "sources": [r.metadata.get("ss_output_name", f"#{i}") for i, r in enumerate(resolved, 1)]}}
    meta = output_metadata([r.metadata for r in resolved], modules, extra)
    return LoraStateDict(write_modules(modules, keys, layout, what="Merge"), meta), reports


def bake_loras(model, clip, vae, loras: list[tuple[dict, float]], folder: str | Path, stem: str,
               metadata: dict[str, str] | None = None):
    """Apply each LoRA through ComfyUI's own loader, then save MODEL+CLIP+VAE with `comfy.sd.save_checkpoint`.

    Returns (path, baked MODEL, baked CLIP); the inputs are not changed (the loader works on clones).
    """
    if not loras:
        raise ValueError("`loras` is empty: connect at least one LoRA to bake.")
    keys = KeySpace(model, clip)
    resolved = [resolve_lora(sd, keys, input_name=f"loras #{index}") for index, (sd, _) in enumerate(loras, 1)]
    check_same_base([r.metadata for r in resolved])
    baked_model, baked_clip = model, clip
    for lora, (_, weight) in zip(resolved, loras):
        # Under ComfyUI's own names: we also read names the stock loader skips (plain peft `attn1.to_q`).
        tensors = write_modules(lora.modules, keys, "comfyui", what="Bake")
        baked_model, baked_clip = comfy.sd.load_lora_for_models(baked_model, baked_clip, tensors, weight, weight)
    meta = {"modelspec.sai_model_spec": "1.0.0", **(metadata or {})}
    path = write_new_file(folder, stem, ".safetensors",
                          lambda tmp: comfy.sd.save_checkpoint(str(tmp), baked_model, baked_clip, vae, metadata=meta))
    return path, baked_model, baked_clip
