"""Pretrain the quality benchmark's world checkpoint: a tiny SD1.5-layout model that draws the base
world (3 shapes x 4 colours, ``world.py``) on prompt, so personalization methods can be scored on
the held-out purple "sks" cross.

    python benchmarks/quality/pretrain.py                    # build (or reuse) and report accuracy
    python benchmarks/quality/pretrain.py --samples-per-prompt 32 --max-minutes 30
    python benchmarks/quality/pretrain.py --force            # rebuild even if cached

``pretrained_world_checkpoint(cache_dir=None, seed=0) -> Path`` builds it once and caches it
(``$PERSONALIZE_CACHE/quality/quality-world-<VERSION>-s<seed>.safetensors``, written atomically;
a rerun returns the cached file at once). Everything is seeded: the same seed, config and ComfyUI
give the same file, apart from floating-point differences between machines.

Steps, all through ComfyUI's own classes and loaders:

1. Render ``n_images`` base-world images (``world.base_dataset``) and a held-out set.
2. Autoencoder (``codec.py``): ComfyUI's ``comfy.taesd.taesd.TAESD`` (what ``comfy.sd.VAE`` builds for
   ``taesd_encoder.*``/``taesd_decoder.*`` keys), trained from scratch on whole 64x64 images for
   reconstruction (object pixels weighted up) on the base world pooled with ``world.codec_dataset``
   (every shape, the cross included, in random hues: a general codec, as a real VAE is), then a
   refinement phase with half of each batch from the codec images, with a penalty that keeps each latent channel near
   zero mean and unit variance. The checkpoint's ``vae_scale``/``vae_shift`` are then set from the latents'
   statistics so that ``VAE.encode`` returns latents in the SD1.5 *raw* scale and
   ``process_latent_in`` (x 0.18215) gives the model ~unit-variance latents, the same contract as
   the real TAESD (``nodes.VAELoader`` sets ``vae_scale`` 0.18215 for it).
3. The tiny random checkpoint (``scripts/tiny_model.py``, same seed) with that TAESD is loaded with
   ``comfy.sd.load_state_dict_guess_config`` (what ``CheckpointLoaderSimple`` uses); its VAE round
   trip is measured (PSNR) and it encodes the dataset (``VAE.encode``, then the model's
   ``process_latent_in``); its CLIP encodes the captions (the 12 base captions, or the ``--captions varied``
   forms) and the empty prompt
   (``clip.encode_from_tokens_scheduled(clip.tokenize(text))``, as ``CLIPTextEncode``).
4. UNet: ``model.model.diffusion_model`` (ComfyUI's ``UNetModel``) trained in place, epsilon
   prediction in the model's own discrete schedule, inputs as ``BaseModel._apply_model`` computes
   them (``x_t = x0 + sigma * eps``, ``model_sampling.calculate_input``, ``model_sampling.timestep``),
   min-SNR-5 weighting, AdamW with warm-up and cosine decay, gradient clipping, EMA, 10% caption
   dropout (empty prompt) so classifier-free guidance works. Attention is PyTorch SDPA for the run
   (``optimized_attention_override``), whatever ComfyUI picked at start-up. Forward passes of both
   networks run under bf16 autocast (fp32 weights, optimizer and EMA): ~1.5-2x faster on CPU.
5. Anchored codec stage: the autoencoder goes on with batches of mostly codec images while the latents
   of base images are held at the frozen encoder's (MSE), so the UNet's latent space does not move
   but held-out colours (the purple of the concept) survive the round trip.
   A ``--captions varied`` world (same images) skips stages 2 and 5: it takes its plain sibling's autoencoder.
6. Save: the EMA UNet, the trained TAESD and the unchanged random CLIP-L, in the single-file SD1.5
   layout (fp16, like ``tiny_model``), with the run's figures in the safetensors metadata.

``base_accuracy(checkpoint, samples_per_prompt)`` samples each of the 12 base prompts through the
in-process ComfyUI runtime (stock ``CheckpointLoaderSimple`` -> ``CLIPTextEncode`` -> ``KSampler``
-> ``VAEDecode``) and scores the samples with ``judge.judge``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
for _extra in (REPO / "tests", REPO / "scripts"):
    if str(_extra) not in sys.path:
        sys.path.append(str(_extra))

import judge as world_judge
import world
from codec import (
    VAE_PREFIX,
    anchored_codec_stage,
    codec_images,
    cosine_schedule,
    images_tensor,
    psnr,
    taesd_from_state_dict,
    train_autoencoder,
)

# Bump when anything that changes the trained weights changes (recipe, world, defaults).
VERSION = "v4"  # v2: the autoencoder also learns codec_dataset; v3: + a refinement phase; v4: + the anchored codec stage
PREVIOUS_VERSION = "v3"  # a cached v3 file is stages 1-4 of v4 (same recipe): v4 adds stage 5 to it
UNET_PREFIX = "model.diffusion_model."
# Layers the reference UNet zero-initialises (zero_module): output conv, the second conv of every
# res-block and every transformer's proj_out. Starting them at zero makes each block an identity.
ZERO_INIT = ("out.2.", ".out_layers.3.", ".proj_out.")


@dataclass(frozen=True)
class PretrainConfig:
    """The recipe. Defaults are the cached checkpoint's; any change gets its own cache file."""

    n_images: int = 4096  # distinct base-world training images (rendered once)
    # Base captions left out of the UNet's training data, comma-separated ("a green square"): does the base model
    # compose a colour and a shape it never saw together? (What a recolour prompt asks of a personalized subject.)
    holdout: str = ""
    # The UNet's caption style (world.CAPTION_STYLES): "plain" ("a red circle") or "varied" (a language prior: colour
    # words in other places, shapes with a typical colour that a colour word overrides). The images, and so the
    # autoencoder, are the same: a varied world takes the autoencoder of its plain sibling and trains only the UNet.
    captions: str = "plain"
    n_eval_images: int = 96  # held-out images for the autoencoder PSNR
    n_codec_images: int = 2048  # world.codec_dataset images (all shapes, random hues): autoencoder only
    # Autoencoder (TAESD layout)
    ae_steps: int = 700
    ae_batch: int = 8
    # Whole 64x64 images: on small crops the encoder learns to lean on the zero padding (every
    # latent is near a border) and does not carry over to whole images (checked: 20 dB on 32x32
    # crops, 10 dB on whole images).
    ae_crop: int = 64
    ae_lr: float = 1e-3
    ae_object_weight: float = 3.0  # extra loss weight of object pixels
    ae_stat_weight: float = 0.05  # per-channel (mean^2 + (std - 1)^2) penalty on the latents
    ae_latent_noise: float = 0.05  # N(0, s) added to latents before decoding (robust decoder)
    # Refinement: both networks go on with half of each batch from codec_dataset. Without it the encoder
    # folds purple into blue (checked: 0/16 held-out purple crosses decoded purple after the first phase,
    # 16/16 after 300 refinement steps; decoder-only refinement cannot recover it).
    ae_refine_steps: int = 800
    ae_refine_batch: int = 16
    ae_refine_lr: float = 5e-4
    # Anchored codec stage, after the UNet: both networks go on with batches of mostly codec images while the
    # base images' latents are held where the UNet learned them (MSE to the frozen encoder's latents). The
    # first phases still decode held-out purple crosses as red or blue ones (0/32 judged right); this stage
    # gets 28/32 with a base-latent drift of 0.06% (the UNet stays valid).
    codec_steps: int = 400
    codec_batch: int = 12
    codec_base_batch: int = 4
    codec_lr: float = 5e-4
    codec_anchor_weight: float = 1.0
    # UNet
    unet_steps: int = 1000
    unet_batch: int = 32
    unet_lr: float = 3e-4
    warmup_steps: int = 25
    final_lr_fraction: float = 0.1  # cosine decay to this fraction of unet_lr
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.995  # with the usual (1 + step) / (10 + step) warm-up
    caption_dropout: float = 0.1
    bf16: bool = True  # bf16 autocast for the forward passes (fp32 weights, optimizer and EMA)

    def key(self) -> str:
        """'' for the defaults, else a short hash of the changed fields (for the cache file name)."""
        changed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default}
        if not changed:
            return ""
        return "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]


