"""The world's autoencoder (ComfyUI's TAESD layout): training from scratch, the refinement phase and the
anchored codec stage of ``pretrain.py`` (see its docstring for the recipe and why each stage exists).

Split from ``pretrain.py`` so each file stays readable; it has no state of its own.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import world

if TYPE_CHECKING:
    from pretrain import PretrainConfig

LATENT_SCALE = 0.18215  # SD1.5's latent_format.scale_factor (process_latent_in multiplies by it)
VAE_PREFIX = "first_stage_model."


def _log(*parts) -> None:
    print(*parts, flush=True)


def cosine_schedule(step: int, total: int, warmup: int, final: float) -> float:
    """LR factor: linear warm-up, then cosine decay to ``final``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def images_tensor(items):
    """Items -> float tensor [n, 3, H, W] in [0, 1]."""
    import torch

    return torch.from_numpy(world.pixels(items)).permute(0, 3, 1, 2).float().div_(255.0)


def psnr(a, b) -> float:
    """PSNR in dB of two image tensors in [0, 1]."""
    mse = float((a.float() - b.float()).square().mean())
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def _init_taesd(seed: int):
    """ComfyUI's TAESD with PyTorch's default conv initialisation (ComfyUI's ops skip it), and the
    last conv of every residual block at zero, so each block starts as ReLU(x) and the deep
    norm-free network trains quickly."""
    import comfy.taesd.taesd
    import torch

    torch.manual_seed(seed)
    ae = comfy.taesd.taesd.TAESD(latent_channels=4)
    for m in ae.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(m)
    for m in ae.modules():
        if isinstance(m, comfy.taesd.taesd.Block):
            torch.nn.init.zeros_(m.conv[-1].weight)
            torch.nn.init.zeros_(m.conv[-1].bias)
    torch.nn.init.constant_(ae.taesd_decoder[-1].bias, 0.85)  # ~ the mean pixel: light background
    return ae


