"""From CLIP-Vision features to a MODEL clone with the adapter applied (the apply node's engine)."""
from __future__ import annotations

from typing import Literal

import torch

from .adapter import IPAdapterModel
from .patch import ImageCondition, install

Combine = Literal["average", "concat"]


def image_features(clip_vision, image: torch.Tensor, adapter: IPAdapterModel, *, crop: bool = True,
                   input_name: str = "image") -> torch.Tensor:
    """The CLIP-Vision feature the adapter reads, through ComfyUI's own `encode_image` (CLIPVisionEncode)."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"`{input_name}` must be an IMAGE batch [B, H, W, 3], got shape {tuple(image.shape)}.")
    spec = adapter.spec
    features = clip_vision.encode_image(image, crop=crop)[spec.clip_vision_output].float().cpu()
    if features.shape[-1] != spec.embed_dim:
        raise ValueError(f"`clip_vision` gives {spec.clip_vision_output} of width {features.shape[-1]} but `ipadapter` "
                         f"({spec.variant}) expects {spec.embed_dim}: load the CLIP-Vision model the adapter was trained "
                         "with (e.g. ViT-H/14 for most SD1.5 and plus adapters, ViT-bigG for ip-adapter_sdxl).")
    return features


def uncond_features(clip_vision, adapter: IPAdapterModel) -> torch.Tensor:
    """The "no image" feature: zeros for base adapters, a black image's hidden states for plus (as trained)."""
    spec = adapter.spec
    if spec.variant == "base":
        return torch.zeros(1, spec.embed_dim)
    size = getattr(clip_vision, "image_size", 224)
    return image_features(clip_vision, torch.zeros(1, size, size, 3), adapter)


def _combine(features: torch.Tensor, adapter: IPAdapterModel, combine: Combine) -> torch.Tensor:
    """Image tokens [1, T, C] (on the CPU, fp32) of one or several images' features."""
    device = next(adapter.image_proj.parameters()).device
    with torch.no_grad():
        if combine == "average":
            tokens = adapter.image_tokens(features.mean(0, keepdim=True).to(device))
        else:
            tokens = adapter.image_tokens(features.to(device))
        return tokens.reshape(1, -1, tokens.shape[-1]).float().cpu()


def apply_ipadapter(model, adapter: IPAdapterModel, features: torch.Tensor, negative: torch.Tensor, *, weight: float = 1.0,
                    start_percent: float = 0.0, end_percent: float = 1.0, combine: Combine = "average"):
    """A clone of `model` whose cross-attentions also attend to the image tokens of `features`.

    Several reference images are averaged (one token set) or concatenated (their tokens side by side);
    `negative` gives the unconditional tokens (of the same count).
    """
    if combine not in ("average", "concat"):
        raise ValueError(f"`combine` must be 'average' or 'concat', got {combine!r}.")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"`start_percent` ({start_percent}) and `end_percent` ({end_percent}) must satisfy "
                         "0 <= start <= end <= 1.")
    cond = _combine(features, adapter, combine)
    uncond = _combine(negative, adapter, "average")
    if uncond.shape[1] != cond.shape[1]:
        uncond = uncond.repeat(1, cond.shape[1] // uncond.shape[1], 1)
    clone = model.clone()
    sampling = clone.get_model_object("model_sampling")
    condition = ImageCondition(cond=cond, uncond=uncond, weight=float(weight),
                               sigma_start=float(sampling.percent_to_sigma(start_percent)),
                               sigma_end=float(sampling.percent_to_sigma(end_percent)))
    if start_percent == 0.0:
        condition.sigma_start = float("inf")
    install(clone, adapter, condition)
    return clone
