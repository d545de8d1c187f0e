"""Prompt alignment: keep the other words of a prompt working on the learned subject ("a green sks dog").

A subject learned from a few images binds what those images share (their colour, their style) to the
identifier, and a prompt that asks for something else gets a blend of both. Alignment distils what the base
model does with the other words into the trained model. For an alignment prompt P ("a green sks dog"), its base
form P_b (the identifier removed: "a green dog") and the class prompt C (the subject prompt without the
identifier: "a dog"), the trained model's prediction for P on a noisy subject image is pulled towards

    trained(x_t, S) + guidance * (base(x_t, P_b) - base(x_t, C))

its own prediction for the subject prompt S ("a sks dog") plus the base model's direction for the added words.
This is the training target of concept sliders and ESD (Gandikota et al., 2023) with the personalized subject
as the starting point; composable diffusion (Liu et al., 2022) makes the same sum at inference time. The target
is a regression target on the model's own inputs (no sampled images, as in score-distillation methods like
PALP), so it adds no noise of its own to the run: one extra forward/backward pass and three forward passes
without gradients per step.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field

import torch

from . import distributed, objectives


def _without(prompt: str, identifier: str) -> str:
    return " ".join(re.sub(rf"(?<!\S){re.escape(identifier)}(?!\S)", " ", prompt).split())


def _has_word(prompt: str, word: str) -> bool:
    return re.search(rf"(?<!\S){re.escape(word)}(?!\S)", prompt) is not None


@dataclass
class PromptAlignment:
    """What prompt alignment trains: prompts with the subject whose other words must keep working."""

    subject_prompt: str = field(metadata={"help": "The prompt that draws the subject, e.g. 'a sks dog'."})
    identifier: str = field(metadata={"help": "The word that names the subject in the prompts, e.g. 'sks' (or the "
                                              "trigger word of textual inversion / pivotal tuning)."})
    prompts: tuple[str, ...] = field(metadata={"help": "Prompts with the identifier and other words that must keep "
                                                       "their meaning, e.g. 'a blue sks dog', 'a sks dog in the snow'."})
    guidance: float = field(default=3.0, metadata={"help": "How strongly the other words act on the subject: the "
                                                           "base model's direction for them is scaled by this (1 = as "
                                                           "much as on the base model's own class; more lets them win "
                                                           "over what the subject images share)."})
    weight: float = field(default=1.0, metadata={"help": "Weight of the alignment loss next to the training loss."})

    def __post_init__(self):
        self.identifier = self.identifier.strip()
        self.subject_prompt = self.subject_prompt.strip()
        self.prompts = tuple(p.strip() for p in self.prompts if p.strip())
        if not self.identifier or len(self.identifier.split()) != 1:
            raise ValueError(f"prompt alignment: `identifier` must be one word (e.g. 'sks'), got {self.identifier!r}.")
        if not _has_word(self.subject_prompt, self.identifier):
            raise ValueError(f"prompt alignment: `subject_prompt` {self.subject_prompt!r} does not contain the "
                             f"identifier {self.identifier!r}: write the prompt that draws the subject, e.g. "
                             f"'a {self.identifier} dog'.")
        if not self.prompts:
            raise ValueError("prompt alignment: `prompts` is empty: give one prompt per line, each with the identifier "
                             f"and the words that must keep working, e.g. 'a blue {self.identifier} dog'.")
        missing = [p for p in self.prompts if not _has_word(p, self.identifier)]
        if missing:
            raise ValueError(f"prompt alignment: the prompt {missing[0]!r} does not contain the identifier "
                             f"{self.identifier!r}: every alignment prompt is about the subject.")
        if not self.guidance >= 0:
            raise ValueError(f"prompt alignment: `guidance` must be 0 or more, got {self.guidance}.")
        if not self.weight > 0:
            raise ValueError(f"prompt alignment: `weight` must be positive, got {self.weight}.")

    @property
    def class_prompt(self) -> str:
        return _without(self.subject_prompt, self.identifier)

    def base_prompt(self, prompt: str) -> str:
        """The prompt as the base model reads it: without the identifier ('a blue sks dog' -> 'a blue dog')."""
        return _without(prompt, self.identifier)

    def to_dict(self) -> dict:
        return {**asdict(self), "prompts": list(self.prompts)}

    @classmethod
    def from_dict(cls, data: dict) -> PromptAlignment:
        return cls(**{**data, "prompts": tuple(data.get("prompts", ()))})


def teacher(method, attached) -> Callable[[], AbstractContextManager[None]]:
    """The context in which the attached clones compute what the base model does, for the base prompts.

    Methods that train only new words (textual inversion) leave the UNet as it is, and the base prompts do not
    use the words: the clones already are the base for them. Every other method switches its weights off."""
    if attached.trained_words is not None and all(g.acts_in_text_encoder for g in attached.groups):
        return contextlib.nullcontext
    try:
        with method.base_behaviour():
            pass
    except ValueError:
        raise ValueError(f"prompt alignment needs the base model's predictions, and the {method.name} method cannot "
                         "switch its trained weights off to give them: disconnect the alignment input.") from None
    return method.base_behaviour


def _generator(seed: int, micro_step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_033 + micro_step * 104_729 + 91) % (2**63))


def alignment_loss(alignment: PromptAlignment, stream, micro_step: int, job, base, base_model, model_sampling,
                   denoiser, conditioner, autocast, device) -> torch.Tensor:
    """The alignment loss of one micro step, on the noisy subject images of the instance stream's batch; `base` is
    the context from `teacher`. Prompts are encoded as written (no caption rewrite: write the identifier as the
    trained CLIP reads it, e.g. the token of textual inversion)."""
    generator = _generator(job.seed, micro_step)
    indices = stream.sampler.indices(micro_step)
    samples = [stream.samples[i] for i in indices]
    picks = [int(u * len(s.latents)) for s, u in zip(samples, torch.rand(len(samples), generator=generator).tolist())]
    chosen = [alignment.prompts[int(u * len(alignment.prompts))]
              for u in torch.rand(len(samples), generator=generator).tolist()]
    latents = base_model.process_latent_in(torch.stack([s.latents[p] for s, p in zip(samples, picks)]).float().to(device))
    noised = objectives.add_noise(model_sampling, latents, generator, timestep_range=job.timestep_range)
    global_count, part = len(samples), distributed.shard(len(samples))
    samples, chosen, noised = samples[part], chosen[part], distributed.take(noised, part)
    if not samples:
        return distributed.empty_loss(device)
    n, latent = len(samples), samples[0].latent
    with torch.no_grad(), autocast:
        subject = denoiser(noised.noisy, noised.sigmas, conditioner.batch([alignment.subject_prompt] * n, samples, latent,
                                                                           rewrite=False),
                          None).float()
        with base():
            base_conds = conditioner.batch([alignment.base_prompt(p) for p in chosen] + [alignment.class_prompt] * n,
                                           samples + samples, latent, rewrite=False)
            base_pred = denoiser(torch.cat([noised.noisy] * 2), torch.cat([noised.sigmas] * 2), base_conds, None).float()
    target = subject + alignment.guidance * (base_pred[:n] - base_pred[n:])
    with autocast:
        denoised = denoiser(noised.noisy, noised.sigmas, conditioner.batch(list(chosen), samples, latent, rewrite=False),
                             None)
    model_pred, target = objectives.prediction_space(model_sampling, denoised.float(), target, noised.noisy, noised.sigmas)
    losses = objectives.per_sample_loss(model_pred, target, job.loss_type, job.huber_delta)
    if job.min_snr_gamma > 0:
        losses = losses * objectives.min_snr_weights(model_sampling, noised.sigmas, job.min_snr_gamma).to(losses)
    return alignment.weight * distributed.shard_loss(losses, global_count)
