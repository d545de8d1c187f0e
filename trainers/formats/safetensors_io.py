"""safetensors files with metadata, written atomically to a new name."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .files import write_new_file

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_new_safetensors(folder: str | Path, stem: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                         dtype: str = "fp16") -> Path:
    """Write `tensors` (cast to `dtype`) with string `metadata` to `folder/stem[_NNNNN].safetensors`."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"`save_dtype` must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}.")
    cast = {k: v.detach().to("cpu", SAVE_DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    return write_new_file(folder, stem, ".safetensors", lambda tmp: save_file(cast, str(tmp), metadata=meta))
