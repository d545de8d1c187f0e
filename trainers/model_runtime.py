"""How the loop talks to a ComfyUI MODEL: conditioning, the denoiser call, and training-time
patches (fixed attention, gradient checkpointing) that are undone when training ends."""
from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator

import comfy.conds
import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import torch
import torch.utils.checkpoint
from comfy.ldm.modules.attention import attention_pytorch

log = logging.getLogger("comfyui-personalize")


def encode_sample_conds(model_patcher, conditioning: list, latent: torch.Tensor, device) -> dict:
    """Model conds (cross-attn, ADM `y`, ...) of one sample, from a CONDITIONING list.

    Goes through ComfyUI's own `convert_cond` + `encode_model_conds`, so SDXL size conditioning and
    other model-specific inputs are built exactly as the samplers build them.
    """
    conds = comfy.sampler_helpers.convert_cond(conditioning)
    noise_like = torch.zeros((1,) + tuple(latent.shape[-3:]), device=device)
    conds = comfy.samplers.encode_model_conds(
        model_patcher.model.extra_conds, conds, noise_like, device, "positive", latent_image=noise_like
    )
    if len(conds) != 1:
        raise ValueError(
            f"a training caption must encode to one conditioning entry, got {len(conds)}; "
            "combined/area conditionings cannot be trained on."
        )
    return conds[0]["model_conds"]


def batch_model_conds(per_sample: list[dict]) -> dict:
    """Concatenate per-sample model conds into one batched entry (same COND classes)."""
    first = per_sample[0]
    batched = {}
    for key, cond in first.items():
        others = [sample[key] for sample in per_sample[1:]]
        batched[key] = cond._copy_with(cond.concat(others)) if others else cond
    return batched


class Denoiser:
    """x0 prediction of a batch through `comfy.samplers.calc_cond_batch`.

    Using the samplers' own entry point keeps every model patch active during training exactly as
    at inference: attention patches (hypernetworks, IP-Adapter), wrappers, hooks and ControlNets.
    """

    def __init__(self, model_patcher, fixed_attention: bool = True, keep_loaded: list | None = None):
        self.model_patcher = model_patcher
        self.keep_loaded = keep_loaded  # training clones that must be loaded at every forward (`ensure_loaded`)
        self.model_options = model_patcher.model_options
        if fixed_attention:
            # One attention path for the whole run: ComfyUI's CPU default (sub-quadratic) picks its
            # chunking from free memory, which breaks gradient-checkpoint recomputation and
            # bit-identical reruns.
            options = dict(self.model_options)
            transformer_options = dict(options.get("transformer_options", {}))
            transformer_options["optimized_attention_override"] = _pytorch_attention
            options["transformer_options"] = transformer_options
            self.model_options = options

    def __call__(self, noisy: torch.Tensor, sigmas: torch.Tensor, model_conds: dict, extra: dict | None = None) -> torch.Tensor:
        entry = {"model_conds": model_conds, "uuid": uuid.uuid4()}
        if extra:
            entry.update(extra)
        if self.keep_loaded and ensure_loaded(self.keep_loaded):
            log.warning("ComfyUI had unloaded the training model (memory for another model): loaded it again")
        model = self.model_patcher.model
        return comfy.samplers.calc_cond_batch(model, [[entry]], noisy, sigmas, self.model_options)[0]


def _pytorch_attention(func, *args, **kwargs):
    return attention_pytorch(*args, **kwargs)


def make_autograd_safe(module: torch.nn.Module) -> int:
    """Turn inference-mode parameters and buffers into normal tensors with the same values.

    ComfyUI loads models inside `torch.inference_mode()`; autograd refuses to save such tensors
    for backward. The values are unchanged, so other users of the shared module see no difference.
    Returns how many tensors were converted.
    """
    converted = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
                    converted += 1
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_inference():
                    sub._buffers[name] = buf.clone()
                    converted += 1
    return converted


