"""Engine-level test helpers shared by the method tests: cancel a run at a step, then resume it."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


class CancelAt:
    """A Reporter that asks for a cancel once `step` optimizer steps are done (as /interrupt does)."""

    def __init__(self, progress, total: int, step: int):
        self.inner, self.step_to_cancel, self.done = progress.Reporter(total), step, 0

    def interrupted(self) -> bool:
        return self.done >= self.step_to_cancel

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, step, loss, lr):
        self.done = step
        self.inner.step(step, loss, lr)


def cancel_then_resume(progress, train: Callable[..., Any], folder: Path, *, total: int, at: int = 2) -> tuple[Any, Any]:
    """`train(folder, reporter=None, resume=None)` uninterrupted, then cancelled after step `at` (exactly one
    checkpoint written) and resumed from it; returns (uninterrupted result, resumed result)."""
    import comfy.model_management

    whole = train(folder / "whole")
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(folder / "split", reporter=CancelAt(progress, total, at))
    saved = sorted((folder / "split").glob("interrupted_step_*.pt"))
    assert [p.name for p in saved] == [f"interrupted_step_{at:07d}.pt"]
    return whole, train(folder / "split", resume=saved[0])


def dataset_with_class_images(pack, base, folder: Path, *, instances: int = 2, classes: int = 4, seed: int = 5):
    """Training data of `instances` 'sks' images plus `classes` class images of another subject (prior preservation),
    encoded with the tiny checkpoint's VAE and CLIP."""
    import torch
    from harness import make_sample_dataset

    folder = Path(folder)
    make_sample_dataset(folder / "instance", n=instances, size=64, seed=seed, subject="sks")
    make_sample_dataset(folder / "class", n=classes, size=64, seed=seed + 1, subject="a")
    _, clip, vae = base
    with torch.inference_mode():
        spec = pack.build.DatasetSpec(folder=str(folder / "instance"), resolution=64, buckets=False, use_cache=False,
                                      class_folder=str(folder / "class"))
        return pack.build.build_training_data(spec, vae, clip)[0]


def denoise_x0(model, cond, latent, sigma: float = 3.0, load: bool = True):
    """x0 prediction of a MODEL through the samplers' own path (what KSampler calls), at a fixed noise draw;
    `load=False` computes with the model as it is loaded now, as the training loop does."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers
    import torch

    with torch.inference_mode():
        if load:
            comfy.model_management.load_models_gpu([model])
        conds = comfy.samplers.encode_model_conds(model.model.extra_conds, comfy.sampler_helpers.convert_cond(cond),
                                                  latent, latent.device, "positive")
        x = model.model.process_latent_in(latent) + sigma * torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        model.pre_run()
        return comfy.samplers.calc_cond_batch(model.model, [conds], x, torch.tensor([sigma]), model.model_options)[0]


def tiny_sdxl():
    """A tiny SDXL MODEL built by ComfyUI's own SDXL config (its ADM `y` carries the image size)."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    unet = {"image_size": 32, "model_channels": 32, "use_linear_in_transformer": True, "transformer_depth": [0, 1],
            "context_dim": 2048, "adm_in_channels": 2816, "use_temporal_attention": False, "in_channels": 4,
            "out_channels": 4, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
            "num_head_channels": 16, "transformer_depth_output": [0, 0, 1, 1], "use_spatial_transformer": True,
            "legacy": False}
    config = comfy.supported_models.SDXL(unet)
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(config.get_model({}), cpu, cpu)
