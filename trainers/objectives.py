"""Noise, timesteps and targets, all taken from the model's own `model_sampling`.

ComfyUI models expose `calculate_denoised(sigma, model_output, x)`, which is affine in the
model output for every parameterization (eps, v, flow, x0, EDM). We read the two coefficients
off that function, so the loss is computed in the model's own prediction space without a
hard-coded schedule: eps for SD1.x, v for v-prediction models, velocity for flow models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NoisedBatch:
    noisy: torch.Tensor  # x_t, the model input before `calculate_input` scaling
    sigmas: torch.Tensor  # [B]
    noise: torch.Tensor


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def sample_sigmas(model_sampling, batch: int, generator: torch.Generator, timestep_range=(0.0, 1.0)) -> torch.Tensor:
    """Uniform over the model's discrete sigma table (kohya/diffusers sample integer timesteps)."""
    table = model_sampling.sigmas.detach().float().cpu()
    lo = int(round(timestep_range[0] * (len(table) - 1)))
    hi = int(round(timestep_range[1] * (len(table) - 1)))
    index = torch.randint(lo, hi + 1, (batch,), generator=generator)
    return table[index]


def add_noise(model_sampling, latents: torch.Tensor, generator: torch.Generator, *, noise_offset: float = 0.0,
              timestep_range=(0.0, 1.0)) -> NoisedBatch:
    """Sample sigmas and noise on the CPU generator (reproducible), then noise the latents."""
    batch = latents.shape[0]
    sigmas = sample_sigmas(model_sampling, batch, generator, timestep_range)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        channel_shift = torch.randn((batch, latents.shape[1]) + (1,) * (latents.ndim - 2), generator=generator)
        noise = noise + noise_offset * channel_shift
    noise = noise.to(latents.device)
    sigmas = sigmas.to(latents.device)
    noisy = model_sampling.noise_scaling(_bcast(sigmas, latents), noise, latents.float())
    return NoisedBatch(noisy=noisy, sigmas=sigmas, noise=noise)


def _affine_coefficients(model_sampling, sigmas: torch.Tensor, like: torch.Tensor):
    """(a, b) with calculate_denoised(sigma, out, x) == a*x + b*out, per sample."""
    s = _bcast(sigmas, like).float()
    one = torch.ones_like(s)
    zero = torch.zeros_like(s)
    a = model_sampling.calculate_denoised(s, zero, one)
    b = model_sampling.calculate_denoised(s, one, zero)
    return a, b


def prediction_space(model_sampling, denoised: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor,
                     sigmas: torch.Tensor):
    """Map the predicted and true x0 into the model's output space: (model_pred, target)."""
    a, b = _affine_coefficients(model_sampling, sigmas, noisy)
    model_pred = (denoised.float() - a * noisy) / b
    target = (clean.float() - a * noisy) / b
    return model_pred, target


def signal_to_noise(model_sampling, sigmas: torch.Tensor) -> torch.Tensor:
    """SNR of x_t = alpha*x0 + s*noise as the model noises it (works for VP and flow schedules)."""
    s = sigmas.float().reshape(-1, 1)
    alpha = model_sampling.noise_scaling(s, torch.zeros_like(s), torch.ones_like(s))
    scale = model_sampling.noise_scaling(s, torch.ones_like(s), torch.zeros_like(s))
    return (alpha / scale.clamp_min(1e-12)).reshape(-1) ** 2


def min_snr_weights(model_sampling, sigmas: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights expressed in the model's prediction space.

    The paper weights the x0-space error by min(SNR, gamma). Our loss is in prediction space,
    where the error equals the x0 error divided by b (see `prediction_space`), so the weight is
    min(SNR, gamma) * b^2: min(SNR,g)/SNR for eps, min(SNR,g)/(SNR+1) for v-prediction.
    """
    snr = signal_to_noise(model_sampling, sigmas)
    _, b = _affine_coefficients(model_sampling, sigmas, sigmas.reshape(-1, 1))
    return torch.minimum(snr, torch.full_like(snr, gamma)) * b.reshape(-1).float() ** 2


def per_sample_loss(model_pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_delta: float,
                    masks: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss per sample, shape [B]; with `masks` ([B, h, w] weights) a mask-weighted mean."""
    if loss_type == "huber":
        elementwise = F.huber_loss(model_pred, target, reduction="none", delta=huber_delta)
    else:
        elementwise = F.mse_loss(model_pred, target, reduction="none")
    if masks is None:
        return elementwise.flatten(1).mean(dim=1)
    weights = masks.to(elementwise).unsqueeze(1).expand_as(elementwise)
    return (elementwise * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp_min(1e-6)
