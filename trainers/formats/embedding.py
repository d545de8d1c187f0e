"""Textual-inversion embedding files in the layouts stock ComfyUI reads for `embedding:name`.

`comfy/sd1_clip.py: load_embed` (called by each text encoder's tokenizer with its own
`embedding_key`) takes, from a safetensors file, the tensor under that key (`clip_l`, `clip_g`) or,
failing that, the first tensor: so one text encoder (SD1.x `clip_l`, SD2.x `clip_h`) is written as
A1111's single tensor `emb_params` [n_vectors, width], and SDXL as `{"clip_l": [n, 768],
"clip_g": [n, 1280]}` (A1111/kohya SDXL layout). The A1111 `.pt` dict (`string_to_param`) is an
option for other tools; it holds tensors and plain values only, so weights-only loaders read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .files import atomic_output, unique_path

SINGLE_KEY = "emb_params"
FORMATS = ("safetensors", "a1111_pt")


@dataclass
class TrainedEmbedding:
    """A trained token in memory: its vectors per text encoder, the word it was trained as, and metadata."""

    vectors: dict[str, torch.Tensor]
    token: str
    step: int = 0
    metadata: dict[str, str] = field(default_factory=dict)


def file_tensors(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The safetensors layout for per-encoder vectors ({"clip_l": [n, 768], ...})."""
    if not vectors:
        raise ValueError("the embedding is empty: connect the embedding output of a textual-inversion node.")
    cast = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vectors.items()}
    if len(cast) == 1:
        return {SINGLE_KEY: next(iter(cast.values()))}
    return cast


def a1111_dict(vectors: dict[str, torch.Tensor], name: str, step: int) -> dict:
    """AUTOMATIC1111's `.pt` embedding dict (one text encoder only: A1111 writes SDXL as safetensors)."""
    if len(vectors) != 1:
        raise ValueError(f"`format`=a1111_pt holds one text encoder, this embedding has {sorted(vectors)}: "
                         "save SDXL embeddings as safetensors.")
    tensor = next(iter(vectors.values())).detach().to("cpu", torch.float32).contiguous()
    # 265 is the id A1111 writes for its "*" placeholder; loaders only read the tensor.
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name": name, "step": int(step),
            "sd_checkpoint": None, "sd_checkpoint_name": None}


def write_embedding(path: Path, vectors: dict[str, torch.Tensor], fmt: str, *, name: str, step: int,
                    metadata: dict[str, str]) -> None:
    """Write `vectors` to the new file `path` atomically (never overwriting)."""
    with atomic_output(path) as tmp:
        if fmt == "safetensors":
            save_file(file_tensors(vectors), str(tmp), metadata={str(k): str(v) for k, v in metadata.items()})
        elif fmt == "a1111_pt":
            torch.save(a1111_dict(vectors, name, step), tmp)
        else:
            raise ValueError(f"`format` must be one of {FORMATS}, got {fmt!r}.")


# What a prompt's `embedding:name` finds (comfy/sd1_clip.py load_embed): the name itself, then these suffixes in
# order. A new embedding's name must be free under all of them, or the prompt word would load another file.
PROMPT_SUFFIXES = ("", ".safetensors", ".pt", ".bin")


def suffix_of(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {fmt!r}.")
    return ".safetensors" if fmt == "safetensors" else ".pt"


def free_stem(targets: list[tuple[Path, str]], stem: str) -> str:
    """A stem (`stem`, `stem_00001`, ...) free in every (folder, suffix): matching names across folders."""
    for counter in range(100_000):
        candidate = stem if counter == 0 else f"{stem}_{counter:05d}"
        if all(unique_path(folder, candidate, suffix).name == f"{candidate}{suffix}" for folder, suffix in targets):
            return candidate
    raise FileExistsError(f"no free name for {stem}")
