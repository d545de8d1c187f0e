"""kohya-format LoRA files: key names, metadata, and checks against a model.

Names come from ComfyUI's own loader maps (`comfy.lora.model_lora_keys_unet/clip`), so whatever we
write is exactly what the stock `LoraLoader` resolves. Among the aliases ComfyUI accepts we pick
the ones kohya sd-scripts writes: for SD1.x/SD2.x (trained on diffusers' UNet there) diffusers-style
UNet names (`lora_unet_down_blocks_0_...`); for SDXL (trained on the original SGM UNet) the LDM
path (`lora_unet_input_blocks_4_1_...`); `lora_te_` for one text encoder, `lora_te1_`/`lora_te2_`
for SDXL's two.
"""
from __future__ import annotations

import json
import time
from typing import Any

import comfy.lora
import torch

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")


def unet_lora_names(base_model) -> dict[str, str]:
    """Map `diffusion_model.<path>.weight` -> kohya module name, preferring kohya's own naming."""
    key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    present = set(base_model.state_dict().keys())
    prefer_ldm = _family(base_model) == "sdxl"
    chosen: dict[str, str] = {}
    for lora_name, weight_key in key_map.items():
        # ComfyUI's diffusers map lists every key of the config family, some absent from this model.
        if not lora_name.startswith("lora_unet_") or weight_key not in present:
            continue
        is_ldm_path = lora_name == "lora_unet_" + weight_key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        if weight_key not in chosen or is_ldm_path == prefer_ldm:
            chosen[weight_key] = lora_name
    return chosen


def clip_lora_names(cond_stage_model) -> dict[str, str]:
    """Map CLIP weight keys (`clip_l.transformer...weight`) -> kohya module name."""
    key_map = comfy.lora.model_lora_keys_clip(cond_stage_model, {})
    two_encoders = any(k.startswith("lora_te2_") for k in key_map)
    chosen: dict[str, str] = {}
    for lora_name, weight_key in key_map.items():
        if two_encoders:
            wanted = lora_name.startswith(("lora_te1_", "lora_te2_"))
        else:
            wanted = lora_name.startswith("lora_te_")
        if wanted and weight_key not in chosen:
            chosen[weight_key] = lora_name
    return chosen


def module_names(state_dict: dict[str, Any]) -> set[str]:
    """Module names of a LoRA state dict (keys without their LoRA suffix)."""
    names = set()
    for key in state_dict:
        for suffix in LORA_SUFFIXES:
            if key.endswith(suffix):
                names.add(key[: -len(suffix)])
                break
    return names


def _family(base_model) -> str:
    name = type(base_model.model_config).__name__.lower()
    return {"sd15": "sd1", "sd20": "sd2", "sd21unclipl": "sd2", "sd21unclipc": "sd2", "sdxl": "sdxl",
            "sdxlrefiner": "sdxl", "ssd1b": "sdxl", "segmind_vega": "sdxl"}.get(name, name)


def base_model_family(model) -> str:
    """`sd1`, `sd2`, `sdxl`, ... of a MODEL, from ComfyUI's detected model config class."""
    return _family(model.model)


def kohya_metadata(*, rank: int, alpha: float, base_model: str, resolution: tuple[int, int], steps: int,
                   job: dict[str, Any], dataset_tags: dict[str, int], name: str, train_text_encoder: bool,
                   extra: dict[str, Any] | None = None) -> dict[str, str]:
    """`ss_*` (kohya) and `modelspec.*` metadata, all values strings as safetensors requires (the `sshs_*` hashes
    are added when the file is written: safetensors_io.addnet_hashes)."""
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}.get(base_model, base_model)
    now = int(time.time())
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(base_model, base_model),
        "ss_v2": str(base_model == "sd2"),
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_max_train_steps": str(steps),
        "ss_steps": str(steps),
        "ss_learning_rate": str(job.get("learning_rate")),
        "ss_text_encoder_lr": str(job.get("text_encoder_lr") if train_text_encoder else 0),
        "ss_unet_lr": str(job.get("learning_rate")),
        "ss_lr_scheduler": str(job.get("lr_scheduler")),
        "ss_lr_warmup_steps": str(job.get("warmup_steps")),
        "ss_optimizer": str(job.get("optimizer")),
        "ss_batch_size_per_device": str(job.get("batch_size")),
        "ss_gradient_accumulation_steps": str(job.get("grad_accumulation")),
        "ss_min_snr_gamma": str(job.get("min_snr_gamma")),
        "ss_noise_offset": str(job.get("noise_offset")),
        "ss_seed": str(job.get("seed")),
        "ss_mixed_precision": str(job.get("precision")),
        "ss_network_train_unet_only": str(not train_text_encoder),
        "ss_tag_frequency": json.dumps({"dataset": dataset_tags}),
        "ss_training_started_at": str(now),
        "ss_output_name": name,
        "ss_sd_model_name": base_model,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if base_model != "sd1" else "diffusers",
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        "personalize.job": json.dumps(job, sort_keys=True),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


class LoraStateDict(dict):
    """A kohya LoRA state dict in memory (core's LORA_MODEL type) that carries its metadata."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})