def base_items(config: PretrainConfig, seed: int) -> list:
    """The UNet's training images: ``n_images`` base-world images, without the held-out captions if any."""
    held_out = {c.strip() for c in config.holdout.split(",") if c.strip()}
    if not held_out:
        return world.base_dataset(config.n_images, seed=seed, captions=config.captions)
    unknown = sorted(held_out - set(base_prompts()))
    if unknown or len(held_out) >= len(base_prompts()):
        raise ValueError(f"--holdout {config.holdout!r}: {unknown or 'every caption'} is not a base caption to leave "
                         f"out; use some of {sorted(base_prompts())}, comma-separated")
    combos = len(world.base_combos())
    every = world.base_dataset(config.n_images * combos // (combos - len(held_out)) + combos, seed=seed,
                               captions=config.captions)
    return [item for item in every if world.caption(item.shape, item.colour) not in held_out][:config.n_images]


def _log(*parts) -> None:
    print(*parts, flush=True)


def cache_root() -> Path:
    base = Path(os.environ.get("PERSONALIZE_CACHE", Path.home() / ".cache" / "comfyui-personalize"))
    return base / "quality"


def checkpoint_path(cache_dir=None, seed: int = 0, config: PretrainConfig | None = None) -> Path:
    """Where the world checkpoint for this seed and config is cached."""
    config = config or PretrainConfig()
    folder = Path(cache_dir) if cache_dir is not None else cache_root()
    return folder / f"quality-world-{VERSION}-s{seed}{config.key()}.safetensors"


