"""Class images for prior preservation, generated with the base model through ComfyUI's own
sampling (`comfy.sample.sample`, what KSampler runs) and cached on disk as PNG files."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.utils
import numpy as np
import torch
from PIL import Image

from ..formats.files import atomic_output
from .captions import caption_lines

log = logging.getLogger("comfyui-personalize")


def class_image_key(model_fp: str, settings: dict) -> str:
    """Cache folder name: the base model's fingerprint and every sampling setting."""
    blob = json.dumps({"model": model_fp, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def class_prompts(text: str) -> list[str]:
    """The prompts of a class-prompt text: one per non-empty line."""
    return caption_lines(text)


def generate_class_images(model, clip, vae, folder: Path, *, prompts: list[str], negative: str, count: int, width: int,
                          height: int, steps: int, cfg: float, sampler_name: str, scheduler: str, seed: int,
                          progress=None) -> list[Path]:
    """Make `count` images in `folder` (one PNG each, `NNNNN.png` + `.txt` caption); reuse those already there.

    Image i uses `prompts[i mod n]` (several prompts: a regularization set of everything the model
    should keep drawing, not only the subject's class; `class_prompts` splits a text into them). Image i uses seed
    `seed + i`, so a partly filled cache (e.g. after a cancel) is completed with exactly the images a
    single run would have made.
    """
    if not prompts:
        raise ValueError("no class prompt: describe the class, e.g. 'a photo of a dog'.")
    folder.mkdir(parents=True, exist_ok=True)
    encoded = {}
    negative_cond = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    channels = model.model.latent_format.latent_channels
    paths = []
    made = 0
    for index in range(count):
        path = folder / f"{index:05d}.png"
        paths.append(path)
        if path.is_file():
            continue
        comfy.model_management.throw_exception_if_processing_interrupted()
        text = prompts[index % len(prompts)]
        if text not in encoded:
            encoded[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        latent = torch.zeros((1, channels, height // 8, width // 8))
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed + index)
        samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, encoded[text], negative_cond, latent,
                                      seed=seed + index, disable_pbar=True)
        pixels = vae.decode(samples)[0]
        image = Image.fromarray(np.clip(pixels.float().cpu().numpy() * 255.0, 0, 255).astype(np.uint8))
        path.with_suffix(".txt").write_text(text, encoding="utf-8")
        with atomic_output(path, overwrite=True) as tmp:  # the PNG appears last: it marks the image done
            image.save(tmp, format="PNG")
        made += 1
        if progress is not None:
            progress(index + 1, count)
    log.info("class images: %d generated, %d reused from %s", made, count - made, folder)
    return paths
