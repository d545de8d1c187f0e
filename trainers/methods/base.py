"""The contract every training method implements; the loop knows nothing else about methods."""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ParamGroup:
    """Trainable tensors that share a learning rate.

    `role` ("main" or "text_encoder") picks the job's learning rate unless `lr` overrides it;
    `train_fraction` < 1 trains the group only for that first fraction of the steps (e.g. pivotal
    tuning's embeddings, DreamBooth's text encoder), its learning rate being 0 afterwards.
    `in_text_encoder`: the tensors act inside the text encoder (token embeddings), as a "text_encoder"
    group's do; once every such group has stopped, the loop encodes captions without gradients.
    """

    params: list[torch.nn.Parameter]
    role: str = "main"
    name: str = ""
    lr: float | None = None
    train_fraction: float = 1.0
    in_text_encoder: bool = False

    @property
    def acts_in_text_encoder(self) -> bool:
        return self.in_text_encoder or self.role == "text_encoder"


@dataclass
class Attached:
    """What `attach` hands the loop: the patched MODEL/CLIP clones and the trainable groups."""

    model: Any
    clip: Any | None
    groups: list[ParamGroup] = field(default_factory=list)
    trains_text_encoder: bool = False
    # When the text path trains nothing but these new words (textual inversion, pivotal without a text-encoder LoRA):
    # captions without them encode exactly as the frozen CLIP does, so they are encoded once, without gradients.
    trained_words: tuple[str, ...] | None = None


class TrainingMethod(ABC):
    """A method decides what trains, how it is attached to a MODEL/CLIP clone, and how it is exported."""

    name: str = ""

    @abstractmethod
    def attach(self, model, clip, generator: torch.Generator) -> Attached:
        """Attach trainable weights to clones of `model`/`clip` (the inputs are never mutated)."""

    @abstractmethod
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by a stable name (for checkpoints and resume)."""

    @abstractmethod
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore tensors written by `trainable_state_dict`; raise ValueError on a mismatch."""

    def detach(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Undo anything attach() did outside the clones (default: nothing)."""

    def finish(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """After the last step: switch trained modules to inference behaviour (default: nothing)."""

    def batch_extra(self, samples: list, picks: list[int], generator: torch.Generator) -> dict | None:
        """Per-batch additions to the denoiser's cond entry (e.g. {"control": ...}), or per-batch state for
        the method's own patches (e.g. image embeddings of `sample.extras`); `picks[i]` is the variant of
        `samples[i]` in this batch. Default: nothing."""
        return None

    @contextlib.contextmanager
    def base_behaviour(self) -> Iterator[None]:
        """While active, the attached clones compute what the untrained base does (the trained weights are
        bypassed, nothing is copied): the teacher of the loop's `prior_target`="base_model". A method that
        cannot bypass its weights raises ValueError."""
        raise ValueError(f"the {self.name or type(self).__name__} method cannot switch its trained weights off, so "
                         "`prior_target`='base_model' does not apply to it: use prior_target 'images'.")
        yield  # pragma: no cover

    @abstractmethod
    def export(self) -> Any:
        """The trained artifact in memory (e.g. a kohya LoRA state dict)."""

    def describe(self) -> dict[str, Any]:
        """Settings recorded in checkpoints and artifact metadata."""
        return {}