def _prepare_comfy(threads: int = 2):
    """ComfyUI importable on the CPU (the harness's prepare(): args before comfy.model_management)."""
    from harness import runtime as harness_runtime

    harness_runtime.prepare()
    import torch

    torch.set_num_threads(threads)
    return harness_runtime


def pretrained_world_checkpoint(cache_dir=None, seed: int = 0, *, config: PretrainConfig | None = None,
                                max_minutes: float = 30.0, force: bool = False, log=_log) -> Path:
    """The world checkpoint for ``seed``: the cached file if there is one, else build it (see the
    module docstring) and cache it atomically. A build stopped by ``max_minutes`` before its last
    UNet step is saved under a ``-partial`` name, which is never returned as a cache hit."""
    config = config or PretrainConfig()
    target = checkpoint_path(cache_dir, seed, config)
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = target.with_name(target.name.replace(f"-{VERSION}-", f"-{PREVIOUS_VERSION}-"))
    if config.captions != "plain":
        donor = pretrained_world_checkpoint(cache_dir, seed, config=autoencoder_donor(config), max_minutes=max_minutes,
                                            log=log)
        log(f"captions {config.captions!r}: the autoencoder of {donor.name}, a new UNet")
        tensors, metadata = build_world_state_dict(seed, config, max_minutes=max_minutes, log=log,
                                                   autoencoder_from=donor)
    elif previous.is_file() and not force and _same_earlier_recipe(previous, config):
        log(f"reusing {previous.name} for stages 1-4 (same seed and recipe): running the anchored codec stage only")
        tensors, metadata = upgrade_previous_version(previous, seed, config, log=log)
    else:
        tensors, metadata = build_world_state_dict(seed, config, max_minutes=max_minutes, log=log)
    if metadata["personalize.world.truncated"] == "true":
        target = target.with_name(target.stem + "-partial" + target.suffix)
        log(f"time budget reached before the last UNet step: saving as {target.name} (not a cache hit)")
    _save_atomic(tensors, metadata, target)
    log(f"saved {target} ({target.stat().st_size / 2**20:.0f} MiB)")
    return target


def autoencoder_donor(config: PretrainConfig) -> PretrainConfig:
    """The plain-caption config whose world lends ``config`` its autoencoder (same images, same autoencoder recipe;
    the UNet's fields at their defaults, so every UNet variant shares one donor)."""
    unet_fields = {"captions", "unet_steps", "unet_batch", "unet_lr", "warmup_steps", "final_lr_fraction",
                   "weight_decay", "grad_clip", "min_snr_gamma", "ema_decay", "caption_dropout"}
    defaults = PretrainConfig()
    return dataclasses.replace(config, **{name: getattr(defaults, name) for name in unet_fields})


