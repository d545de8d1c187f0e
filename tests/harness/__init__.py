"""Test harness on the real ComfyUI runtime (no mocks of ComfyUI).

* ``harness.runtime``: ComfyUI in this process (``ComfyRuntime.run_prompt``, events, log).
* ``harness.server``: ``python main.py --cpu`` in a subprocess (``ComfyServer.queue``/``wait``,
  ``/ws`` events, ``/history``, ``interrupt``, its log file).
* ``scripts/tiny_model.py`` and ``scripts/sample_images.py`` are re-exported here.
* Shared helpers: base directories laid out like ComfyUI's, the pack linked into
  ``custom_nodes/``, the errors ``run_prompt``/``wait`` raise, and the files an output wrote.

Import order matters: ``harness.runtime.prepare()`` must run before anything imports ``comfy.*``
(``tests/conftest.py`` calls it when pytest imports it).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = REPO_ROOT / "scripts"
PACK_DIR_NAME = "ComfyUI-Personalize"
# Folders a ComfyUI base directory has (models/<kind> for the kinds tests touch).
MODEL_KINDS = ("checkpoints", "loras", "embeddings", "hypernetworks", "controlnet", "vae", "clip_vision")
BASE_SUBDIRS = ("custom_nodes", "input", "output", "temp", "user")

if str(SCRIPTS_DIR) not in sys.path:
    sys.path.append(str(SCRIPTS_DIR))

from tiny_model import build_tiny_sd15_checkpoint, cached_tiny_checkpoint, find_comfyui  # noqa: E402
from sample_images import make_sample_dataset  # noqa: E402


class PromptError(RuntimeError):
    """A prompt did not run to success. ``details`` holds ComfyUI's own error record."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class PromptValidationError(PromptError):
    """``validate_prompt`` (or ``POST /prompt``) refused the graph; see ``details["node_errors"]``."""


class PromptExecutionError(PromptError):
    """A node raised; ``details`` is the ``execution_error`` message (node_id, node_type,
    exception_type, exception_message, traceback)."""

    @property
    def node_id(self):
        return self.details.get("node_id")

    @property
    def exception_message(self):
        return self.details.get("exception_message", "")


class PromptInterrupted(PromptError):
    """The prompt was interrupted (``execution_interrupted``)."""


def execution_error_message(data: dict) -> str:
    tb = "".join(data.get("traceback") or [])
    return (
        f"node {data.get('node_id')} ({data.get('node_type')}) raised "
        f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}"
    )


def validation_error_message(error: dict, node_errors: dict) -> str:
    lines = [f"{error.get('message', 'invalid prompt')}: {error.get('details', '')}".rstrip(": ")]
    for node_id, ne in (node_errors or {}).items():
        for reason in ne.get("errors", []):
            lines.append(f"  node {node_id} ({ne.get('class_type')}): {reason.get('message')}: {reason.get('details')}")
    return "\n".join(lines)


def make_base_dir(base) -> Path:
    """Create the ComfyUI base-directory layout (models/<kind>, input, output, temp, ...)."""
    base = Path(base)
    for sub in BASE_SUBDIRS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    for kind in MODEL_KINDS:
        (base / "models" / kind).mkdir(parents=True, exist_ok=True)
    return base


def link_pack(base) -> Path:
    """Symlink this repository as ``<base>/custom_nodes/ComfyUI-Personalize`` (as users install it)."""
    link = Path(base) / "custom_nodes" / PACK_DIR_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == REPO_ROOT:
            return link
        raise RuntimeError(f"{link} exists and is not a link to {REPO_ROOT}")
    os.symlink(REPO_ROOT, link, target_is_directory=True)
    return link


def install_model(base, kind: str, source, name: str | None = None) -> str:
    """Make ``source`` visible as ``<base>/models/<kind>/<name>`` (a symlink); return ``name``."""
    source = Path(source).resolve()
    name = name or source.name
    dest = Path(base) / "models" / kind / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        if dest.resolve() == source:
            return name
        dest.unlink()
    os.symlink(source, dest)
    return name


def image_paths(entry: dict, base_dir, node_id: str | None = None) -> list[Path]:
    """Files that output nodes reported (``images``/``gifs``/...) in a run result or /history entry.

    ``entry`` is ``{"outputs": {node_id: {"images": [{"filename", "subfolder", "type"}]}}}``;
    ``type`` "output"/"temp"/"input" maps to that folder of ``base_dir``.
    """
    base_dir = Path(base_dir)
    paths = []
    for nid, out in (entry.get("outputs") or {}).items():
        if node_id is not None and str(nid) != str(node_id):
            continue
        for items in out.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and "filename" in item and item.get("type") in ("output", "temp", "input"):
                    paths.append(base_dir / item["type"] / item.get("subfolder", "") / item["filename"])
    return paths


def txt2img_graph(ckpt_name: str, *, positive: str = "a photo of sks cross", negative: str = "",
                  width: int = 64, height: int = 64, steps: int = 2, seed: int = 0, cfg: float = 7.0,
                  sampler: str = "euler", scheduler: str = "normal", prefix: str = "personalize_test") -> dict:
    """Stock API-format graph: CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage ->
    KSampler -> VAEDecode -> SaveImage. Node ids: "1" loader, "2"/"3" text, "4" latent, "5" sampler,
    "6" decode, "7" save."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


__all__ = [
    "txt2img_graph",
    "REPO_ROOT",
    "PACK_DIR_NAME",
    "build_tiny_sd15_checkpoint",
    "cached_tiny_checkpoint",
    "find_comfyui",
    "make_sample_dataset",
    "PromptError",
    "PromptExecutionError",
    "PromptInterrupted",
    "PromptValidationError",
    "image_paths",
    "install_model",
    "link_pack",
    "make_base_dir",
]