def _fit_autoencoder(ae, pools, *, steps: int, batch: int, lr_max: float, config: PretrainConfig, gen, tag: str,
                     log=_log) -> list[float]:
    """Train ``ae`` (TAESD) for reconstruction; each batch takes an equal share from each of ``pools``
    ([n, 3, H, W] in [0, 1] each). Returns the reconstruction-MSE curve."""
    import torch

    enc, dec = ae.taesd_encoder, ae.taesd_decoder
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=lr_max)
    _, _, h, w = pools[0].shape
    crop = min(config.ae_crop, h, w)
    shares = [batch // len(pools) + (1 if i < batch % len(pools) else 0) for i in range(len(pools))]
    t0 = time.perf_counter()
    curve = []
    for step in range(steps):
        lr = lr_max * cosine_schedule(step, steps, warmup=20, final=0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.cat([pool[torch.randint(len(pool), (share,), generator=gen)] for pool, share in zip(pools, shares)])
        if crop < h or crop < w:
            ys = torch.randint(h - crop + 1, (batch,), generator=gen).tolist()
            xs = torch.randint(w - crop + 1, (batch,), generator=gen).tolist()
            x = torch.stack([img[:, y:y + crop, xx:xx + crop] for img, y, xx in zip(x, ys, xs)])
        x = x.contiguous(memory_format=torch.channels_last)
        noise = torch.randn((x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            z = enc(x).float()  # TAESD.encode feeds the encoder images in [0, 1]
            y_hat = dec(z + config.ae_latent_noise * noise).float()  # and reads its output as [0, 1]
        err = (y_hat - x).square()
        rec = err.mean()
        # Object pixels (far from the image's border colour) weigh more: they are ~15% of the
        # pixels but carry the colour and the shape that everything downstream is judged on.
        border = x[:, :, 0, :].median(dim=2).values[:, :, None, None]
        obj = ((x - border).abs().sum(dim=1, keepdim=True) > 0.15).float()
        weighted = (err * (1 + config.ae_object_weight * obj)).mean()
        mean = z.mean(dim=(0, 2, 3))
        std = z.std(dim=(0, 2, 3))
        stat = (mean.square() + (std - 1).square()).mean()
        loss = weighted + config.ae_stat_weight * stat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(float(rec.detach()))
        if step % 25 == 0 or step == steps - 1:
            recent = sum(curve[-25:]) / len(curve[-25:])
            log(f"[{tag}] step {step + 1}/{steps} rec {recent:.5f} (~{10 * math.log10(1 / recent):.1f} dB) "
                f"latent mean {float(mean.detach().abs().mean()):.2f} std {float(std.detach().mean()):.2f} lr {lr:.2e} "
                f"elapsed {time.perf_counter() - t0:.0f}s")
    return curve


def train_autoencoder(images, codec, config: PretrainConfig, seed: int, log=_log):
    """Train a TAESD on ``images`` (base world) and ``codec`` (world.codec_dataset), [n, 3, H, W] in
    [0, 1]: first on both pooled, then the refinement phase with half of each batch from ``codec``.
    Returns the module with ``vae_scale``/``vae_shift`` set for the SD1.5 latent contract, and its figures."""
    import torch

    ae = _init_taesd(seed)
    ae.to(memory_format=torch.channels_last)
    enc = ae.taesd_encoder
    gen = torch.Generator().manual_seed(seed * 1000 + 1)
    t0 = time.perf_counter()
    pooled = torch.cat([images, codec])
    curve = _fit_autoencoder(ae, [pooled], steps=config.ae_steps, batch=config.ae_batch, lr_max=config.ae_lr,
                             config=config, gen=gen, tag="ae", log=log)
    if config.ae_refine_steps:
        curve = _fit_autoencoder(ae, [images, codec], steps=config.ae_refine_steps, batch=config.ae_refine_batch,
                                 lr_max=config.ae_refine_lr, config=config, gen=gen, tag="ae refine", log=log)
    ae.to(memory_format=torch.contiguous_format)

    # Latent statistics over whole images -> vae_scale / vae_shift (see module docstring).
    with torch.no_grad():
        z = torch.cat([enc(images[i:i + 64]) for i in range(0, min(len(images), 256), 64)])
    m, s = float(z.mean()), float(z.std())
    vae_scale = LATENT_SCALE * s
    with torch.no_grad():
        ae.vae_scale.fill_(vae_scale)
        ae.vae_shift.fill_(-m / vae_scale)
    figures = {"ae_seconds": time.perf_counter() - t0, "ae_latent_mean": m, "ae_latent_std": s,
               "ae_final_rec_mse": sum(curve[-25:]) / len(curve[-25:])}
    return ae, figures


def anchored_codec_stage(ae, images, codec, config: PretrainConfig, seed: int, log=_log) -> dict:
    """Stage 5: improve ``ae`` as a general codec (mostly ``codec`` images) while the latents of the base
    ``images`` stay where the UNet learned them. Trains in place; returns its figures."""
    import copy

    import torch

    enc, dec = ae.taesd_encoder, ae.taesd_decoder
    frozen = copy.deepcopy(enc).requires_grad_(False)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=config.codec_lr)
    gen = torch.Generator().manual_seed(seed * 1000 + 5)
    n_codec, n_base = config.codec_batch, config.codec_base_batch
    t0 = time.perf_counter()
    curve, drift = [], []
    for step in range(config.codec_steps):
        lr = config.codec_lr * cosine_schedule(step, config.codec_steps, warmup=20, final=0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        x_base = images[torch.randint(len(images), (n_base,), generator=gen)]
        x = torch.cat([codec[torch.randint(len(codec), (n_codec,), generator=gen)], x_base])
        noise = torch.randn((len(x), 4, x.shape[2] // 8, x.shape[3] // 8), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            z = enc(x).float()
            y_hat = dec(z + config.ae_latent_noise * noise).float()
            with torch.no_grad():
                z_anchor = frozen(x_base).float()
        err = (y_hat - x).square()
        border = x[:, :, 0, :].median(dim=2).values[:, :, None, None]
        obj = ((x - border).abs().sum(dim=1, keepdim=True) > 0.15).float()
        anchor = (z[n_codec:] - z_anchor).square().mean()
        loss = (err * (1 + config.ae_object_weight * obj)).mean() + config.codec_anchor_weight * anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(float(err.detach().mean()))
        drift.append(float(anchor.detach() / z_anchor.square().mean()))
        if step % 25 == 0 or step == config.codec_steps - 1:
            recent = sum(curve[-25:]) / len(curve[-25:])
            log(f"[codec] step {step + 1}/{config.codec_steps} rec {recent:.5f} (~{10 * math.log10(1 / recent):.1f} dB) "
                f"base-latent drift {sum(drift[-25:]) / len(drift[-25:]):.4f} lr {lr:.2e} "
                f"elapsed {time.perf_counter() - t0:.0f}s")
    return {"codec_seconds": time.perf_counter() - t0, "codec_base_latent_drift": sum(drift[-25:]) / len(drift[-25:])}


def taesd_from_state_dict(sd: dict):
    """The checkpoint's TAESD (``first_stage_model.taesd_*`` keys, scale and shift) as a float32 module."""
    import comfy.taesd.taesd

    ae = comfy.taesd.taesd.TAESD(latent_channels=4)
    ae.load_state_dict({k[len(VAE_PREFIX):]: v.float() for k, v in sd.items() if k.startswith(VAE_PREFIX)})
    return ae


def codec_images(config: PretrainConfig, seed: int):
    """``config.n_codec_images`` of world.codec_dataset as [n, 3, H, W] in [0, 1]."""
    import numpy as np
    import torch

    images = world.codec_dataset(config.n_codec_images, seed=seed)
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2).float() / 255.0