def _same_earlier_recipe(previous: Path, config: PretrainConfig) -> bool:
    """Whether a previous-version file was built with this recipe for every stage it has (and in full)."""
    meta = checkpoint_metadata(previous)
    if meta.get("personalize.world.truncated") != "false":
        return False
    saved = json.loads(meta.get("personalize.world.config", "{}"))
    current = dataclasses.asdict(config)
    return bool(saved) and all(current.get(k) == v for k, v in saved.items())


def upgrade_previous_version(previous: Path, seed: int, config: PretrainConfig, log=_log) -> tuple[dict, dict]:
    """The previous version's file plus stage 5 (anchored codec stage): the same weights a full build makes
    from the same seed and recipe, up to floating-point differences."""
    _prepare_comfy()
    import torch
    from safetensors.torch import load_file

    sd, metadata = load_file(str(previous)), checkpoint_metadata(previous)
    ae = taesd_from_state_dict(sd)
    images = images_tensor(base_items(config, seed))
    figures = anchored_codec_stage(ae, images, codec_images(config, seed), config, seed, log=log)
    for k, v in ae.state_dict().items():
        sd[VAE_PREFIX + k] = v.detach().to(torch.float16).contiguous()
    ae_figures = {**json.loads(metadata.get("personalize.world.ae", "{}")), **figures}
    metadata.update({"personalize.world.version": VERSION, "personalize.world.upgraded_from": previous.name,
                     "personalize.world.config": json.dumps(dataclasses.asdict(config), sort_keys=True),
                     "personalize.world.ae": json.dumps(ae_figures), "modelspec.title": f"quality world s{seed} {VERSION}"})
    return sd, metadata


def _save_atomic(tensors: dict, metadata: dict, target: Path) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# Data


# --------------------------------------------------------------------------------------------
# UNet


def _sdpa_override():
    """transformer_options entry that routes every attention call to PyTorch SDPA."""
    from comfy.ldm.modules.attention import attention_pytorch

    def override(func, *args, **kwargs):
        return attention_pytorch(*args, **kwargs)

    return {"optimized_attention_override": override}


def _encode_texts(clip, texts):
    """Conditioning tensors [len(texts), 77, 768] as CLIPTextEncode makes them."""
    import torch

    out = []
    for text in texts:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        out.append(cond[0][0][0])
    return torch.stack(out).float()


def train_unet(model_patcher, latents, labels, conds, config: PretrainConfig, seed: int, deadline: float,
               log=_log):
    """Train ``model_patcher.model.diffusion_model`` in place on model-space ``latents`` [n, 4, h, w]
    with ``conds[labels[i]]`` as context (``conds[-1]`` is the empty prompt). Returns the EMA state
    dict (diffusion_model keys), the loss curve and whether the deadline cut the run short."""
    import torch

    base = model_patcher.model
    dm = base.diffusion_model
    ms = base.model_sampling
    torch.manual_seed(seed * 1000 + 2)
    gen = torch.Generator().manual_seed(seed * 1000 + 3)
    with torch.inference_mode(False), torch.enable_grad():
        # Normal (non-inference) fp32 tensors, whatever state the loader left them in.
        for module_path, module in dm.named_modules():
            zero = any(z in f".{module_path}." for z in ZERO_INIT)
            for name, p in list(module.named_parameters(recurse=False)):
                fresh = torch.nn.Parameter(p.detach().clone().float(), requires_grad=True)
                if zero:
                    fresh.data.zero_()
                setattr(module, name, fresh)
        dm.train()
        params = [p for p in dm.parameters()]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=config.unet_lr)
        ema = {k: v.detach().clone() for k, v in dm.state_dict().items()}
        options = _sdpa_override()
        sigmas = ms.sigmas.float()
        n = latents.shape[0]
        empty = conds.shape[0] - 1
        curve = []
        t0 = time.perf_counter()
        truncated = False
        for step in range(config.unet_steps):
            if time.perf_counter() > deadline:
                truncated = True
                log(f"[unet] time budget reached at step {step}/{config.unet_steps}")
                break
            lr = config.unet_lr * cosine_schedule(step, config.unet_steps, config.warmup_steps, config.final_lr_fraction)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(n, (config.unet_batch,), generator=gen)
            x0 = latents[idx]
            cond_idx = labels[idx].clone()
            cond_idx[torch.rand(config.unet_batch, generator=gen) < config.caption_dropout] = empty
            context = conds[cond_idx]
            t = torch.randint(len(sigmas), (config.unet_batch,), generator=gen)
            sigma = sigmas[t]
            eps = torch.randn(x0.shape, generator=gen)
            x_t = x0 + sigma.view(-1, 1, 1, 1) * eps
            # As BaseModel._apply_model: scaled input, the sampling's timestep for sigma.
            xc = ms.calculate_input(sigma, x_t)
            timestep = ms.timestep(sigma).float()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                pred = dm(xc, timestep, context=context, transformer_options=options).float()
            snr = sigma.pow(-2)
            weight = torch.clamp(snr, max=config.min_snr_gamma) / snr  # min-SNR for epsilon targets
            per_sample = (pred - eps).square().mean(dim=(1, 2, 3))
            loss = (weight * per_sample).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            opt.step()
            d = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in dm.state_dict().items():
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
            curve.append(float(loss))
            if step % 10 == 0 or step == config.unet_steps - 1:
                recent = sum(curve[-10:]) / len(curve[-10:])
                elapsed = time.perf_counter() - t0
                log(f"[unet] step {step + 1}/{config.unet_steps} loss {recent:.4f} grad {grad_norm:.2f} "
                    f"lr {lr:.2e} elapsed {elapsed:.0f}s ({elapsed / (step + 1):.2f} s/step)")
        dm.eval()
    return ema, curve, truncated


