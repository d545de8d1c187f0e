"""Fixtures on the real ComfyUI runtime: in-process (``comfy_runtime``) and over HTTP (``comfy_server``).

``harness.runtime.prepare()`` runs here, at import, so that ``COMFYUI_PATH`` is first on ``sys.path``
and ComfyUI is set to the CPU and a temp base directory before any test module imports ``comfy.*``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import cached_tiny_checkpoint, install_model, make_base_dir, make_sample_dataset
from harness import runtime as _runtime

RUNTIME_BASE_DIR = _runtime.prepare()

TINY_CHECKPOINT = "tiny-sd15-taesd.safetensors"
TINY_CHECKPOINT_FULL_VAE = "tiny-sd15-fullvae.safetensors"


@pytest.fixture(scope="session")
def comfy_runtime():
    """ComfyUI booted in this process (``harness.runtime.ComfyRuntime``), with the pack loaded
    from ``<base>/custom_nodes/ComfyUI-Personalize``. One per session: ComfyUI's registries are
    process-global."""
    rt = _runtime.boot(init_api_nodes=True)
    yield rt


@pytest.fixture(scope="session")
def server_base_dir(tmp_path_factory) -> Path:
    """The base directory of the session's server (exists before the server starts, so models
    can be placed in it)."""
    return make_base_dir(tmp_path_factory.mktemp("comfy-server"))


@pytest.fixture(scope="session")
def comfy_server(server_base_dir):
    """``python main.py --cpu`` on 127.0.0.1 (``harness.server.ComfyServer``), one per session,
    killed at the end. Its log: ``comfy_server.log_text()``."""
    from harness.server import ComfyServer

    server = ComfyServer.start(server_base_dir)
    try:
        yield server
    finally:
        server.stop()
        if os.environ.get("PERSONALIZE_KEEP_TMP"):
            print(f"\nComfyUI server log kept at {server.log_path}")


def _install_everywhere(source: Path, name: str, server_base_dir: Path) -> str:
    install_model(RUNTIME_BASE_DIR, "checkpoints", source, name)
    install_model(server_base_dir, "checkpoints", source, name)
    return name


@pytest.fixture(scope="session")
def tiny_checkpoint(server_base_dir) -> str:
    """File name of the tiny SD1.5 checkpoint (TAESD VAE) in ``models/checkpoints`` of both the
    in-process runtime and the server (a link to the cached build)."""
    return _install_everywhere(cached_tiny_checkpoint("taesd"), TINY_CHECKPOINT, server_base_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint_full_vae(server_base_dir) -> str:
    """Like ``tiny_checkpoint`` but with the full SD KL-VAE (``ch_mult`` [1, 2, 4, 4])."""
    return _install_everywhere(cached_tiny_checkpoint("full"), TINY_CHECKPOINT_FULL_VAE, server_base_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint_path() -> Path:
    """Path of the cached TAESD tiny checkpoint file (for tests that load it directly)."""
    return cached_tiny_checkpoint("taesd")


@pytest.fixture
def sample_dataset(tmp_path) -> Path:
    """A folder with 6 64x64 PNGs of the 'sks cross' subject and same-name .txt captions."""
    folder = tmp_path / "dataset"
    make_sample_dataset(folder, n=6, size=64, seed=0, subject="sks")
    return folder



@pytest.fixture(scope="session")
def pack(comfy_runtime):
    """The pack's engine modules as ComfyUI loaded them (attribute per module)."""
    class Pack:
        loop = comfy_runtime.pack_import("trainers.loop")
        job = comfy_runtime.pack_import("trainers.job")
        optim = comfy_runtime.pack_import("trainers.optim")
        methods = comfy_runtime.pack_import("trainers.methods")
        progress = comfy_runtime.pack_import("trainers.progress")
        model_runtime = comfy_runtime.pack_import("trainers.model_runtime")
        dataset_nodes = comfy_runtime.pack_import("nodes.dataset")
        build = comfy_runtime.pack_import("trainers.data.build")
        captions = comfy_runtime.pack_import("trainers.data.captions")
    return Pack


@pytest.fixture(scope="session")
def base(tiny_checkpoint_path):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded by ComfyUI's own loader under inference mode
    as the executor loads it."""
    import torch
    import comfy.sd
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=True,
                                                                    output_clip=True)
    return model, clip, vae
