"""Full checkpoints written by ComfyUI's own `comfy.sd.save_checkpoint` (every architecture's key
layout, as core's CheckpointSave writes it), atomically, never over an existing file, with modelspec
metadata (the SAI model spec that kohya, A1111 and ComfyUI read)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import comfy.model_base
import comfy.model_sampling
import comfy.sd
import torch

from .files import write_new_file
from .kohya_lora import base_model_family

_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


def modelspec_metadata(model, *, title: str, resolution: tuple[int, int] | None = None, description: str = "",
                       extra: dict[str, Any] | None = None) -> dict[str, str]:
    """`modelspec.*` keys for a full checkpoint of `model` (strings only, as safetensors requires)."""
    family = base_model_family(model)
    arch = _ARCHITECTURES.get(family, family)
    if family == "sd2" and model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:
        arch = "stable-diffusion-v2-768-v"
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "sgm",  # what ComfyUI's CheckpointSave writes
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
    }
    if model.model.model_type == comfy.model_base.ModelType.EPS:
        meta["modelspec.predict_key"] = "epsilon"
    elif model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:
        meta["modelspec.predict_key"] = "v"
    if resolution:
        meta["modelspec.resolution"] = f"{resolution[0]}x{resolution[1]}"
    if description:
        meta["modelspec.description"] = description
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta


def _extra_keys(model) -> dict[str, torch.Tensor]:
    """Marker tensors CheckpointSave adds so loaders detect v-prediction / zero-terminal-SNR models."""
    extra = {}
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.ModelSamplingContinuousEDM) and isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        extra["edm_vpred.sigma_max"] = torch.tensor(sampling.sigma_max).float()
        extra["edm_vpred.sigma_min"] = torch.tensor(sampling.sigma_min).float()
    if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:
        extra["v_pred"] = torch.tensor([])
        if getattr(sampling, "zsnr", False):
            extra["ztsnr"] = torch.tensor([])
    return extra


def save_full_checkpoint(folder: str | Path, stem: str, model, clip, vae, metadata: dict[str, str]) -> Path:
    """Write MODEL + CLIP + VAE as `<folder>/<stem>.safetensors` (a numbered name if taken); return the path."""
    if vae is None:
        raise ValueError("`vae` is not connected: a full checkpoint needs the VAE (connect the checkpoint's VAE).")
    return write_new_file(Path(folder), stem, ".safetensors",
                          lambda tmp: comfy.sd.save_checkpoint(str(tmp), model, clip, vae, metadata=metadata,
                                                               extra_keys=_extra_keys(model)))