def _curve_summary(curve, points: int = 8) -> list[tuple[int, float]]:
    """Mean loss over ``points`` equal windows of the curve: [(last step of window, mean)]."""
    if not curve:
        return []
    size = max(1, len(curve) // points)
    out = []
    for start in range(0, len(curve), size):
        window = curve[start:start + size]
        out.append((start + len(window), sum(window) / len(window)))
    return out


# --------------------------------------------------------------------------------------------
# The whole build


def build_world_state_dict(seed: int = 0, config: PretrainConfig | None = None, *, max_minutes: float = 30.0,
                           log=_log, autoencoder_from: Path | None = None) -> tuple[dict, dict]:
    """Pretrain everything; return (tensors in the single-file SD1.5 layout, metadata). With ``autoencoder_from`` (a
    world checkpoint of the same images), take its autoencoder as it is and train the UNet only."""
    config = config or PretrainConfig()
    started = time.perf_counter()
    deadline = started + max_minutes * 60.0 - 45.0  # leave time to save
    _prepare_comfy()
    import comfy.sd
    import torch
    from tiny_model import tiny_sd15_state_dict

    timings = {}
    # 1. Data.
    t = time.perf_counter()
    items = base_items(config, seed)
    images = images_tensor(items)
    eval_images = images_tensor(world.base_dataset(config.n_eval_images, seed=seed + 10_000))
    captions = sorted({item.caption for item in items})
    labels = torch.tensor([captions.index(item.caption) for item in items])
    timings["render_s"] = time.perf_counter() - t
    log(f"rendered {len(items)} training ({len(captions)} captions) + {config.n_eval_images} held-out images in "
        f"{timings['render_s']:.1f}s")

    # 2. Autoencoder.
    t = time.perf_counter()
    if autoencoder_from is None:
        codec = codec_images(config, seed)
        ae, ae_figures = train_autoencoder(images, codec, config, seed, log=log)
    else:
        from safetensors.torch import load_file

        ae = taesd_from_state_dict(load_file(str(autoencoder_from)))
        ae_figures = {**json.loads(checkpoint_metadata(autoencoder_from).get("personalize.world.ae", "{}")),
                      "from": autoencoder_from.name}
    timings["autoencoder_s"] = time.perf_counter() - t

    # 3. Load the tiny checkpoint with this VAE through ComfyUI's loader; measure; encode.
    t = time.perf_counter()
    sd = tiny_sd15_state_dict(vae="taesd", seed=seed)
    for k, v in ae.state_dict().items():
        sd[VAE_PREFIX + k] = v.detach().to(torch.float16).contiguous()
    model_patcher, clip, vae = comfy.sd.load_state_dict_guess_config(dict(sd))[:3]  # it pops keys
    with torch.inference_mode():
        ae_psnr = vae_round_trip_psnr(vae, eval_images)
        concept_psnr = vae_round_trip_psnr(vae, images_tensor(world.concept_images(16, seed=seed + 20_000)))
        raw = vae.encode(images.permute(0, 2, 3, 1))  # VAEEncode: [B, H, W, C] in [0, 1]
        latents = model_patcher.model.process_latent_in(raw).float()
        conds = _encode_texts(clip, captions + [""])
    latents, conds = latents.clone(), conds.clone()  # normal tensors for training
    timings["encode_s"] = time.perf_counter() - t
    log(f"autoencoder through comfy.sd.VAE: {ae_psnr:.2f} dB PSNR on held-out images, {concept_psnr:.2f} dB on "
        f"held-out concept images; model latents "
        f"mean {float(latents.mean()):.3f} std {float(latents.std()):.3f}; encoded in {timings['encode_s']:.1f}s")

    # 4. UNet.
    t = time.perf_counter()
    ema, curve, truncated = train_unet(model_patcher, latents, labels, conds, config, seed, deadline, log=log)
    timings["unet_s"] = time.perf_counter() - t

    # 5. The anchored codec stage (the autoencoder only; the UNet's base latents stay put).
    if autoencoder_from is None:
        t = time.perf_counter()
        ae_figures.update(anchored_codec_stage(ae, images, codec, config, seed, log=log))
        for k, v in ae.state_dict().items():
            sd[VAE_PREFIX + k] = v.detach().to(torch.float16).contiguous()
        timings["codec_s"] = time.perf_counter() - t

    # 6. The checkpoint: EMA UNet + trained TAESD + the same random CLIP (fp16).
    for k, v in ema.items():
        key = UNET_PREFIX + k
        if key not in sd:
            raise KeyError(f"UNet key {key} is not in the tiny checkpoint layout")
        sd[key] = v.to(torch.float16).contiguous()
    timings["total_s"] = time.perf_counter() - started
    summary = _curve_summary(curve)
    metadata = {
        "personalize.world.version": VERSION,
        "personalize.world.seed": str(seed),
        "personalize.world.config": json.dumps(dataclasses.asdict(config), sort_keys=True),
        "personalize.world.ae_psnr_db": f"{ae_psnr:.3f}",
        "personalize.world.ae_concept_psnr_db": f"{concept_psnr:.3f}",
        "personalize.world.ae": json.dumps(ae_figures),
        "personalize.world.unet_steps_done": str(len(curve)),
        "personalize.world.unet_loss_curve": json.dumps([[s, round(v, 5)] for s, v in summary]),
        "personalize.world.truncated": "true" if truncated else "false",
        "personalize.world.timings": json.dumps({k: round(v, 1) for k, v in timings.items()}),
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": f"quality world s{seed} {VERSION}",
    }
    log("UNet loss (window end step: mean): " + ", ".join(f"{s}: {v:.4f}" for s, v in summary))
    log("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return sd, metadata


def vae_round_trip_psnr(vae, images) -> float:
    """PSNR of ``vae.decode(vae.encode(x))`` against ``x`` ([n, 3, H, W] in [0, 1]), through
    ComfyUI's ``VAE`` object as the VAEEncode / VAEDecode nodes call it."""
    pixels = images.permute(0, 2, 3, 1)
    decoded = vae.decode(vae.encode(pixels))
    return psnr(decoded.reshape(pixels.shape).clamp(0, 1), pixels)


def checkpoint_vae_psnr(checkpoint, n: int = 96, seed: int = 10_000) -> float:
    """VAE round-trip PSNR of a saved checkpoint, loaded as CheckpointLoaderSimple loads it."""
    _prepare_comfy()
    import comfy.sd
    import torch

    vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_clip=False, output_model=False)[2]
    with torch.inference_mode():
        return vae_round_trip_psnr(vae, images_tensor(world.base_dataset(n, seed=seed)))


def checkpoint_concept_round_trip(checkpoint, n: int = 32, seed: int = 20_000) -> float:
    """Share of held-out purple crosses that the judge still calls purple crosses after the checkpoint's VAE
    round trip: the ceiling of any method's subject fidelity on this world."""
    _prepare_comfy()
    import comfy.sd
    import numpy as np
    import torch

    vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_clip=False, output_model=False)[2]
    pixels = images_tensor(world.concept_images(n, seed=seed)).permute(0, 2, 3, 1)
    with torch.inference_mode():
        decoded = vae.decode(vae.encode(pixels)).reshape(pixels.shape).clamp(0, 1)
    arrays = (decoded.numpy() * 255).astype(np.uint8)
    return sum(world_judge.judge(a) == world.CONCEPT for a in arrays) / n


