"""IP-Adapter files in the official layout: read (safetensors, or the original .bin weights-only) and write."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import safe_open

from ..ipadapter.adapter import AdapterSpec, spec_from_state_dict
from .safetensors_io import save_new_safetensors


def _flatten(obj: dict) -> dict[str, torch.Tensor]:
    """The original .bin nests {"image_proj": {...}, "ip_adapter": {...}}; safetensors files are flat."""
    flat = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _flatten(value).items()})
        elif isinstance(value, torch.Tensor):
            flat[key] = value
    return flat


def load_ipadapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], AdapterSpec]:
    """(state dict, metadata, detected spec); raises ValueError naming `ipadapter` when unreadable or foreign."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                metadata = dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise ValueError(f"`ipadapter` {path.name} is not a readable safetensors file ({exc}).") from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as exc:
            raise ValueError(f"`ipadapter` {path.name} cannot be read safely: it is not a plain tensor file (loading it "
                             "would run pickled code). Use the .safetensors release of the adapter or convert it.") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"`ipadapter` {path.name} holds a {type(obj).__name__}, not an IP-Adapter state dict.")
        state, metadata = _flatten(obj), {}
    try:
        spec = spec_from_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"`ipadapter` {path.name}: {exc}") from None
    return state, metadata, spec


def ipadapter_metadata(spec: AdapterSpec, **fields) -> dict[str, str]:
    """String metadata: the adapter's shape plus training facts (base model, steps, job...)."""
    meta = {"personalize.ipadapter.spec": json.dumps(spec.to_dict()), "ipadapter.variant": spec.variant,
            "ipadapter.base_model": spec.family, "ipadapter.clip_vision_width": str(spec.embed_dim),
            "ipadapter.tokens": str(spec.tokens)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    return meta


def save_ipadapter(folder: str | Path, stem: str, state: dict[str, torch.Tensor], metadata: dict[str, str],
                   dtype: str = "fp16") -> Path:
    """Write a new `folder/stem[_NNNNN].safetensors` (never overwrites), flat official keys."""
    spec_from_state_dict(state)  # refuse to write something our loader would not read
    return save_new_safetensors(folder, stem, state, metadata, dtype=dtype)
