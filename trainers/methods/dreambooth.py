"""DreamBooth: a full fine-tune of the UNet (and optionally the text encoder) as a training method.

The trainable weights are private copies installed as object patches of a MODEL/CLIP clone: ComfyUI
swaps them into the shared `nn.Module` only while that clone is loaded and restores the originals
when it unloads, so the input MODEL/CLIP (and every sibling branch) keeps its weights. Weight patches
already on the input (e.g. a LoRA applied before) are baked into the starting values. Prior
preservation needs nothing here: the loop adds the class-image stream's loss.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import comfy.lora
import comfy.utils
import torch

from . import Attached, ParamGroup, TrainingMethod, register_method

WeightDtype = Literal["fp32", "bf16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
UNET_PREFIX = "diffusion_model."


@dataclass
class DreamBoothConfig:
    train_text_encoder: bool = field(default=False, metadata={"help": "Also fine-tune the text encoder(s), at text_encoder_lr."})
    text_encoder_fraction: float = field(default=1.0, metadata={"help": "Train the text encoder only for this first fraction of the steps (kohya's stop_text_encoder_training)."})
    weight_dtype: WeightDtype = field(default="fp32", metadata={"help": "Storage of the trained weights: fp32 master weights, or bf16 (full-bf16, with stochastic rounding or Kahan updates)."})

    def __post_init__(self):
        if not 0.0 < float(self.text_encoder_fraction) <= 1.0:
            raise ValueError(f"`text_encoder_fraction` must be in (0, 1], got {self.text_encoder_fraction}.")
        if self.weight_dtype not in _DTYPES:
            raise ValueError(f"`weight_dtype` must be one of {sorted(_DTYPES)}, got {self.weight_dtype!r}.")


def _weight(patcher, key: str) -> torch.Tensor:
    """The weight `patcher` computes with before its weight patches: its own object patch, else the module's."""
    if key in patcher.object_patches:
        return patcher.object_patches[key]
    return comfy.utils.get_attr(patcher.model, key)