def checkpoint_metadata(checkpoint) -> dict:
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        return dict(f.metadata() or {})


# --------------------------------------------------------------------------------------------
# Evaluation through the stock nodes


def base_prompts() -> dict[str, tuple[str, str]]:
    """The 12 base captions and the (shape, colour) each should draw."""
    return {world.caption(s, c): (s, c) for s, c in world.base_combos()}


def language_prompts() -> dict[str, tuple[str, str]]:
    """Prompts of the "varied" captions' language prior and what each should draw: a shape alone in its typical
    colour, and the colour word overriding it in other forms."""
    prompts = {f"a {shape}": (shape, colour) for shape, colour in world.TYPICAL_COLOUR.items()}
    prompts.update({"a picture of a blue circle": ("circle", "blue"), "the yellow square": ("square", "yellow"),
                    "a triangle in red": ("triangle", "red")})
    return prompts


def base_accuracy(checkpoint, samples_per_prompt: int = 16, *, steps: int = 20, cfg: float = 5.0,
                  sampler: str = "euler", scheduler: str = "normal", seed: int = 0, out_dir=None,
                  runtime=None, prompts: dict | None = None) -> dict:
    """Sample every base prompt ``samples_per_prompt`` times with the stock nodes (one graph:
    CheckpointLoaderSimple -> CLIPTextEncode (prompt, "") -> EmptyLatentImage 64x64 -> KSampler ->
    VAEDecode -> SaveImage per prompt) in the in-process ComfyUI runtime and judge the images.

    Returns ``{"overall", "per_prompt": {caption: fraction}, "shape", "colour" (fractions of
    samples with the right shape / colour), "judged": {caption: [(shape, colour), ...]},
    "images": {caption: [PIL images]}, "seconds"}``. With ``out_dir``, also writes a contact sheet ``base_samples.png`` there.
    ``prompts``: other prompts ({text: (shape, colour)}) instead of the 12 base captions."""
    from PIL import Image

    harness_runtime = _prepare_comfy()
    rt = runtime or harness_runtime.boot()
    checkpoint = Path(checkpoint)
    ckpt = rt.install_model("checkpoints", checkpoint, f"quality-world-eval-{checkpoint.name}")
    prompts = prompts or base_prompts()
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                           "batch_size": samples_per_prompt}},
    }
    save_nodes = {}
    for i, text in enumerate(prompts):
        base = 10 + 10 * i
        ids = [str(base + k) for k in range(5)]
        graph[ids[0]] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
        graph[ids[1]] = {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": [ids[0], 0], "negative": ["2", 0], "latent_image": ["3", 0],
            "seed": seed + i, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}}
        graph[ids[2]] = {"class_type": "VAEDecode", "inputs": {"samples": [ids[1], 0], "vae": ["1", 2]}}
        graph[ids[3]] = {"class_type": "SaveImage", "inputs": {"images": [ids[2], 0],
                                                               "filename_prefix": f"quality_world_base/{i:02d}"}}
        save_nodes[text] = ids[3]
    t = time.perf_counter()
    result = rt.run_prompt(graph)
    seconds = time.perf_counter() - t
    judged, images = {}, {}
    for text, node in save_nodes.items():
        paths = sorted(rt.image_paths(result, node))
        images[text] = [Image.open(p).convert("RGB") for p in paths]
        judged[text] = [world_judge.judge(im) for im in images[text]]
    per_prompt = {text: sum(j == prompts[text] for j in js) / max(1, len(js)) for text, js in judged.items()}
    every = [(j, prompts[text]) for text, js in judged.items() for j in js]
    report = {
        "overall": sum(j == e for j, e in every) / max(1, len(every)),
        "shape": sum(j[0] == e[0] for j, e in every) / max(1, len(every)),
        "colour": sum(j[1] == e[1] for j, e in every) / max(1, len(every)),
        "per_prompt": per_prompt,
        "judged": judged,
        "images": images,
        "seconds": seconds,
        "samples_per_prompt": samples_per_prompt,
        "settings": {"steps": steps, "cfg": cfg, "sampler": sampler, "scheduler": scheduler, "seed": seed},
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _contact_sheet(images, out_dir / "base_samples.png")
    return report


def _contact_sheet(rows: dict, path: Path, per_row: int = 16) -> None:
    from PIL import Image, ImageDraw

    width = 110 + per_row * 64
    sheet = Image.new("RGB", (width, 64 * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, ims) in enumerate(rows.items()):
        draw.text((4, r * 64 + 26), label, fill=(0, 0, 0))
        for c, im in enumerate(ims[:per_row]):
            sheet.paste(im.resize((64, 64)), (110 + c * 64, r * 64))
    sheet.save(path)


def format_accuracy(report: dict) -> str:
    lines = [f"{'prompt':<22}{'accuracy':>10}  judged (most common)"]
    for text, acc in report["per_prompt"].items():
        counts = {}
        for j in report["judged"][text]:
            counts[j] = counts.get(j, 0) + 1
        common = ", ".join(f"{s} {c} x{k}" for (s, c), k in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"{text:<22}{acc:>10.3f}  {common}")
    lines.append(f"{'overall':<22}{report['overall']:>10.3f}  (shape {report['shape']:.3f}, colour "
                 f"{report['colour']:.3f}; {report['samples_per_prompt']} samples per prompt, "
                 f"{report['seconds']:.0f}s)")
    return "\n".join(lines)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain (or reuse) the quality benchmark's world checkpoint; report base accuracy.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {cache_root()}")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="time budget for the build")
    parser.add_argument("--force", action="store_true", help="rebuild even if the checkpoint is cached")
    parser.add_argument("--samples-per-prompt", type=int, default=16)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--no-eval", action="store_true", help="build only; skip base accuracy")
    parser.add_argument("--out", type=Path, default=None, help="folder for a contact sheet of the samples")
    parser.add_argument("--threads", type=int, default=2)
    for f in dataclasses.fields(PretrainConfig):
        kind = type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), type=_parse_bool if kind is bool else kind, default=None,
                            help=f"recipe override (default {f.default})")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
                 if getattr(args, f.name) is not None}
    config = PretrainConfig(**overrides)
    _prepare_comfy(args.threads)
    t0 = time.perf_counter()
    path = pretrained_world_checkpoint(args.cache_dir, args.seed, config=config, max_minutes=args.max_minutes,
                                       force=args.force)
    build_s = time.perf_counter() - t0
    meta = checkpoint_metadata(path)
    print(f"checkpoint: {path} (ready in {build_s:.1f}s)")
    for key in ("ae_psnr_db", "ae_concept_psnr_db", "unet_steps_done", "unet_loss_curve", "truncated", "timings"):
        print(f"  {key}: {meta.get('personalize.world.' + key)}")
    print(f"  VAE round trip of the saved file (comfy.sd.load_checkpoint_guess_config): "
          f"{checkpoint_vae_psnr(path):.2f} dB PSNR")
    print(f"  held-out purple crosses judged right after the VAE round trip (subject-fidelity ceiling): "
          f"{checkpoint_concept_round_trip(path):.3f}")
    if not args.no_eval:
        report = base_accuracy(path, args.samples_per_prompt, steps=args.sample_steps, cfg=args.cfg, out_dir=args.out)
        print(format_accuracy(report))
        if config.captions == "varied":
            print("language prior (varied captions):")
            print(format_accuracy(base_accuracy(path, args.samples_per_prompt, steps=args.sample_steps, cfg=args.cfg,
                                                prompts=language_prompts())))
    return 0


if __name__ == "__main__":
    # Before torch loads OpenMP: spinning worker threads cost a lot on a small shared machine
    # (see benchmarks/README.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
