"""Image projections of the official IP-Adapter layout: base (linear) and "plus" (Resampler).

Hand-written rather than taken from diffusers, whose classes (`ImageProjection`,
`IPAdapterPlusImageProjection`) use different parameter names: these modules' `state_dict()` keys are
exactly the official `image_proj.*` keys, so files load and save without a conversion table.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class ImageProjModel(nn.Module):
    """Base IP-Adapter: the pooled CLIP image embedding -> `tokens` context tokens (Linear + LayerNorm)."""

    def __init__(self, embed_dim: int, cross_dim: int, tokens: int = 4):
        super().__init__()
        self.cross_dim, self.tokens = cross_dim, tokens
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.norm

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, embed_dim] -> [B, tokens, cross_dim]."""
        x = self.proj(image_embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(-1, self.tokens, self.cross_dim))


class PerceiverAttention(nn.Module):
    """Latent queries attend to [image features; latents] (Perceiver resampler attention)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.dim_head, self.heads = dim_head, heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((features, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        # The reference scales q and k by dim_head^-1/4 each (more stable in fp16 than scaling q k^T).
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weights = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1, dtype=torch.float32)
        out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter plus: `num_queries` learned latents read the image encoder's penultimate hidden states."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4):
        super().__init__()
        self.cross_dim, self.tokens = output_dim, num_queries
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth))

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.norm_out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, patches, embedding_dim] -> [B, num_queries, output_dim]."""
        x = self.proj_in(hidden_states.to(self.proj_in.weight.dtype))
        latents = self.latents.repeat(x.shape[0], 1, 1)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))