def _trainable_copies(patcher, keys: list[str], dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    """Private trainable copies of `keys`, with the patcher's weight patches (e.g. a LoRA) baked in."""
    copies = {}
    for key in keys:
        weight = _weight(patcher, key)
        value = weight.detach().to(torch.float32, copy=True)
        if key in patcher.patches:
            value = comfy.lora.calculate_weight(patcher.patches[key], value, key)
        copies[key] = torch.nn.Parameter(value.to(dtype), requires_grad=False)
    return copies


def _install(patcher, copies: dict[str, torch.Tensor]) -> None:
    """Make `copies` the clone's weights: object patches (per clone), minus the baked weight patches."""
    import uuid

    baked = [k for k in copies if k in patcher.patches]
    for key in baked:
        del patcher.patches[key]
    if baked:
        patcher.patches_uuid = uuid.uuid4()
    for key, tensor in copies.items():
        patcher.add_object_patch(key, tensor)


def check_dataset_fits(model, data) -> None:
    """A clear error when the dataset was encoded for another model family (e.g. SD1 VAE/CLIP, SDXL MODEL)."""
    from ..formats.kohya_lora import base_model_family

    family = base_model_family(model)
    channels = model.model.latent_format.latent_channels
    context = model.model.model_config.unet_config.get("context_dim")
    sample = data.samples[0] if data.samples else None
    if sample is None:
        raise ValueError("the `dataset` is empty: add instance images to the dataset folder.")
    if sample.latent.shape[0] != channels:
        raise ValueError(f"the `dataset` was encoded by a VAE with {sample.latent.shape[0]} latent channels but this "
                         f"{family} MODEL needs {channels}: build the dataset with this checkpoint's VAE.")
    cond = sample.conditioning[0][0] if sample.conditioning else None
    if context is not None and cond is not None and cond.shape[-1] != context:
        raise ValueError(f"the `dataset` captions were encoded by a text encoder of width {cond.shape[-1]} but this {family} "
                         f"MODEL expects {context}: build the dataset with this checkpoint's CLIP (an SD1 dataset "
                         "cannot train an SDXL model).")
    if family == "sdxl" and max(data.resolution) < 768:
        raise ValueError(f"`resolution` {max(data.resolution)} is an SD1 setting: SDXL is trained at 1024 (at least 768); "
                         "rebuild the dataset with resolution 1024.")


def _float_params(module: torch.nn.Module, prefix: str = "") -> list[str]:
    return [prefix + name for name, p in module.named_parameters() if p.is_floating_point()]


@register_method("dreambooth")
class DreamBoothMethod(TrainingMethod):
    """Full fine-tune of every UNet weight (optionally the text encoder); exported as a checkpoint."""

    def __init__(self, **options):
        self.config = DreamBoothConfig(**options)
        self.unet: dict[str, torch.nn.Parameter] = {}
        self.text_encoder: dict[str, torch.nn.Parameter] = {}
        self.base_dtypes: dict[str, torch.dtype] = {}
        self.model = self.clip = self.source_model = self.source_clip = None
        self.base_model_dtype = None
        self._base_on_device: dict[tuple[int, str], torch.Tensor] = {}  # base_behaviour's originals, per run

    def attach(self, model, clip, generator):
        cfg = self.config
        dtype = _DTYPES[cfg.weight_dtype]
        self.source_model, self.source_clip = model, clip
        model = model.clone()
        if model.weight_wrapper_patches:
            raise ValueError("the `model` carries weight wrappers (e.g. a DoRA being trained); DreamBooth needs plain "
                             "weights: connect the checkpoint's MODEL, optionally with LoRAs applied.")
        # The loop unloaded every loaded clone before attaching (unload_clones): the module holds the base weights.
        keys = _float_params(model.model.diffusion_model, UNET_PREFIX)
        self.base_dtypes = {k: _weight(model, k).dtype for k in keys}
        self.base_model_dtype = getattr(model.model.diffusion_model, "dtype", None)
        self.unet = _trainable_copies(model, keys, dtype)
        _install(model, self.unet)
        if hasattr(model.model.diffusion_model, "dtype"):
            # The model casts its inputs to this dtype; with every weight trained it must be the weights' dtype.
            model.add_object_patch(UNET_PREFIX + "dtype", dtype)
        groups = [ParamGroup(list(self.unet.values()), "main", "unet")]
        if clip is not None:
            clip = clip.clone()
        if cfg.train_text_encoder:
            if clip is None:
                raise ValueError("`train_text_encoder` is on but no CLIP is connected: connect the checkpoint's CLIP.")
            te_keys = _float_params(clip.cond_stage_model)
            self.base_dtypes.update({"te." + k: _weight(clip.patcher, k).dtype for k in te_keys})
            self.text_encoder = _trainable_copies(clip.patcher, te_keys, dtype)
            _install(clip.patcher, self.text_encoder)
            groups.append(ParamGroup(list(self.text_encoder.values()), "text_encoder", "text_encoder",
                                     train_fraction=float(cfg.text_encoder_fraction)))
        self.model, self.clip = model, clip
        return Attached(model=model, clip=clip, groups=groups, trains_text_encoder=cfg.train_text_encoder)

    @contextlib.contextmanager
    def base_behaviour(self) -> Iterator[None]:
        # While the clone is loaded its module holds the trainable copies and the patcher keeps the originals
        # aside (object_patches_backup): swapping references back and forth copies no weights.
        swaps = [(self.model, self.unet)] + ([(self.clip.patcher, self.text_encoder)] if self.text_encoder else [])
        swapped = []
        try:
            for patcher, copies in swaps:
                for key, trained in copies.items():
                    original = self._base_weight(patcher, key, trained)
                    swapped.append((patcher, key, comfy.utils.set_attr(patcher.model, key, original)))
            if self.base_model_dtype is not None:  # the base weights compute in their own dtype
                key = UNET_PREFIX + "dtype"
                swapped.append((self.model, key, comfy.utils.set_attr(self.model.model, key, self.base_model_dtype)))
            yield
        finally:
            for patcher, key, trained in reversed(swapped):
                comfy.utils.set_attr(patcher.model, key, trained)

    def _base_weight(self, patcher, key: str, trained: torch.Tensor) -> torch.Tensor:
        """The original the patcher set aside, where the trained copy computes: ComfyUI's loader moves the object
        patches' module (the copies), while the originals stay on the offload device. Moved once per run."""
        cached = self._base_on_device.get((id(patcher), key))
        if cached is None:
            original = patcher.object_patches_backup.get(key)
            if original is None:
                raise ValueError("the DreamBooth clone is not loaded, so its base weights are not at hand.")
            cached = original if original.device == trained.device else original.to(trained.device)
            self._base_on_device[(id(patcher), key)] = cached
        return cached

    def finish(self) -> None:
        self._base_on_device.clear()

    def _named(self) -> dict[str, torch.nn.Parameter]:
        return {**{"unet." + k: v for k, v in self.unet.items()}, **{"te." + k: v for k, v in self.text_encoder.items()}}

    def trainable_state_dict(self):
        return {k: v.detach() for k, v in self._named().items()}

    def load_trainable_state_dict(self, state):
        own = self._named()
        if state.keys() != own.keys():
            missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
            raise ValueError(f"the checkpoint's DreamBooth weights do not match this model (missing {missing[:2]}, "
                             f"unexpected {extra[:2]}): another model, or `train_text_encoder` differs.")
        with torch.no_grad():
            for key, param in own.items():
                if state[key].shape != param.shape:
                    raise ValueError(f"the checkpoint's {key} has shape {tuple(state[key].shape)}, this model "
                                     f"{tuple(param.shape)}: it was trained on another model.")
                param.copy_(state[key])

    def _weights(self, weights: dict[str, torch.Tensor] | None, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        tensor = (weights or self.trainable_state_dict())[key].detach()
        # On the CPU, as ComfyUI keeps weight patches: a GPU copy would be a second UNet its memory manager cannot see.
        return tensor.to("cpu", dtype or self.base_dtypes[key.removeprefix("unet.")])

    def trained_outputs(self, weights: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None):
        """New MODEL/CLIP clones of the inputs carrying the trained weights (or `weights`, e.g. the EMA, by state
        name) as ComfyUI "set" weight patches, stored in `dtype` or else each base weight's own dtype.

        Weight patches, unlike the object patches used while training, are what core nodes read back through
        `get_key_patches` (model merging, LoRA extraction), so the result works with them too."""
        model = self.source_model.clone()
        model.add_patches({k: ("set", (self._weights(weights, "unet." + k, dtype),)) for k in self.unet})
        clip = self.source_clip.clone() if self.source_clip is not None else None
        if self.text_encoder:
            clip.add_patches({k: ("set", (self._weights(weights, "te." + k, dtype),)) for k in self.text_encoder})
        return model, clip

    def saving_outputs(self, weights: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None):
        """Clones whose module weights are the trained ones in `dtype` (object patches), for
        `comfy.sd.save_checkpoint`, which writes the module's state dict as it is (so the file gets `dtype`)."""
        model = self.model.clone()
        for key in self.unet:
            model.add_object_patch(key, torch.nn.Parameter(self._weights(weights, "unet." + key, dtype), requires_grad=False))
        if hasattr(model.model.diffusion_model, "dtype"):
            model.add_object_patch(UNET_PREFIX + "dtype", dtype or self.base_model_dtype)
        clip = self.clip.clone() if self.clip is not None else None
        for key in self.text_encoder:
            clip.patcher.add_object_patch(key, torch.nn.Parameter(self._weights(weights, "te." + key, dtype),
                                                                  requires_grad=False))
        return model, clip

    def export(self):
        return self.trainable_state_dict()

    def describe(self):
        cfg = self.config
        return {"train_text_encoder": cfg.train_text_encoder, "text_encoder_fraction": cfg.text_encoder_fraction,
                "weight_dtype": cfg.weight_dtype, "unet_tensors": len(self.unet), "text_encoder_tensors": len(self.text_encoder)}
