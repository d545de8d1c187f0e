"""safetensors files with metadata, written atomically to a new name."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from .files import write_new_file

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_new_safetensors(folder: str | Path, stem: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                         dtype: str = "fp16") -> Path:
    """Write `tensors` (cast to `dtype`) with string `metadata` to `folder/stem[_NNNNN].safetensors`."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"`save_dtype` must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}.")
    cast = {k: v.detach().to("cpu", SAVE_DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    if any(k.startswith("ss_") for k in meta):
        meta.update(addnet_hashes(cast, meta))
    return write_new_file(folder, stem, ".safetensors", lambda tmp: save_file(cast, str(tmp), metadata=meta))


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """kohya's `sshs_model_hash` / `sshs_legacy_hash`, by which A1111's additional-networks and model sites index a
    LoRA: sha256 of the file's tensor data (what follows the header), and sha256 of 64 KiB at 1 MiB into the file
    as written with only the `ss_` metadata. Computed from the tensors as they are saved (dtype included)."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}
