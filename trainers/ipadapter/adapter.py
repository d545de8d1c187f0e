"""An IP-Adapter in the official layout: `image_proj.*` (projection) + `ip_adapter.N.to_k_ip/to_v_ip`.

`N` counts every attention processor of the diffusers UNet (self- and cross-attention in turn), so the
cross-attention layers, which alone carry weights, are the odd numbers 1, 3, 5, ...
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from .projection import ImageProjModel, Resampler

Variant = Literal["base", "plus"]
FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}  # by context (text-encoder) width
_LAYER_KEY = re.compile(r"^ip_adapter\.(\d+)\.to_([kv])_ip\.weight$")


@dataclass(frozen=True)
class AdapterSpec:
    """Shape of an adapter, as read from its weights (or chosen for training)."""

    variant: Variant
    embed_dim: int  # width of the CLIP-Vision feature it reads (pooled embeds; plus: hidden states)
    cross_dim: int  # context width of the base model's cross-attention (768 SD1.x, 2048 SDXL)
    tokens: int  # image tokens added to every cross-attention
    inner_dims: tuple[int, ...]  # K/V width of each cross-attention layer, in order
    resampler_dim: int = 0  # plus only: the Resampler's width, depth and heads
    depth: int = 0
    heads: int = 0
    dim_head: int = 64
    ff_mult: int = 4

    @property
    def family(self) -> str:
        return FAMILIES.get(self.cross_dim, f"context width {self.cross_dim}")

    @property
    def clip_vision_output(self) -> str:
        """The CLIP_VISION_OUTPUT field this adapter reads."""
        return "image_embeds" if self.variant == "base" else "penultimate_hidden_states"

    def to_dict(self) -> dict:
        return {**asdict(self), "inner_dims": list(self.inner_dims)}


class IPLayer(nn.Module):
    """The new K/V projections of one cross-attention (image tokens -> keys and values)."""

    def __init__(self, cross_dim: int, inner_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, inner_dim, bias=False)


class IPAdapterModel(nn.Module):
    """Projection + per-layer K/V; `state_dict()` is the official flat layout."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        if spec.variant == "base":
            self.image_proj = ImageProjModel(spec.embed_dim, spec.cross_dim, spec.tokens)
        else:
            self.image_proj = Resampler(spec.resampler_dim, spec.depth, spec.dim_head, spec.heads, spec.tokens,
                                        spec.embed_dim, spec.cross_dim, spec.ff_mult)
        self.ip_adapter = nn.ModuleDict({str(2 * i + 1): IPLayer(spec.cross_dim, inner)
                                         for i, inner in enumerate(spec.inner_dims)})

    def layers(self) -> list[IPLayer]:
        """The K/V layers in cross-attention order."""
        return [self.ip_adapter[str(2 * i + 1)] for i in range(len(self.spec.inner_dims))]

    def image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP-Vision features (pooled [B, D] or hidden [B, P, D]) -> image tokens [B, tokens, cross_dim]."""
        return self.image_proj(features)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> IPAdapterModel:
        model = cls(spec_from_state_dict(state))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model


def spec_from_state_dict(state: dict[str, torch.Tensor]) -> AdapterSpec:
    """Detect variant, CLIP-Vision width, context width and tokens from an official-layout state dict."""
    numbers = sorted({int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))})
    if not numbers or not any(k.startswith("image_proj.") for k in state):
        raise ValueError("this file is not an IP-Adapter: it has no `image_proj.*` and `ip_adapter.N.to_k_ip` weights "
                         "(the official layout of ip-adapter_sd15.safetensors).")
    if numbers != list(range(1, 2 * len(numbers), 2)):
        raise ValueError(f"this IP-Adapter's layers are numbered {numbers[:6]}...; the official layout numbers them "
                         "1, 3, 5, ... without gaps.")
    inner_dims = tuple(int(state[f"ip_adapter.{n}.to_k_ip.weight"].shape[0]) for n in numbers)
    if "image_proj.proj.weight" in state and "image_proj.norm.weight" in state:
        proj = state["image_proj.proj.weight"]
        width = int(state["image_proj.norm.weight"].shape[0])
        return AdapterSpec("base", int(proj.shape[1]), width, int(proj.shape[0]) // width, inner_dims)
    if "image_proj.latents" in state and "image_proj.proj_in.weight" in state:
        latents = state["image_proj.latents"]
        depth = len({k.split(".")[2] for k in state if k.startswith("image_proj.layers.")})
        dim = int(latents.shape[-1])
        ff_inner = int(state["image_proj.layers.0.1.1.weight"].shape[0])
        inner = int(state["image_proj.layers.0.0.to_q.weight"].shape[0])
        return AdapterSpec("plus", int(state["image_proj.proj_in.weight"].shape[1]),
                           int(state["image_proj.proj_out.weight"].shape[0]), int(latents.shape[1]), inner_dims,
                           resampler_dim=dim, depth=depth, heads=inner // 64, dim_head=64, ff_mult=ff_inner // dim)
    kinds = sorted({".".join(k.split(".")[:2]) for k in state if k.startswith("image_proj.")})
    raise ValueError(f"unsupported IP-Adapter projection ({', '.join(kinds[:4])}): only the base (image_proj.proj + "
                     "norm) and plus (Resampler: image_proj.latents, proj_in, layers) variants are supported, not "
                     "full-face / FaceID files.")
