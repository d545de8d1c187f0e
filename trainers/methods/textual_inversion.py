"""Textual inversion: a new pseudo-word learned in the text encoders' input-embedding space.

The word gets `vectors` trainable rows per text encoder (SD1/SD2: one, SDXL: `clip_l` and `clip_g`);
every weight of the model and the text encoders stays frozen. The rows reach the encoder the way
stock ComfyUI feeds a loaded `embedding:name` file: ComfyUI's tokenizers accept tensors in a token
list and `SDClipModel.process_tokens` splices them between the word embeddings. A clone of the CLIP
gets a tokenizer copy that maps the word (and `embedding:<word>`) to the rows, so training, the
returned CLIP and a saved file read by stock `CLIPTextEncode` all compute the same conditioning.
Why not new vocabulary rows (diffusers): ComfyUI's tokenizer has no added-token mechanism and the
embedding table is shared by every clone of the CLIP.
"""
from __future__ import annotations

import copy
import re
import types
from dataclasses import dataclass, field
from typing import Literal

import torch
from comfy.sd1_clip import SDTokenizer

from ..data.cache import clip_words
from . import Attached, ParamGroup, TrainingMethod, register_method

CaptionSource = Literal["object", "style", "captions"]

# Prompt templates in the spirit of the textual-inversion paper's (our own wording).
OBJECT_TEMPLATES = (
    "a photo of {}", "a photo of the {}", "a close-up photo of {}", "a cropped photo of {}", "a good photo of {}",
    "a bright photo of the {}", "a dark photo of the {}", "a photo of a small {}", "a photo of a large {}",
    "a rendering of {}", "a picture of {}", "an image of the {}", "a clean photo of {}", "a blurry photo of the {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a picture in the style of {}", "an illustration in the style of {}",
    "artwork in the style of {}", "a rendering in the style of {}", "a drawing in the style of {}",
    "a beautiful painting in the style of {}", "a landscape in the style of {}", "a portrait in the style of {}",
    "a still life in the style of {}", "a cropped painting in the style of {}", "a detailed sketch in the style of {}",
)
_TOKEN_CHARS = re.compile(r"^[\w<>\-.~*]+$")
MAX_VECTORS = 75  # one CLIP chunk holds 75 tokens besides start/end


@dataclass
class TextualInversionConfig:
    token: str = field(default="<concept>", metadata={"help": "The new pseudo-word, e.g. '<my-cat>': a word the CLIP does not know yet. Prompts use it as is (with the returned CLIP) or as embedding:<file name>."})
    vectors: int = field(default=4, metadata={"help": "Vectors (CLIP tokens) of the word: more capture more detail and use more of the 75-token prompt."})
    init_word: str = field(default="*", metadata={"help": "Word the vectors start from, e.g. the class ('cat'); several tokens are spread over the vectors (each starts from the mean of its share); empty = random."})
    captions: CaptionSource = field(default="object", metadata={"help": "Training prompts: 'object' or 'style' templates ('a photo of {}', 'a painting in the style of {}'), or the dataset's captions with the trigger word replaced by the token."})
    trigger: str = field(default="", metadata={"help": "Word of the dataset captions that the token replaces (captions mode); captions without it get the token prepended."})
    lr: float | None = field(default=None, metadata={"help": "Learning rate of the vectors (None: the job's learning rate)."})
    train_fraction: float = field(default=1.0, metadata={"help": "Train the vectors for this first fraction of the steps only (pivotal tuning)."})

    def __post_init__(self):
        self.token = str(self.token).strip()
        # A final "." would be read as the sentence's full stop in a prompt (the lookup strips it): never found.
        if not self.token or not _TOKEN_CHARS.match(self.token) or self.token.lower().startswith("embedding") \
                or self.token.endswith("."):
            raise ValueError(f"`token`={self.token!r} must be one word of letters, digits and <>-_.~* (no spaces, "
                             "commas, colons or brackets, not ending in '.'), such as '<my-cat>'.")
        if not 1 <= int(self.vectors) <= MAX_VECTORS:
            raise ValueError(f"`vectors` must be between 1 and {MAX_VECTORS}, got {self.vectors}. Use 1-8.")
        self.vectors = int(self.vectors)
        if self.captions not in CaptionSource.__args__:
            raise ValueError(f"`captions` must be one of {CaptionSource.__args__}, got {self.captions!r}.")
        if not 0.0 < float(self.train_fraction) <= 1.0:
            raise ValueError(f"`train_fraction` must be in (0, 1], got {self.train_fraction}.")
        if self.trigger.strip().lower() == self.token.lower():
            self.trigger = ""