def _checkpointed(forward):
    def run(*args, **kwargs):
        # ComfyUI mutates transformer_options (block ids, indices) in place as the forward goes on; the
        # recomputation in backward must see the values of this call, so it gets a snapshot.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def _checkpoint_units(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose forward ComfyUI calls: a UNet block (TimestepEmbedSequential) is never called
    itself (`forward_timestep_embed` runs its layers one by one), so its parameterised layers are the
    units; any other block (DiT blocks) is its own unit."""
    if isinstance(block, torch.nn.Sequential):
        return [layer for layer in block if any(True for _ in layer.parameters())]
    return [block]


@contextlib.contextmanager
def gradient_checkpointing(diffusion_model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Checkpoint every UNet layer (ResBlocks and transformers of the input, middle and output blocks) for the
    duration of the context.

    The module is shared between ModelPatcher clones, so the original forwards are restored in
    `finally` whatever happens.
    """
    patched = []
    if enabled:
        for group in ("input_blocks", "middle_block", "output_blocks", "transformer_blocks", "double_blocks", "single_blocks"):
            container = getattr(diffusion_model, group, None)
            if container is None:
                continue
            blocks = list(container) if isinstance(container, torch.nn.ModuleList) else [container]
            for unit in (u for block in blocks for u in _checkpoint_units(block)):
                unit.forward = _checkpointed(unit.forward)
                patched.append(unit)
    try:
        yield
    finally:
        for block in patched:
            del block.forward  # drops the instance attribute: the class forward is back


def unload_clones(patcher) -> None:
    """Unload every loaded clone of `patcher`'s module, so the module holds its original weights and forwards again.

    A sibling clone that is still loaded (an earlier run's training clone that was sampled, a MODEL with LoRA patches)
    has its weight and object patches applied to the shared module; a method attaching now would read them as the base."""
    for loaded in list(comfy.model_management.current_loaded_models):
        if loaded.model is not None and loaded.model.is_clone(patcher):
            loaded.model_unload()
            comfy.model_management.current_loaded_models.remove(loaded)


def load_for_training(patchers: list) -> None:
    """Load models fully onto the compute device through ComfyUI's memory manager."""
    comfy.model_management.load_models_gpu(patchers, memory_required=0, force_full_load=True)
    for patcher in patchers:
        patcher.pre_run()
        if hasattr(patcher, "model_patches_to"):  # attention patches with weights (hypernetworks, ...)
            patcher.model_patches_to(patcher.load_device)


def ensure_loaded(patchers: list) -> bool:
    """Load the training clones again if ComfyUI unloaded them (fully, or partly under memory pressure) since the
    last step, e.g. to make room for a text encode or a preview's VAE decode: an unloaded clone computes without its
    patches (the LoRA's branches among them), so training would go on without them. True when it reloaded."""
    loaded = {id(lm.model) for lm in comfy.model_management.current_loaded_models}
    if all(id(p) in loaded and not getattr(p.model, "model_lowvram", False) for p in patchers):
        return False
    load_for_training(patchers)
    return True


def release_training_model(patchers: list) -> None:
    """Unload training clones and strip their trainable weight functions from the shared modules."""
    from comfy.weight_adapter import WeightAdapterTrainBase

    for loaded in list(comfy.model_management.current_loaded_models):
        if loaded.model in patchers:
            loaded.model_unload()
            comfy.model_management.current_loaded_models.remove(loaded)
    for patcher in patchers:
        for module in patcher.model.modules():
            for attr in ("weight_function", "bias_function"):
                functions = module.__dict__.get(attr)
                if functions:
                    setattr(module, attr, [f for f in functions if not isinstance(f, WeightAdapterTrainBase)])


def _out_of_place_clip_layer(layer):
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


@contextlib.contextmanager
def trainable_text_encoder(cond_stage_model, enabled: bool) -> Iterator[None]:
    """Make ComfyUI's CLIP layers differentiable for the duration of the context.

    `comfy.clip_model.CLIPLayer.forward` adds its residuals in place (`x += ...`), which autograd
    rejects because LayerNorm needs the unmodified input for its backward. We swap in the
    out-of-place equivalent (same values) and restore the shared modules in `finally`.
    """
    patched = []
    if enabled and cond_stage_model is not None:
        for module in cond_stage_model.modules():
            if type(module).__name__ == "CLIPLayer" and all(hasattr(module, a) for a in ("layer_norm1", "self_attn", "layer_norm2", "mlp")):
                module.forward = _out_of_place_clip_layer(module)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
