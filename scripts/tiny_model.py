"""Tiny random-weight SD1.5 checkpoints for tests.

The files have the real single-file SD1.5 layout, so ComfyUI's stock ``CheckpointLoaderSimple``
(``comfy.sd.load_checkpoint_guess_config``) detects them as ``SD15`` and loads every key:

* UNet under ``model.diffusion_model.``: ``model_channels`` 320 and ``context_dim`` 768 (what SD1.x
  detection keys on), one level (``channel_mult`` [1]), one res-block, transformer depth 1 and no
  middle block (~18.7M parameters).
* The full CLIP-L text encoder under ``cond_stage_model.transformer.text_model.`` (its config is
  fixed by ``comfy/sd1_clip_config.json``; missing weights would stay uninitialised).
* The VAE under ``first_stage_model.``: either TAESD (``taesd_encoder.*``/``taesd_decoder.*``,
  2.4M parameters) or the full SD KL-VAE (``ch_mult`` [1, 2, 4, 4], the layout users have; ComfyUI
  reads a [1, 2, 4] VAE as the x4-upscaler VAE with a 4x, not 8x, downscale).

Key names and shapes come from ComfyUI's own module classes, built on the ``meta`` device, so they
match the ComfyUI in use. Weights are seeded and sensible (norm weights 1, biases 0, fan-in scaled
normal elsewhere), so the model runs without NaN. Stored in fp16.

Usage: ``python scripts/tiny_model.py OUT.safetensors [--vae taesd|full] [--seed N]`` (needs
``COMFYUI_PATH`` or a ComfyUI above this checkout, as ``scripts/bootstrap.sh`` finds it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# Bump when the layout or the initialisation changes: cached files are keyed by it.
TINY_VERSION = "v1"

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # + "text_model.*"
VAE_PREFIX = "first_stage_model."

UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": -2,  # -2: no middle block (what detection reports for its absence)
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_heads": 8,
    "num_head_channels": -1,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

FULL_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

VAE_KINDS = ("taesd", "full")


def find_comfyui() -> Path:
    """COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this checkout, else the cache."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    repo = Path(__file__).resolve().parent.parent
    if repo.parent.name == "custom_nodes":
        candidates.append(repo.parent.parent)
    cache = Path(os.environ.get("PERSONALIZE_CACHE", Path.home() / ".cache" / "comfyui-personalize"))
    candidates.append(cache / "ComfyUI")
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir() and (c / "nodes.py").is_file():
            return c.resolve()
    raise RuntimeError(
        "ComfyUI not found: set COMFYUI_PATH to a ComfyUI v0.3.64 checkout "
        "(or run `. scripts/bootstrap.sh`)."
    )


def ensure_comfy_importable() -> None:
    """Put ComfyUI on sys.path; choose the CPU if ComfyUI's model management is not set up yet."""
    if "comfy" not in sys.modules:
        path = str(find_comfyui())
        if path not in sys.path:
            sys.path.insert(0, path)
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        args.cpu = True


def _meta_modules(vae: str):
    """ComfyUI's own UNet, CLIP-L and VAE modules on the meta device, with checkpoint prefixes."""
    ensure_comfy_importable()
    import torch
    import comfy.ops
    import comfy.clip_model
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    clip_config_path = Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json"
    clip_config = json.loads(clip_config_path.read_text())
    with torch.device("meta"):
        unet = UNetModel(**UNET_CONFIG, dtype=torch.float32, device="meta", operations=ops)
        clip = comfy.clip_model.CLIPTextModel(clip_config, torch.float32, "meta", ops)
        if vae == "taesd":
            import comfy.taesd.taesd

            vae_module = comfy.taesd.taesd.TAESD(latent_channels=4)
        elif vae == "full":
            from comfy.ldm.models.autoencoder import AutoencoderKL

            vae_module = AutoencoderKL(ddconfig=dict(FULL_VAE_DDCONFIG), embed_dim=4)
        else:
            raise ValueError(f"vae must be one of {VAE_KINDS}, got {vae!r}")
    # The SD1 checkpoint layout keeps only the text model (ComfyUI drops text_projection and
    # logit_scale when it saves SD1 checkpoints and does not expect them when it loads).
    return [(UNET_PREFIX, unet), (CLIP_PREFIX + "text_model.", clip.text_model), (VAE_PREFIX, vae_module)]


def _init_tensor(module, pname: str, shape, gen):
    import torch

    if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        return torch.ones(shape) if pname == "weight" else torch.zeros(shape)
    if pname == "bias":
        return torch.zeros(shape)
    if pname == "vae_scale":
        return torch.ones(shape)
    if pname == "vae_shift":
        return torch.zeros(shape)
    if isinstance(module, torch.nn.Embedding):
        return torch.randn(shape, generator=gen) * 0.02
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=gen) * (1.0 / math.sqrt(fan_in))
    return torch.randn(shape, generator=gen) * 0.02


def tiny_sd15_state_dict(vae: str = "taesd", seed: int = 0) -> dict:
    """The tiny checkpoint's tensors (fp16, CPU), deterministic for a given seed and ComfyUI."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, root in _meta_modules(vae):
        for mname, module in root.named_modules():
            for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if p is None:
                    continue
                key = prefix + (f"{mname}.{pname}" if mname else pname)
                sd[key] = _init_tensor(module, pname, tuple(p.shape), gen).to(torch.float16).contiguous()
    return sd


def build_tiny_sd15_checkpoint(path, vae: str = "taesd", seed: int = 0) -> Path:
    """Write a tiny random-weight SD1.5 checkpoint (safetensors, fp16) to ``path``; return it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = tiny_sd15_state_dict(vae=vae, seed=seed)
    metadata = {
        "personalize.tiny_version": TINY_VERSION,
        "personalize.tiny_vae": vae,
        "personalize.tiny_seed": str(seed),
    }
    save_file(sd, str(path), metadata=metadata)
    return path


def cache_dir() -> Path:
    base = Path(os.environ.get("PERSONALIZE_CACHE", Path.home() / ".cache" / "comfyui-personalize"))
    return base / "tiny"


def cached_tiny_checkpoint(vae: str = "taesd", seed: int = 0) -> Path:
    """The tiny checkpoint from ``$PERSONALIZE_CACHE/tiny/``, built once (atomically) if absent."""
    if vae not in VAE_KINDS:
        raise ValueError(f"vae must be one of {VAE_KINDS}, got {vae!r}")
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"tiny-sd15-{vae}-s{seed}-{TINY_VERSION}.safetensors"
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        build_tiny_sd15_checkpoint(tmp, vae=vae, seed=seed)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, target)  # atomic: a concurrent builder's identical file may win, fine
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="output .safetensors file")
    parser.add_argument("--vae", choices=VAE_KINDS, default="taesd")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = build_tiny_sd15_checkpoint(a.path, vae=a.vae, seed=a.seed)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.0f} MiB, vae={a.vae}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