def sub_tokenizers(tokenizer) -> dict[str, SDTokenizer]:
    """The CLIP tokenizer's per-encoder tokenizers by embedding key (`clip_l`, `clip_h`, `clip_g`)."""
    return {t.embedding_key: t for t in vars(tokenizer).values() if isinstance(t, SDTokenizer)}


def encoder_tables(clip) -> dict[str, torch.Tensor]:
    """Input-embedding weight [vocab, width] of each text encoder, by the tokenizer's embedding key."""
    tables = {}
    for key, tok in sub_tokenizers(getattr(clip.tokenizer, "_personalize_base", clip.tokenizer)).items():
        encoder = getattr(clip.cond_stage_model, key, None)
        if encoder is None or not hasattr(encoder, "transformer"):
            raise ValueError(f"this CLIP has no text encoder `{key}` for its tokenizer: textual inversion supports "
                             "CLIP text encoders (SD1.x, SD2.x, SDXL).")
        weight = encoder.transformer.get_input_embeddings().weight
        if weight.shape[1] != tok.embedding_size:
            raise ValueError(f"text encoder `{key}` is {weight.shape[1]} wide but its tokenizer expects {tok.embedding_size}.")
        tables[key] = weight
    if not tables:
        raise ValueError("this CLIP has no CLIP-style tokenizer: textual inversion supports SD1.x, SD2.x and SDXL.")
    return tables


def word_ids(tok: SDTokenizer, text: str) -> list[int]:
    """Token ids of `text` without start/end tokens."""
    ids = tok.tokenizer(text)["input_ids"]
    return ids[tok.tokens_start:-1] if tok.tokenizer_adds_end_token else ids[tok.tokens_start:]


