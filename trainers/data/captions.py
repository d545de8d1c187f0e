"""Per-step caption augmentation with kohya-ss/sd-scripts semantics.

kohya's ``BaseDataset.process_caption`` (``library/train_util.py``), in this order:

1. Caption dropout: with probability ``caption_dropout`` the whole caption becomes ``""`` (the
   model then also learns the unconditional case, useful for CFG).
2. Caption choices (kohya's ``enable_wildcard``, OneTrainer's one-caption-per-line files): a caption of
   several lines uses one line, chosen at random, and each ``{a|b|c}`` picks one of its options.
3. Then, only when shuffling or tag dropout is on, the caption is split on ``","`` into
   stripped tags; the first ``keep_tokens`` tags (or everything before ``keep_tokens_separator``)
   stay fixed at the front, the rest are shuffled and then each dropped with probability
   ``tag_dropout``; the tags are joined again with ``", "``.

With neither shuffling nor dropout the caption passes through untouched (so ``keep_tokens`` on its
own changes nothing, as in kohya). Randomness comes only from the ``random.Random`` passed in;
``caption_rng`` makes one per (seed, epoch, sample) so a resumed run sees the same captions.

Pure Python; no ComfyUI imports.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

__all__ = ["CaptionOptions", "TAG_SEPARATOR", "caption_lines", "caption_rng", "choose_caption", "has_choices", "is_identity",
           "process_caption"]

TAG_SEPARATOR = ","
JOINER = ", "
_CHOICE = re.compile(r"\{([^{}]*\|[^{}]*)\}")  # {a|b|c}; braces without a '|' are left as written


@dataclass
class CaptionOptions:
    """How captions are augmented each time a sample is drawn (kohya's dataset caption options)."""

    shuffle_tags: bool = field(default=False, metadata={"help": (
        "Shuffle the comma-separated tags of each caption every time it is used, so the model does"
        " not learn their order. Tags kept by keep_tokens stay in front.")})
    keep_tokens: int = field(default=0, metadata={"help": (
        "Number of leading comma-separated tags (e.g. the trigger word) that are never shuffled or"
        " dropped. Has no effect unless shuffle or tag dropout is on.")})
    tag_dropout: float = field(default=0.0, metadata={"help": (
        "Probability (0-1) of dropping each non-kept tag of a caption, independently, every time"
        " it is used.")})
    caption_dropout: float = field(default=0.0, metadata={"help": (
        "Probability (0-1) of replacing the whole caption with an empty one, so the model also"
        " learns the unconditional case. Applied before tag processing.")})
    keep_tokens_separator: str = field(default="", metadata={"help": (
        "Optional marker such as '|||' that splits a caption into fixed and shuffled parts instead"
        " of keep_tokens: tags before it stay fixed; a second marker starts fixed trailing tags."
        " Empty: use keep_tokens.")})
    caption_choices: bool = field(default=True, metadata={"help": (
        "Captions with alternatives: a caption file of several lines uses one line, chosen at random each time"
        " the image is drawn, and {a|b|c} in a caption picks one option (kohya's enable_wildcard). Off: the"
        " caption is used as written.")})

    def __post_init__(self):
        for name in ("shuffle_tags", "caption_choices"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            raise ValueError(f"`keep_tokens` must be an integer >= 0, got {self.keep_tokens!r}")
        for name in ("tag_dropout", "caption_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}")
            setattr(self, name, float(value))
        if not isinstance(self.keep_tokens_separator, str):
            raise ValueError(f"`keep_tokens_separator` must be a string, got {self.keep_tokens_separator!r}")
        marker = self.keep_tokens_separator
        if marker and (not marker.strip() or marker.strip() == TAG_SEPARATOR):
            raise ValueError(
                f"`keep_tokens_separator` must be empty or a marker other than whitespace and"
                f" {TAG_SEPARATOR!r}, got {marker!r}")

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field ``name`` (for node tooltips)."""
        for f in fields(cls):
            if f.name == name:
                return f.metadata["help"]
        raise KeyError(name)


def caption_lines(caption: str) -> list[str]:
    """The non-blank lines of a caption, stripped (one line: the caption itself)."""
    return [line.strip() for line in caption.splitlines() if line.strip()]


def has_choices(caption: str) -> bool:
    """True when the caption offers alternatives: several lines, or a ``{a|b}`` group."""
    return len(caption_lines(caption)) > 1 or _CHOICE.search(caption) is not None


def is_identity(options: CaptionOptions, captions: Iterable[str] = ()) -> bool:
    """True when ``process_caption`` returns each of ``captions`` unchanged, so callers can skip it."""
    if options.caption_choices and any(has_choices(caption) for caption in captions):
        return False
    return (not options.shuffle_tags and options.tag_dropout == 0.0 and options.caption_dropout == 0.0
            and not options.keep_tokens_separator)


def choose_caption(caption: str, rng: random.Random) -> str:
    """One line of a several-line caption, and one option of each ``{a|b}`` group; the rng is only
    consumed by captions that have alternatives."""
    lines = caption_lines(caption)
    if len(lines) > 1:
        caption = lines[rng.randrange(len(lines))]
    return _CHOICE.sub(lambda match: rng.choice(match.group(1).split("|")).strip(), caption)


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A ``random.Random`` determined by (``seed``, ``epoch``, ``index``) alone: the same triple
    gives the same stream in any process or Python run, so a resumed run reproduces captions."""
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"`{name}` must be an integer, got {value!r}")
    digest = hashlib.sha256(f"personalize-captions:{seed}:{epoch}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def _tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(TAG_SEPARATOR) if tag.strip()]


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """One augmented draw of ``caption`` (kohya's order: caption dropout, caption choices, then keep /
    shuffle / tag dropout). Deterministic for a given ``rng`` state; ``rng`` is only consumed for the
    features that are on."""
    if options.caption_dropout > 0.0 and rng.random() < options.caption_dropout:
        return ""
    if options.caption_choices:
        caption = choose_caption(caption, rng)

    separator = options.keep_tokens_separator
    if separator and separator in caption:
        fixed_part, flexible_part = caption.split(separator, 1)
        flexible_part, _, suffix_part = flexible_part.partition(separator)
        fixed, flexible, suffix = _tags(fixed_part), _tags(flexible_part), _tags(suffix_part)
    elif options.shuffle_tags or options.tag_dropout > 0.0:
        tags = _tags(caption)
        fixed, flexible, suffix = tags[:options.keep_tokens], tags[options.keep_tokens:], []
    else:
        return caption

    if options.shuffle_tags:
        rng.shuffle(flexible)
    if options.tag_dropout > 0.0:
        flexible = [tag for tag in flexible if rng.random() >= options.tag_dropout]
    return JOINER.join(fixed + flexible + suffix)

