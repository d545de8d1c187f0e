"""ControlNet (LDM layout) built from a base MODEL, saved as stock `ControlNetLoader` reads it.

The module is ComfyUI's own `comfy.cldm.cldm.ControlNet` (the class the stock loader builds), so the
trained network, the saved file and the loaded file are one architecture. Initialisation follows
lllyasviel's `tool_add_control.py`: encoder and middle block copied from the UNet, zero convolutions
(`zero_convs.N.0`, `middle_block_out.0`) and the hint encoder's last conv at zero, so a fresh ControlNet
adds exactly nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import comfy.cldm.cldm
import comfy.ops
import torch
from safetensors.torch import save_file

from .files import write_new_file
from .kohya_lora import base_model_family

PREFIX = "control_model."
HINT_CHANNELS = 3
_HINT_LAST_CONV = "input_hint_block.14"


def controlnet_config(model) -> dict:
    """cldm.ControlNet kwargs for the UNet of a ComfyUI MODEL (what the stock loader detects from our file)."""
    unet = getattr(model.model, "diffusion_model", None)
    config = getattr(model.model.model_config, "unet_config", None)
    if unet is None or config is None or "model_channels" not in config or "input_blocks" not in dict(unet.named_children()):
        raise ValueError("`model` is not a UNet model (SD1.x, SD2.x, SDXL): ControlNets in the LDM layout need one.")
    config = dict(config)
    config.pop("out_channels", None)
    config.update(hint_channels=HINT_CHANNELS, dtype=torch.float32, device=None,
                  operations=comfy.ops.disable_weight_init)
    return config


def _reset(module: torch.nn.Module) -> None:
    # comfy.ops.disable_weight_init skips init (weights are loaded at inference); a trainable copy needs torch's own.
    for sub in module.modules():
        for cls in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(sub, cls):
                cls.reset_parameters(sub)
                break


def build_controlnet(model, generator: torch.Generator) -> torch.nn.Module:
    """A new ControlNet for `model`: a copy of its encoder and middle block (a new module: the base is
    shared by every clone and stays untouched), a hint encoder, and zero convolutions."""
    config = controlnet_config(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        control = comfy.cldm.cldm.ControlNet(**config)
        _reset(control)
    base = model.model.diffusion_model.state_dict()
    own = control.state_dict()
    copied = {k: base[k].detach().to(own[k].dtype).clone() for k in own if k in base and base[k].shape == own[k].shape}
    control.load_state_dict(copied, strict=False)
    with torch.no_grad():
        for name, sub in control.named_modules():
            if name.startswith(("zero_convs.", "middle_block_out")) or name == _HINT_LAST_CONV:
                for p in sub.parameters(recurse=False):
                    p.zero_()
    return control


def unet_dims(state: dict) -> dict:
    """What decides which base models a LDM ControlNet fits: latent channels, width, text width, ADM width
    (`state`: a UNet's or a ControlNet's state dict, unprefixed)."""
    context = next((v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    adm = state["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in state else None
    first = state["input_blocks.0.0.weight"]
    return {"in_channels": first.shape[1], "model_channels": first.shape[0], "context_dim": context, "adm_in_channels": adm}


def check_family(control_net, model, input_name: str) -> None:
    """Raise a ValueError naming `input_name` when `control_net` was made for another model family."""
    control_model = getattr(control_net, "control_model", None)
    if not isinstance(control_model, comfy.cldm.cldm.ControlNet):
        raise ValueError(f"`{input_name}` is not a UNet ControlNet (LDM/diffusers ControlNet for SD1.x, SD2.x or SDXL); "  # noqa: TRY004  (house rule: ValueError)
                         "T2I-Adapters, Control-LoRAs and DiT ControlNets cannot be used here.")
    have, wanted = unet_dims(control_model.state_dict()), unet_dims(model.model.diffusion_model.state_dict())
    differ = {k: (have[k], wanted[k]) for k in wanted if have[k] != wanted[k]}
    if differ:
        details = ", ".join(f"{k} {a} (model: {b})" for k, (a, b) in differ.items())
        raise ValueError(f"`{input_name}` was trained for another model family than this {base_model_family(model)} MODEL "
                         f"({details}). Load a ControlNet made for this base model.")


def ldm_state_dict(control_model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """`control_model.*` keys (the layout of lllyasviel's control_*.pth/.safetensors files)."""
    return {PREFIX + k: v.detach().to("cpu", dtype).contiguous() for k, v in control_model.state_dict().items()}


def save_controlnet(control_model: torch.nn.Module, folder, name: str, *, dtype: torch.dtype = torch.float16,
                    metadata: dict | None = None) -> Path:
    """Write a new safetensors file `folder/name.safetensors` atomically (never overwriting); return its path."""
    tensors = ldm_state_dict(control_model, dtype)
    meta = {"modelspec.architecture": "controlnet", "personalize.format": "ldm-control_model"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    target = Path(folder) / name
    return write_new_file(target.parent, target.name, ".safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))
