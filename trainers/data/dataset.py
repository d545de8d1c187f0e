"""The in-memory training set the loop consumes, and the deterministic batch order."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class TrainSample:
    latent: torch.Tensor  # [C, h, w], raw VAE latent (the model's process_latent_in is applied later)
    caption: str
    source: str
    latent_flipped: torch.Tensor | None = None  # present when horizontal flip is on
    conditioning: list | None = None  # CONDITIONING from the dataset's CLIP


@dataclass
class TrainingData:
    """Samples (with kohya repeats already expanded) plus what produced them."""

    samples: list[TrainSample]
    resolution: tuple[int, int]
    clip_key: tuple | None = None
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def tag_frequency(self) -> dict[str, int]:
        """How often each comma-separated tag occurs in the captions (kohya's ss_tag_frequency)."""
        counts = Counter()
        for sample in self.samples:
            counts.update(t.strip() for t in sample.caption.split(",") if t.strip())
        return dict(counts)

    def latent_shapes(self) -> set[tuple]:
        return {tuple(s.latent.shape) for s in self.samples}


def clip_identity(clip) -> tuple:
    """Identifies a CLIP and its patches: conditionings from an equal key are interchangeable."""
    return (id(clip.cond_stage_model), clip.patcher.patches_uuid, id(clip.patcher.weight_wrapper_patches) if clip.patcher.weight_wrapper_patches else None)


def encode_captions(clip, captions: list[str]) -> list[list]:
    """CONDITIONING for each caption, through the CLIP's own scheduled encode (hooks included)."""
    cache: dict[str, list] = {}
    out = []
    for caption in captions:
        if caption not in cache:
            tokens = clip.tokenize(caption)
            cache[caption] = clip.encode_from_tokens_scheduled(tokens)
        out.append(cache[caption])
    return out


class BatchSampler:
    """Batches as a pure function of (seed, micro step): a shuffled pass over the data per epoch.

    Resuming at any step needs nothing but the step number, and two runs with one seed see the
    same batches in the same order.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < 1:
            raise ValueError("the dataset is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._epochs: dict[int, list[int]] = {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epochs = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._epochs[epoch]

    def indices(self, micro_step: int) -> list[int]:
        start = micro_step * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.size)
            out.append(self._epoch(epoch)[offset])
        return out
