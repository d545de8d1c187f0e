"""Resumable training state: trainable weights, optimizer, scheduler, step and job, in one file.

Written with `torch.save` of tensors and plain values only and read back with
`weights_only=True`, so a checkpoint from elsewhere cannot run code when loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .formats.files import atomic_output

FORMAT = "comfyui-personalize.resume/1"


def save_state(path: Path, *, job: dict, method_state: dict[str, torch.Tensor], optimizer: dict, scheduler: dict,
               global_step: int, loss_history: list[float], extra: dict[str, Any] | None = None) -> Path:
    state = {
        "format": FORMAT,
        "job": json.dumps(job, sort_keys=True),
        "global_step": global_step,
        "method_state": {k: v.detach().cpu().clone() for k, v in method_state.items()},
        "optimizer": optimizer,
        "scheduler": scheduler,
        "loss_history": [float(x) for x in loss_history],
        "extra": json.dumps(extra or {}),
    }
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(state, tmp)
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely; raise ValueError with what to do when it is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"resume checkpoint {str(path)!r} does not exist. Pick a file from the run's checkpoints folder.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs code, or a corrupt file
        raise ValueError(f"{path.name} is not a readable training checkpoint ({type(exc).__name__}: {exc}). "
                         "Only checkpoints written by this pack can be resumed.") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not a ComfyUI-Personalize training checkpoint. To continue a LoRA file, "
                         "use it as the initial LoRA instead.")
    state["job"] = json.loads(state["job"])
    state["extra"] = json.loads(state.get("extra", "{}"))
    return state


def prune(folder: Path, keep: int, pattern: str = "step_*.pt") -> None:
    """Keep the newest `keep` periodic checkpoints of a run."""
    files = sorted(folder.glob(pattern))
    for old in files[:-keep] if keep > 0 else files:
        old.unlink(missing_ok=True)
