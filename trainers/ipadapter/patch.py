"""Decoupled cross-attention on a MODEL clone: out = attn(q, K_text, V_text) + weight * attn(q, K_img, V_img).

Installed with ComfyUI's `attn2` replace patches (one per cross-attention), so weight patches (LoRA),
ControlNet and other model patches keep working; an existing replace patch on a layer is chained.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention

from .adapter import IPAdapterModel, IPLayer


@dataclass
class CrossAttentionSite:
    key: tuple  # (block name, block id, transformer index), as ComfyUI keys attn2 replace patches
    attn: torch.nn.Module  # the CrossAttention module (shared with every clone; only read)


def cross_attention_sites(diffusion_model: torch.nn.Module) -> list[CrossAttentionSite]:
    """Every cross-attention of a UNet in the official numbering order: input, output, then middle blocks.

    (diffusers registers `down_blocks`, `up_blocks`, then `mid_block`; the official `ip_adapter.N`
    numbers follow that order.)
    """
    sites = []
    groups = (("input", getattr(diffusion_model, "input_blocks", None)),
              ("output", getattr(diffusion_model, "output_blocks", None)),
              ("middle", [diffusion_model.middle_block] if getattr(diffusion_model, "middle_block", None) is not None else None))
    for name, blocks in groups:
        for block_id, block in enumerate(blocks or []):
            for module in block:
                if isinstance(module, SpatialTransformer):
                    for index, transformer in enumerate(module.transformer_blocks):
                        if getattr(transformer, "attn2", None) is not None:
                            sites.append(CrossAttentionSite((name, block_id, index), transformer.attn2))
    return sites


TRAIN_TOKENS = "personalize_ip_adapter_tokens"  # transformer_options entry: {id(condition): tokens [B, T, C]}


@dataclass
class ImageCondition:
    """What every layer's patch reads: image tokens for cond/uncond, weight and active sigma range.

    During training, per-batch tokens (with gradients) ride in `transformer_options[TRAIN_TOKENS]` of that one
    model call, so a gradient-checkpoint recomputation sees them and any other call (e.g. a preview) does not.
    """

    cond: torch.Tensor | None = None  # [1, tokens, C]
    uncond: torch.Tensor | None = None
    weight: float = 1.0
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    _on_device: dict = field(default_factory=dict)

    def training_tokens(self, extra_options: dict) -> torch.Tensor | None:
        return extra_options.get(TRAIN_TOKENS, {}).get(id(self))

    def active(self, extra_options: dict) -> bool:
        if self.weight == 0:
            return False
        sigmas = extra_options.get("sigmas")
        if sigmas is None or self.training_tokens(extra_options) is not None:
            return True
        sigma = float(sigmas.detach().flatten()[0])
        return self.sigma_end <= sigma <= self.sigma_start

    def tokens_for(self, q: torch.Tensor, extra_options: dict) -> torch.Tensor | None:
        """Tokens per batch row, or None when there is no image for this call (e.g. a preview while training)."""
        train_tokens = self.training_tokens(extra_options)
        if train_tokens is not None and train_tokens.shape[0] == q.shape[0]:
            return train_tokens
        if self.cond is None:
            return None
        key = (q.device, q.dtype)
        if key not in self._on_device:
            self._on_device = {key: (self.cond.to(q.device, q.dtype), self.uncond.to(q.device, q.dtype))}
        cond, uncond = self._on_device[key]
        chunks = extra_options.get("cond_or_uncond") or [0]
        per_chunk = q.shape[0] // len(chunks)
        return torch.cat([(uncond if c == 1 else cond).expand(per_chunk, -1, -1) for c in chunks])


class IPAdapterAttention:
    """The attn2 replace callable of one layer."""

    def __init__(self, layer: IPLayer, condition: ImageCondition, previous=None):
        self.layer, self.condition, self.previous = layer, condition, previous

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                      transformer_options=extra_options)
        if not self.condition.active(extra_options):
            return out
        tokens = self.condition.tokens_for(q, extra_options)
        if tokens is None:
            return out
        weight_k, weight_v = self.layer.to_k_ip.weight, self.layer.to_v_ip.weight
        ip_k = torch.nn.functional.linear(tokens.to(weight_k.dtype), weight_k).to(q.dtype)
        ip_v = torch.nn.functional.linear(tokens.to(weight_v.dtype), weight_v).to(q.dtype)
        ip_out = optimized_attention(q, ip_k, ip_v, heads, attn_precision=extra_options.get("attn_precision"),
                                     transformer_options=extra_options)
        return out + ip_out * self.condition.weight

    def to(self, device_or_dtype):
        # ComfyUI also calls this with the model's dtype; weights keep theirs (trainable fp32), cast per call.
        if not isinstance(device_or_dtype, torch.dtype) and self.layer.to_k_ip.weight.device != torch.device(device_or_dtype):
            self.layer.to(device_or_dtype)
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous.to(device_or_dtype)
        return self


def check_compatible(adapter: IPAdapterModel, sites: list[CrossAttentionSite]) -> None:
    """Say clearly when an adapter was made for another base model."""
    spec = adapter.spec
    if not sites:
        raise ValueError("`model` has no cross-attention layers (not a UNet of SD1.x/SD2.x/SDXL): an IP-Adapter cannot "
                         "be applied to it.")
    context = sites[0].attn.to_k.in_features
    if context != spec.cross_dim or len(sites) != len(spec.inner_dims):
        model_family = _family(context)
        raise ValueError(f"`ipadapter` was made for {spec.family} ({len(spec.inner_dims)} cross-attention layers, "
                         f"context width {spec.cross_dim}) but `model` is {model_family} ({len(sites)} cross-attention "
                         f"layers, context width {context}): load an IP-Adapter for this base model.")
    for i, (site, inner) in enumerate(zip(sites, spec.inner_dims)):
        if site.attn.to_k.out_features != inner:
            raise ValueError(f"`ipadapter` layer {2 * i + 1} has K/V width {inner} but the model's cross-attention "
                             f"{site.key} has {site.attn.to_k.out_features}: the adapter belongs to another base model.")


def _family(context: int) -> str:
    from .adapter import FAMILIES
    return FAMILIES.get(context, f"a model with context width {context}")


def install(model_patcher, adapter: IPAdapterModel, condition: ImageCondition) -> None:
    """Set one attn2 replace patch per cross-attention on `model_patcher` (a clone the caller owns)."""
    sites = cross_attention_sites(model_patcher.model.diffusion_model)
    check_compatible(adapter, sites)
    existing = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for site, layer in zip(sites, adapter.layers()):
        previous = existing.get(site.key) or existing.get(site.key[:2])
        model_patcher.set_model_attn2_replace(IPAdapterAttention(layer, condition, previous), *site.key)
