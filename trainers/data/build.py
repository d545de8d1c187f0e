"""From a folder spec to `TrainingData`: scan, bucket, crop/flip variants, masks, and VAE/CLIP
encodes served from the on-disk caches whenever the image, the model and every setting match."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageOps

from . import buckets as bucketing
from . import cache as caches
from .captions import CaptionOptions, has_choices
from .dataset import TrainingData, TrainSample, clip_identity
from .folder import scan_dataset
from .images import load_mask, open_rgb

log = logging.getLogger("comfyui-personalize")

_RESIZE_VERSION = "lanczos-cover-v1"  # bump when resize/crop changes, so cached latents are not reused
_ENCODE_CHUNK = 8


@dataclass
class DatasetSpec:
    """Every setting that decides what the trainer sees."""

    folder: str
    resolution: int = 512
    min_side: int | None = None  # default: resolution // 2 (kohya: 256 for 512)
    max_side: int | None = None  # default: resolution * 2 (kohya: 1024 for 512)
    bucket_step: int = 64
    buckets: bool = True
    no_upscale: bool = False
    crop: Literal["center", "random"] = "center"
    crop_variants: int = 4  # random crop: this many crops per image are encoded (and cached)
    flip: bool = False
    trigger_word: str = ""
    instance_prompt: str = ""
    masked_loss: bool = False
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    class_folder: str | None = None
    class_prompt: str = ""
    class_count: int | None = None  # only the first N class images by name (Personalize Class Images' `count`)
    seed: int = 0
    use_cache: bool = True
    cache_root: Path | None = None
    keep_pixels: bool = False  # keep each variant's cropped pixels ([H, W, 3], 0..1) in sample.extras["pixels"]
    condition: object | None = None  # pairs.ConditionSpec: each variant's condition image in sample.extras["condition"]

    def __post_init__(self):
        if self.resolution < 8:
            raise ValueError(f"`resolution` must be at least 8 pixels, got {self.resolution}.")
        if self.crop not in ("center", "random"):
            raise ValueError(f"`crop` must be 'center' or 'random', got {self.crop!r}.")
        if self.crop_variants < 1:
            raise ValueError(f"`crop_variants` must be at least 1, got {self.crop_variants}.")


@dataclass
class BuildStats:
    images: int = 0
    skipped: int = 0
    vae_encode_calls: int = 0
    text_encode_calls: int = 0
    latent_cache_hits: int = 0
    text_cache_hits: int = 0
    seconds: float = 0.0


def _bucket_for(spec: DatasetSpec, size: tuple[int, int]):
    """(bucket, resized size before the crop), by kohya's rules."""
    if not spec.buckets:
        bucket = (spec.resolution, spec.resolution)
        return bucket, bucketing.cover_size(size, bucket)
    min_side = spec.min_side or max(spec.bucket_step, spec.resolution // 2)
    max_side = spec.max_side or spec.resolution * 2
    table = bucketing.make_buckets((spec.resolution, spec.resolution), min_side, max_side, spec.bucket_step)
    return bucketing.select_bucket(size, table, max_area=spec.resolution * spec.resolution, step=spec.bucket_step,
                                   no_upscale=spec.no_upscale)


def _to_pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


def _variants(spec: DatasetSpec, image_hash: str):
    """(crop mode, rng seed, flip) of every variant of one image."""
    crops = [("center", 0)] if spec.crop == "center" else [("random", i) for i in range(spec.crop_variants)]
    flips = [False, True] if spec.flip else [False]
    rng_base = int(image_hash[:12], 16) ^ spec.seed
    return [(mode, rng_base + i, flip) for mode, i in crops for flip in flips]


class _Encoder:
    """Encodes pixel variants through the latent cache, batching misses per bucket."""

    def __init__(self, vae, cache, vae_fp, stats):
        self.vae, self.cache, self.vae_fp, self.stats = vae, cache, vae_fp, stats
        self.pending: dict[tuple, list] = {}
        self.results: dict[str, torch.Tensor] = {}

    def request(self, key: str, pixels: torch.Tensor) -> None:
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            self.stats.latent_cache_hits += 1
            self.results[key] = cached
        else:
            items = self.pending.setdefault(tuple(pixels.shape), [])
            items.append((key, pixels))
            if len(items) == _ENCODE_CHUNK:  # encode as chunks fill: pixels of a whole dataset would not fit in memory
                self._encode(items)
                items.clear()

    def flush(self) -> None:
        for items in self.pending.values():
            if items:
                self._encode(items)
        self.pending.clear()

    def _encode(self, chunk: list) -> None:
        self.stats.vae_encode_calls += 1
        latents = self.vae.encode(torch.stack([p for _, p in chunk])).cpu().float()
        for (key, _), latent in zip(chunk, latents):
            self.results[key] = latent
            if self.cache is not None:
                self.cache.put(key, latent)


def _prepare_entries(spec, entries, encoder, vae_fp, conditions=None):
    """Queue every variant of every entry for encoding; return per-entry (keys, masks, extras).

    `conditions` (pairs.ConditionSource): each variant's condition image, resized, cropped and flipped like it."""
    prepared = []
    for entry in entries:
        image, alpha = open_rgb(entry.path)
        condition_image = conditions.image_for(entry, image) if conditions is not None else None
        condition_pixels = []
        mask_image = None
        if spec.masked_loss:
            mask_image = load_mask(entry.mask_path, image.size) if entry.mask_path else alpha
        image_hash = caches.content_hash(entry.path)
        try:
            bucket, resized = _bucket_for(spec, image.size)
        except ValueError as exc:  # the bucket maths names its own arguments: say which image and node inputs
            raise ValueError(f"{entry.path}: {exc}. Turn off `no_upscale`, lower `bucket_step`, or remove the image."
                             if spec.no_upscale else f"{entry.path}: {exc}") from exc
        keys, masks, pixels = [], [], []
        for mode, rng_seed, flip in _variants(spec, image_hash):
            crop, offset = bucketing.resize_and_crop(image, bucket, crop=mode, rng=random.Random(rng_seed),
                                                     resized_size=resized)
            if flip:
                crop = ImageOps.mirror(crop)
            settings = {"bucket": list(bucket), "resized": list(resized), "offset": list(offset), "flip": flip,
                        "resize": _RESIZE_VERSION}
            key = encoder.cache.key(image_hash, vae_fp, settings) if encoder.cache else f"{image_hash}:{settings}"
            variant_pixels = _to_pixels(crop)
            encoder.request(key, variant_pixels)
            keys.append(key)
            if spec.keep_pixels:
                pixels.append(variant_pixels)
            if condition_image is not None:
                condition_crop, _ = bucketing.resize_and_crop(condition_image, bucket, crop=mode, rng=random.Random(rng_seed),
                                                              resized_size=resized)
                condition_pixels.append(_to_pixels(ImageOps.mirror(condition_crop) if flip else condition_crop))
            if mask_image is not None:
                mask = bucketing.resize_mask_like(mask_image, image.size, bucket, offset, resized_size=resized)
                mask = ImageOps.mirror(mask) if flip else mask
                masks.append(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0))
        extras = {"pixels": pixels} if spec.keep_pixels else {}
        if condition_image is not None:
            extras["condition"] = condition_pixels
        prepared.append((entry, keys, masks or None, extras))
    return prepared