def initial_vectors(table: torch.Tensor, ids: list[int], n: int, generator: torch.Generator) -> torch.Tensor:
    """n starting vectors: vector i is the mean of its share of the init word's token rows (a share
    is at least one row, so few tokens repeat); no ids: random with the table's spread."""
    table = table.detach().float().cpu()
    if not ids:
        return torch.randn((n, table.shape[1]), generator=generator) * table.std()
    rows, k = table[ids], len(ids)
    out = []
    for i in range(n):
        lo = i * k // n
        out.append(rows[lo:max((i + 1) * k // n, lo + 1)].mean(0))
    return torch.stack(out)


def token_pattern(tokens) -> re.Pattern:
    """The pseudo-words as whole words, not already behind `embedding:`."""
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(rf"(?<![\w:])(?:{alternatives})(?!\w)", re.IGNORECASE)


def _sub_with_words(sub: SDTokenizer, words: dict[str, torch.Tensor]) -> SDTokenizer:
    """A copy of one encoder's tokenizer whose `embedding:<word>` lookup knows `words` first."""
    out = copy.copy(sub)
    if out.embedding_directory is None:
        out.embedding_directory = []  # turns on `embedding:` parsing; other names still resolve to nothing
    stock_lookup = types.MethodType(type(sub)._try_get_embedding, out)

    def lookup(name_and_rest: str):
        parts = name_and_rest.split(maxsplit=1)
        if parts:
            core = parts[0].rstrip(",.;!?")
            vectors = words.get(core.lower())
            if vectors is not None:
                rest = parts[1] if len(parts) > 1 else ""
                return vectors, f"{parts[0][len(core):]} {rest}".strip()
        return stock_lookup(name_and_rest)

    out._try_get_embedding = lookup
    return out


def with_words(clip, words: dict[str, dict[str, torch.Tensor]]):
    """A clone of `clip` that knows pseudo-words: {word: {encoder key: [n, width]}} (plus those it knew).

    The word in a prompt, or `embedding:<word>`, becomes the vectors exactly as a loaded embedding
    file would; the input CLIP and its tokenizer are not modified.
    """
    out = clip.clone()
    base = getattr(clip.tokenizer, "_personalize_base", clip.tokenizer)
    known = {**clip_words(clip), **{w.lower(): v for w, v in words.items()}}
    tokenizer = copy.copy(base)
    for attr, sub in vars(base).items():
        if isinstance(sub, SDTokenizer):
            setattr(tokenizer, attr, _sub_with_words(sub, {w: v[sub.embedding_key] for w, v in known.items()
                                                           if sub.embedding_key in v}))
    stock_tokenize = tokenizer.tokenize_with_weights  # the class method, bound to the copy
    pattern = token_pattern(known)

    def tokenize_with_weights(text: str, return_word_ids=False, **kwargs):
        return stock_tokenize(pattern.sub(lambda m: f" embedding:{m.group(0)} ", text), return_word_ids, **kwargs)

    tokenizer.tokenize_with_weights = tokenize_with_weights
    tokenizer._personalize_base, tokenizer._personalize_words = base, known
    out.tokenizer = tokenizer
    return out


@register_method("textual_inversion")
class TextualInversionMethod(TrainingMethod):
    """New token vectors per text encoder; exported as {encoder key: [vectors, width]}."""

    def __init__(self, **options):
        self.config = TextualInversionConfig(**options)
        self.vectors: dict[str, torch.nn.Parameter] = {}

    def check_token(self, clip) -> None:
        """Refuse a token the vocabulary already has (it would take over an existing word)."""
        token = self.config.token
        if token.lower() in clip_words(clip):
            raise ValueError(f"`token` {token!r} is already an embedding of this CLIP: pick another word.")
        for tok in sub_tokenizers(getattr(clip.tokenizer, "_personalize_base", clip.tokenizer)).values():
            ids = word_ids(tok, token)
            if len(ids) == 1:
                raise ValueError(f"`token` {token!r} already exists in the CLIP vocabulary (token id {ids[0]}): "
                                 f"training it would change every prompt that uses the word. Pick a new word such "
                                 f"as '<{token.strip('<>')}>'.")

    def attach(self, model, clip, generator):
        if clip is None:
            raise ValueError("textual inversion trains token vectors in the text encoder: connect the checkpoint's CLIP.")
        cfg = self.config
        self.check_token(clip)
        base_tokenizers = sub_tokenizers(getattr(clip.tokenizer, "_personalize_base", clip.tokenizer))
        device = clip.patcher.load_device
        self.vectors = {}
        for key, table in encoder_tables(clip).items():
            ids = word_ids(base_tokenizers[key], cfg.init_word) if cfg.init_word.strip() else []
            start = initial_vectors(table, ids, cfg.vectors, generator)
            self.vectors[key] = torch.nn.Parameter(start.to(device))
        clip = with_words(clip, {cfg.token: dict(self.vectors)})
        clip.personalize_caption_transform = self.training_captions
        group = ParamGroup(list(self.vectors.values()), "main", "embedding", lr=cfg.lr, train_fraction=cfg.train_fraction,
                           in_text_encoder=True)
        return Attached(model=model.clone(), clip=clip, groups=[group], trains_text_encoder=True,
                        trained_words=(cfg.token,))

    def training_captions(self, captions: list[str]) -> list[str]:
        """The prompts a batch trains on. Templates are drawn from the global RNG, which the loop seeds
        per micro step, so a resumed run draws the same ones."""
        cfg = self.config
        if cfg.captions == "captions":
            return [self._with_token(c) for c in captions]
        templates = OBJECT_TEMPLATES if cfg.captions == "object" else STYLE_TEMPLATES
        picks = torch.randint(len(templates), (len(captions),)).tolist()
        return [templates[i].format(cfg.token) for i in picks]

    def _with_token(self, caption: str) -> str:
        cfg = self.config
        if not caption.strip():
            return caption  # a dropped caption stays unconditional
        if cfg.trigger.strip():
            trigger = re.compile(rf"(?<!\w){re.escape(cfg.trigger.strip())}(?!\w)", re.IGNORECASE)
            if trigger.search(caption):
                return trigger.sub(lambda _: cfg.token, caption)
        if token_pattern([cfg.token]).search(caption):
            return caption
        return f"{cfg.token}, {caption}"

    def trainable_state_dict(self):
        return {key: v.detach().clone() for key, v in self.vectors.items()}

    def load_trainable_state_dict(self, state):
        if set(state) != set(self.vectors):
            raise ValueError(f"the embedding state has encoders {sorted(state)}, this CLIP has {sorted(self.vectors)}: "
                             "it was trained on another model family.")
        for key, param in self.vectors.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(f"the embedding state for `{key}` is {tuple(state[key].shape)}, this run trains "
                                 f"{tuple(param.shape)}: use the same `vectors`.")
            with torch.no_grad():
                param.copy_(state[key])

    def finish(self) -> None:
        for param in self.vectors.values():
            param.requires_grad_(False)

    def export(self) -> dict[str, torch.Tensor]:
        return {key: v.detach().to("cpu", torch.float32).clone() for key, v in self.vectors.items()}

    def trained_clip(self, clip):
        """A clone of `clip` that knows the trained token (frozen copies of the vectors)."""
        return with_words(clip, {self.config.token: self.export()})

    def describe(self):
        cfg = self.config
        return {"token": cfg.token, "vectors": cfg.vectors, "init_word": cfg.init_word, "captions": cfg.captions,
                "encoders": sorted(self.vectors)}
