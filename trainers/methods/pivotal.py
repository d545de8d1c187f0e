"""Pivotal tuning: a textual-inversion token and a LoRA trained together (diffusers' advanced
DreamBooth-LoRA recipe). Composed of the two methods, not a copy: the LoRA trains throughout at the
job's learning rate, the token vectors at their own rate for the first `embedding_fraction` of the
steps (diffusers' `train_text_encoder_ti_frac`), through the loop's per-group lr and train fraction.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from . import Attached, TrainingMethod, register_method
from .lora import LoraMethod
from .textual_inversion import TextualInversionMethod


@register_method("pivotal")
class PivotalMethod(TrainingMethod):
    """LoRA (kohya export) + new token vectors (embedding export)."""

    def __init__(self, lora: dict | None = None, embedding: dict | None = None, embedding_lr: float = 5e-4,
                 embedding_fraction: float = 0.5):
        if not embedding_lr > 0:
            raise ValueError(f"`embedding_lr` must be positive, got {embedding_lr}.")
        if not 0.0 < float(embedding_fraction) <= 1.0:
            raise ValueError(f"`embedding_fraction` must be in (0, 1], got {embedding_fraction}: the share of the "
                             "steps during which the token vectors train (0.5 in diffusers).")
        embedding = {"captions": "captions", **(embedding or {}), "lr": float(embedding_lr),
                     "train_fraction": float(embedding_fraction)}
        self.lora = LoraMethod(**(lora or {}))
        self.embedding = TextualInversionMethod(**embedding)

    def attach(self, model, clip, generator):
        if clip is None:
            raise ValueError("pivotal tuning trains a token in the text encoder: connect the checkpoint's CLIP.")
        self.embedding.check_token(clip)
        with_lora = self.lora.attach(model, clip, generator)
        with_token = self.embedding.attach(with_lora.model, with_lora.clip, generator)
        return Attached(model=with_token.model, clip=with_token.clip, groups=with_lora.groups + with_token.groups,
                        trains_text_encoder=True,
                        trained_words=None if with_lora.trains_text_encoder else with_token.trained_words)

    def base_behaviour(self) -> AbstractContextManager[None]:
        # The token acts only in captions that use it; class captions do not, so the LoRA is all there is to bypass.
        return self.lora.base_behaviour()

    def trainable_state_dict(self):
        return {**{f"lora.{k}": v for k, v in self.lora.trainable_state_dict().items()},
                **{f"embedding.{k}": v for k, v in self.embedding.trainable_state_dict().items()}}

    def load_trainable_state_dict(self, state):
        self.lora.load_trainable_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        self.embedding.load_trainable_state_dict({k[10:]: v for k, v in state.items() if k.startswith("embedding.")})

    def finish(self) -> None:
        self.lora.finish()
        self.embedding.finish()

    def export(self) -> dict[str, Any]:
        """{"lora": kohya state dict, "embedding": {encoder key: [vectors, width]}}."""
        return {"lora": self.lora.export(), "embedding": self.embedding.export()}

    def describe(self):
        return {**{f"lora_{k}": v for k, v in self.lora.describe().items()},
                **{f"embedding_{k}": v for k, v in self.embedding.describe().items()}}