def _encode_texts(clip, captions, text_cache, clip_fp, stats) -> dict[str, list]:
    out = {}
    for caption in dict.fromkeys(captions):
        key = text_cache.key(caption, clip_fp) if text_cache is not None else None
        conditioning = text_cache.get(key) if key else None
        if conditioning is not None:
            stats.text_cache_hits += 1
        else:
            stats.text_encode_calls += 1
            conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
            if key:
                try:
                    text_cache.put(key, conditioning)
                except ValueError as exc:
                    log.debug("caption encoding not cached: %s", exc)
        out[caption] = conditioning
    return out


def _samples(prepared, encoder, conditionings) -> list[TrainSample]:
    samples = []
    for entry, keys, masks, extras in prepared:
        latents = [encoder.results[k] for k in keys]
        if masks is not None:  # loss weights at latent resolution
            size = tuple(latents[0].shape[-2:])
            masks = [F.interpolate(m[None, None], size=size, mode="area")[0, 0] for m in masks]
        sample = TrainSample(latents=latents, caption=entry.caption, source=str(entry.path),
                             conditioning=conditionings.get(entry.caption), masks=masks, extras=extras)
        samples.extend([sample] * entry.repeats)
    return samples


def build_training_data(spec: DatasetSpec, vae, clip) -> tuple[TrainingData, BuildStats]:
    """Scan, bucket and encode a dataset (and its class images); return it with what it cost."""
    started = time.perf_counter()
    stats = BuildStats()
    scan = scan_dataset(spec.folder, trigger_word=spec.trigger_word, instance_prompt=spec.instance_prompt,
                        caption_choices=spec.captions.caption_choices)
    if spec.masked_loss and not any(e.mask_path or e.has_alpha for e in scan.entries):
        raise ValueError(f"`masked_loss` is on but no image in {spec.folder!r} has a mask (a name_mask.png beside it) "
                         "or transparency: add masks, or turn masked_loss off (it would train unmasked).")
    class_entries = []
    if spec.class_folder:
        class_entries = scan_dataset(spec.class_folder, instance_prompt=spec.class_prompt).entries
        if spec.class_count:  # a generated folder also holds the images of an earlier, larger `count`
            class_entries = sorted(class_entries, key=lambda e: e.path.name)[:spec.class_count]
    stats.images, stats.skipped = len(scan.entries), len(scan.skipped)
    root = spec.cache_root or caches.default_cache_root()
    vae_fp = caches.vae_fingerprint(vae) if spec.use_cache else ""
    latent_cache = caches.LatentCache(Path(root)) if spec.use_cache else None
    encoder = _Encoder(vae, latent_cache, vae_fp, stats)
    conditions = None
    if spec.condition is not None:
        from .pairs import ConditionSource
        conditions = ConditionSource(spec.condition, spec.folder, scan.entries)
    prepared = _prepare_entries(spec, scan.entries, encoder, vae_fp, conditions)
    prepared_class = _prepare_entries(spec, class_entries, encoder, vae_fp)
    encoder.flush()
    conditionings = {}
    if clip is not None:
        text_cache = caches.TextEncodingCache(Path(root)) if spec.use_cache else None
        clip_fp = caches.clip_fingerprint(clip) if spec.use_cache else ""
        # A caption with alternatives is encoded per drawn variant during training, never as written.
        with_choices = {e.caption for e, *_ in prepared + prepared_class
                        if spec.captions.caption_choices and has_choices(e.caption)}
        if with_choices:
            log.info("dataset: %d caption(s) with alternatives (several lines or {a|b}): each draw uses one",
                     len(with_choices))
        captions = [e.caption for e, *_ in prepared + prepared_class if e.caption not in with_choices]
        conditionings = _encode_texts(clip, captions, text_cache, clip_fp, stats)
    data = TrainingData(
        samples=_samples(prepared, encoder, conditionings), resolution=(spec.resolution, spec.resolution),
        clip_key=clip_identity(clip) if clip is not None else None,
        settings={"folder": spec.folder, "resolution": spec.resolution, "flip": spec.flip, "crop": spec.crop,
                  "images": len(scan.entries), "class_images": len(class_entries)},
        class_samples=_samples(prepared_class, encoder, conditionings), caption_options=spec.captions, spec=spec)
    stats.seconds = time.perf_counter() - started
    log.info("dataset: %s", stats)
    return data, stats
