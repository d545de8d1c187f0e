"""The in-memory training set the loop consumes, and the deterministic, bucket-aware batch order."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from .cache import words_fingerprint


@dataclass
class TrainSample:
    """One training image: its encoded variants (crops x flips, all one bucket size) and caption."""

    latents: list[torch.Tensor]  # each [C, h, w], raw VAE latents (process_latent_in is applied later)
    caption: str
    source: str
    conditioning: list | None = None  # CONDITIONING of `caption` from the dataset's CLIP
    masks: list[torch.Tensor] | None = None  # per variant [h, w] loss weights at latent resolution
    extras: dict = field(default_factory=dict)  # per-variant side data for methods, e.g. "pixels": [[H, W, 3]]

    @property
    def latent(self) -> torch.Tensor:
        return self.latents[0]

    @property
    def bucket(self) -> tuple[int, ...]:
        return tuple(self.latents[0].shape)


@dataclass
class TrainingData:
    """Samples (kohya repeats already expanded), optional class images, and what produced them."""

    samples: list[TrainSample]
    resolution: tuple[int, int]
    clip_key: tuple | None = None
    settings: dict = field(default_factory=dict)
    class_samples: list[TrainSample] = field(default_factory=list)  # prior preservation stream
    caption_options: object | None = None  # trainers.data.captions.CaptionOptions
    spec: object | None = None  # the DatasetSpec it was built from (rebuild with other options, e.g. keep_pixels)

    def __len__(self) -> int:
        return len(self.samples)

    def tag_frequency(self) -> dict[str, int]:
        """How often each comma-separated tag occurs in the captions (kohya's ss_tag_frequency)."""
        counts = Counter()
        for sample in self.samples:
            counts.update(t.strip() for line in sample.caption.splitlines() for t in line.split(",") if t.strip())
        return dict(counts)

    def buckets(self) -> dict[tuple, int]:
        return dict(Counter(s.bucket for s in self.samples))


def clip_identity(clip) -> tuple:
    """Identifies a CLIP and its patches: conditionings from an equal key are interchangeable. The last item is its
    trained words' fingerprint ("" for a stock tokenizer): a textual-inversion CLIP differs from its source only there."""
    patcher = clip.patcher
    wrappers = id(patcher.weight_wrapper_patches) if patcher.weight_wrapper_patches else None
    return (id(clip.cond_stage_model), patcher.patches_uuid, wrappers, clip.layer_idx, words_fingerprint(clip))


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
    """Batches as a pure function of (seed, micro step), each drawn from one bucket (kohya).

    Per epoch the indices of every bucket are shuffled and cut into batches, and the batches are
    shuffled. Resuming needs nothing but the step number; one seed gives one order.
    """

    def __init__(self, buckets: list[tuple], batch_size: int, seed: int):
        if not buckets:
            raise ValueError("the dataset is empty")
        self.batch_size, self.seed = batch_size, seed
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, bucket in enumerate(buckets):
            groups[bucket].append(index)
        self.groups = [groups[k] for k in sorted(groups)]
        self.batches_per_epoch = sum(-(-len(g) // batch_size) for g in self.groups)
        self._cache: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            generator = torch.Generator().manual_seed((self.seed * 7919 + epoch) % 2**63)  # seeds go up to 2**63
            batches = []
            for group in self.groups:
                order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
                batches.extend(order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size))
            self._cache = (epoch, [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])
        return self._cache[1]

    def short_batches(self) -> list[tuple[int, int]]:
        """(images, size of its last batch) for each bucket whose epoch ends with a batch under half the batch size."""
        return [(len(g), len(g) % self.batch_size) for g in self.groups
                if 0 < len(g) % self.batch_size < self.batch_size / 2]

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.batches_per_epoch

    def indices(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        return self._epoch(epoch)[position]
