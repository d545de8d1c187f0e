"""Captions to model conditioning during training: per-step caption variants, memoized encodes,
an optional on-disk text-encoder cache, and gradients when the text encoder trains."""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from .data.cache import clip_words
from .data.dataset import TrainSample, clip_identity, encode_captions
from .model_runtime import batch_model_conds, encode_sample_conds

log = logging.getLogger("comfyui-personalize")


class CaptionConditioner:
    """Model conds for a batch of captions.

    With a frozen text encoder each distinct caption is encoded once per run (and, with a disk
    cache, once ever): a caption the dataset already encoded with this CLIP is reused as is.
    A training text encoder is run on every step with gradients and nothing is cached, except for captions that
    do not use the trained words when only new words train (textual inversion, pivotal): those encode as the
    frozen CLIP does, once.
    Memos are keyed by caption and latent size: model conds can depend on the image size (SDXL's size
    conditioning), so one caption in two buckets has two entries. They keep the `memo_entries` most recently used
    captions: caption shuffle or dropout makes a new variant nearly every step, and SDXL conds are ~0.6 MB each on
    the training device, so an unbounded memo would fill it over a long run.
    """

    memo_entries = 256

    def __init__(self, patcher, clip, device, *, trains_text_encoder: bool, text_cache=None, clip_fp: str | None = None,
                 dataset_clip_key=None, trained_words: tuple[str, ...] | None = None):
        self.patcher, self.clip, self.device = patcher, clip, device
        self.trains_text_encoder = trains_text_encoder
        # Only these new words train (see Attached.trained_words): other captions take the frozen path.
        self.trained_words = tuple(w.lower() for w in trained_words) if trained_words is not None else None
        self.text_cache, self.clip_fp = text_cache, clip_fp
        identity = clip_identity(clip) if clip is not None else None
        self.reuse_dataset_conds = clip is None or dataset_clip_key == identity
        # A textual-inversion CLIP (new words, else its source's weights and patches; the identity's last item) encodes
        # a caption without its words exactly as a dataset built with the stock source did: those encodes still hold.
        self._words = tuple(clip_words(clip)) if clip is not None else ()
        self._reuse_without_words = (not self.reuse_dataset_conds and bool(self._words) and dataset_clip_key is not None
                                     and dataset_clip_key[:-1] == identity[:-1] and dataset_clip_key[-1] == "")
        self._memo: OrderedDict[tuple, dict] = OrderedDict()
        # The untrained base's conds (the teacher of prior_target="base_model"), apart from the trained path's:
        # once the text path has trained, the same caption encodes differently there.
        self._base_memo: OrderedDict[tuple, dict] = OrderedDict()
        self.text_path_trains = trains_text_encoder  # ever, unlike trains_text_encoder, which stops
        self.encode_calls = 0
        # A method may rewrite each batch's captions on its CLIP clone (textual inversion: templates, trigger -> token).
        self.caption_transform = getattr(clip, "personalize_caption_transform", None)

    def _remember(self, memo: OrderedDict, key: tuple, conds: dict) -> dict:
        memo[key] = conds
        while len(memo) > self.memo_entries:
            memo.popitem(last=False)
        return conds

    @staticmethod
    def _key(caption: str, latent: torch.Tensor) -> tuple:
        return caption, tuple(latent.shape[-2:])

    @staticmethod
    def _recall(memo: OrderedDict, key: tuple) -> dict | None:
        conds = memo.get(key)
        if conds is not None:
            memo.move_to_end(key)
        return conds

    def _on_device(self, model_conds: dict) -> dict:
        return {k: c._copy_with(c.cond.to(self.device)) for k, c in model_conds.items()}

    def _encode(self, caption: str) -> list:
        if self.clip is None:
            raise ValueError("captions change during training (caption shuffle/dropout) but no CLIP is connected: "
                             "connect the checkpoint's CLIP to the training node.")
        key = None
        if self.text_cache is not None and self.clip_fp and not self.trains_text_encoder:
            key = self.text_cache.key(caption, self.clip_fp)
            cached = self.text_cache.get(key)
            if cached is not None:
                return cached
        self.encode_calls += 1
        with torch.no_grad():  # a frozen (or stopped) text path: no graph to keep in the memo
            conditioning = encode_captions(self.clip, [caption])[0]
        if key is not None:
            try:
                self.text_cache.put(key, conditioning)
            except ValueError as exc:  # e.g. hooks in the conditioning: cannot be stored faithfully
                log.debug("text encoding not cached: %s", exc)
        return conditioning

    def _sample_conds(self, caption: str, sample: TrainSample, latent) -> dict:
        key = self._key(caption, latent)
        remembered = self._recall(self._memo, key)
        if remembered is not None:
            return remembered
        reusable = self.reuse_dataset_conds or (
            self._reuse_without_words and not any(word in caption.lower() for word in self._words))
        if reusable and sample.conditioning is not None and caption == sample.caption:
            conditioning = sample.conditioning
        else:
            conditioning = self._encode(caption)
        return self._remember(self._memo, key,
                              self._on_device(encode_sample_conds(self.patcher, conditioning, latent, self.device)))

    def stop_text_encoder_training(self) -> None:
        """The text-encoder groups have stopped: from now on encode once per caption, without gradients.
        Neither the disk cache nor the dataset's encodes know the trained text path, so both are left out."""
        if not self.trains_text_encoder:
            return
        self.trains_text_encoder = False
        self.text_cache, self.reuse_dataset_conds, self._reuse_without_words = None, False, False
        self._memo.clear()

    def batch(self, captions: list[str], samples: list[TrainSample], latent, rewrite: bool = True) -> dict:
        """Batched model conds (c_crossattn, y, ...) for the captions of one batch; `rewrite=False` skips the
        method's caption rewrite (class images keep their class prompt)."""
        if rewrite and self.caption_transform is not None:
            captions = self.caption_transform(list(captions))
        if not self.trains_text_encoder:
            return batch_model_conds([self._sample_conds(c, s, latent) for c, s in zip(captions, samples)])
        trained = [self._uses_trained_path(c) for c in captions]
        to_encode = [c for c, t in zip(captions, trained) if t]
        self.encode_calls += len(to_encode)
        encoded = iter(encode_captions(self.clip, to_encode) if to_encode else [])
        per_sample = [self._on_device(encode_sample_conds(self.patcher, next(encoded), latent, self.device)) if t
                      else self._sample_conds(c, s, latent) for c, s, t in zip(captions, samples, trained)]
        return batch_model_conds(per_sample)

    def base_batch(self, captions: list[str], samples: list[TrainSample], latent, rewrite: bool = True) -> dict:
        """`batch` as the untrained base encodes the captions: call it under the method's `base_behaviour()`.
        When the text path trains, each caption is encoded once (without gradients) and kept apart from the
        trained encodes; otherwise the two are the same and share `batch`'s memo."""
        if not self.text_path_trains:
            return self.batch(captions, samples, latent, rewrite)
        if rewrite and self.caption_transform is not None:
            captions = self.caption_transform(list(captions))
        per_sample = []
        for caption in captions:
            key = self._key(caption, latent)
            conds = self._recall(self._base_memo, key)
            if conds is None:
                self.encode_calls += 1
                with torch.no_grad():
                    conditioning = encode_captions(self.clip, [caption])[0]
                conds = self._remember(self._base_memo, key, self._on_device(
                    encode_sample_conds(self.patcher, conditioning, latent, self.device)))
            per_sample.append(conds)
        return batch_model_conds(per_sample)

    def _uses_trained_path(self, caption: str) -> bool:
        """Whether the caption must go through the training text path (with gradients, every step)."""
        if self.trained_words is None:
            return True
        lowered = caption.lower()
        return any(word in lowered for word in self.trained_words)
