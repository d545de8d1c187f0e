"""On-disk caches of VAE latents and caption encodings, so a dataset is encoded once across runs.

Each entry is a safetensors file named by the sha256 of a canonical JSON of everything that changes
its content (image bytes, model fingerprint, settings, caption). The file records that JSON in its
metadata and a read checks it against the key, so a file written for another model or setting is
never used: a mismatched or unreadable file counts as a miss and is deleted.

Not covered by the keys: the content of `embedding:name` files a caption names (only the name is in
the caption), and entries are never pruned: delete the folder to reclaim space.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

log = logging.getLogger("comfyui-personalize")

FORMAT_VERSION = 1
SAMPLES_PER_TENSOR = 64  # strided values hashed per tensor, besides the sum of all its bit patterns
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PLAIN = (type(None), bool, int, float, str)
_INPUTS_META = "personalize.inputs"
_CONDITIONING_META = "personalize.conditioning"


def content_hash(path) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def default_cache_root() -> Path:
    """`<dir>/cache/personalize`, where `<dir>` is the parent of ComfyUI's user directory (the
    ComfyUI base directory unless `--user-directory` moves it). Not ComfyUI's temp directory, which
    is emptied at every start."""
    import folder_paths

    get_user_directory = getattr(folder_paths, "get_user_directory", None)
    base = Path(get_user_directory()).parent if get_user_directory else Path(folder_paths.base_path)
    return base / "cache" / "personalize"


# -- fingerprints ---------------------------------------------------------------------------------

def _walk(obj, tokens: list, tensors: list) -> bool:
    """Describe `obj` as text tokens plus tensors to digest; False if something has no stable description."""
    if isinstance(obj, torch.Tensor):
        tokens.append(f"T{tuple(obj.shape)}{obj.dtype}")
        tensors.append(obj)
        return True
    if type(obj) in _PLAIN or isinstance(obj, (torch.dtype, torch.device)):
        tokens.append(f"{type(obj).__name__}:{obj!r}")
        return True
    if isinstance(obj, (list, tuple)):
        tokens.append(f"{type(obj).__name__}[{len(obj)}]")
        return all([_walk(v, tokens, tensors) for v in obj])
    if isinstance(obj, dict):
        tokens.append(f"dict[{len(obj)}]")
        return all([_walk(k, tokens, tensors) and _walk(obj[k], tokens, tensors) for k in sorted(obj, key=repr)])
    if isinstance(obj, torch.nn.Module):
        tokens.append(type(obj).__qualname__)
        return _walk(obj.state_dict(), tokens, tensors)
    import comfy.weight_adapter

    if isinstance(obj, comfy.weight_adapter.WeightAdapterBase):  # e.g. a LoRA patch: its tensors and alpha
        tokens.append(type(obj).__qualname__)
        return _walk(obj.weights, tokens, tensors)
    return False


def _digest(tokens: list, tensors: list) -> str:
    """sha256 of the tokens and, per tensor, the bit patterns of a strided sample and their integer
    sum: exact and the same on every device (a float sum would depend on the reduction order)."""
    h = hashlib.sha256("\n".join(tokens).encode())
    for t in tensors:
        flat = t.detach().reshape(-1)
        flat = flat.to(torch.uint8) if flat.dtype == torch.bool else flat
        bits = flat.view(_INT_VIEW.get(flat.element_size(), torch.int64))
        stride = max(1, bits.numel() // SAMPLES_PER_TENSOR)
        sample = bits[::stride][:SAMPLES_PER_TENSOR].to("cpu", torch.int64)
        try:  # summed as 8-byte words: any changed element changes one word, and it is much faster
            words = bits.view(torch.int64)
        except RuntimeError:  # a size or offset not a multiple of 8 bytes
            words = bits
        total = torch.sum(words, dtype=torch.int64).to("cpu").reshape(1)
        h.update(torch.cat([total, sample]).numpy().tobytes())
    return h.hexdigest()


def _weights(module: torch.nn.Module) -> dict:
    """state_dict less the text projection of CLIPs that never use it (SD1's): ComfyUI does not load
    it, so it holds uninitialised memory that differs at every load."""
    import comfy.sd1_clip

    weights = module.state_dict()
    for name, sub in module.named_modules():
        if isinstance(sub, comfy.sd1_clip.SDClipModel) and not sub.options_default[2]:
            weights.pop(f"{name}.transformer.text_projection.weight".lstrip("."), None)
    return weights


def model_fingerprint(module: torch.nn.Module) -> str:
    """Identifies a module's weights: every state_dict key, shape and dtype plus sampled values and
    the sum of each tensor's values, so a change to any single weight changes it."""
    tokens, tensors = [], []
    _walk(_weights(module), tokens, tensors)
    return _digest(tokens, tensors)


def _runtime_tokens(device, dtype=None) -> list[str]:
    """What changes outputs without changing weights: code versions, device type, compute dtype."""
    import comfyui_version

    return [f"comfyui={comfyui_version.__version__}", f"torch={torch.__version__}",
            f"device={torch.device(device).type}", f"dtype={dtype}"]


def _patcher_tokens(patcher, tokens: list, tensors: list) -> None:
    """The patcher's original weights (a loaded clone may have patched them in place: its backup
    holds them) and its patches. Raises ValueError for state that has no stable description."""
    if patcher.forced_hooks is not None or patcher.hook_patches:
        raise ValueError("hooks change encodings per step: not cacheable")
    weights = _weights(patcher.model)
    for key, saved in [*patcher.backup.items(), *patcher.hook_backup.items()]:
        if key in weights:
            weights[key] = saved[0]
    _walk(weights, tokens, tensors)
    if not _walk(patcher.patches, tokens, tensors):
        tokens.append(f"patches_uuid={patcher.patches_uuid}")  # unique, so safe; valid this session only
    for name in ("object_patches", "weight_wrapper_patches"):
        if not _walk(getattr(patcher, name), tokens, tensors):
            raise ValueError(f"cannot fingerprint the patcher's {name}: not cacheable")


def vae_fingerprint(vae) -> str:
    """Fingerprint of a ComfyUI VAE: the weights of `vae.first_stage_model`, its patches, dtype and device."""
    tokens, tensors = ["vae", *_runtime_tokens(vae.device, vae.vae_dtype)], []
    _patcher_tokens(vae.patcher, tokens, tensors)
    return _digest(tokens, tensors)


def sampling_fingerprint(model, clip, vae) -> str:
    """What images sampled from MODEL/CLIP/VAE depend on besides the sampler settings: every weight, patch (with
    its values: a LoRA at another strength differs) and object patch (e.g. v-prediction) of the three.
    Raises ValueError where something has no stable description (hooks, functions in the model options)."""
    tokens, tensors = ["sampling", *_runtime_tokens(model.load_device)], []
    _patcher_tokens(model, tokens, tensors)
    if not _walk(model.model_options, tokens, tensors):
        raise ValueError("cannot fingerprint the MODEL's options (e.g. a sampler function patch)")
    tokens += [clip_fingerprint(clip), vae_fingerprint(vae)]
    return _digest(tokens, tensors)


def clip_words(clip) -> dict:
    """The pseudo-words a textual-inversion CLIP's tokenizer reads as vectors ({word: {encoder: vectors}}, set by
    trainers/methods/textual_inversion.py `with_words`); {} for a stock tokenizer."""
    return getattr(clip.tokenizer, "_personalize_words", None) or {}


def words_fingerprint(clip) -> str:
    """Fingerprint of `clip_words`: a textual-inversion CLIP shares its weights and patches with the CLIP it came
    from, yet encodes its words differently; "" for a stock tokenizer."""
    words = clip_words(clip)
    if not words:
        return ""
    tokens, tensors = ["words"], []
    if not _walk(words, tokens, tensors):
        raise ValueError("cannot fingerprint the CLIP's trained words")
    return _digest(tokens, tensors)


def clip_fingerprint(clip) -> str:
    """Fingerprint of a ComfyUI CLIP: the weights of `clip.cond_stage_model` plus what changes
    encodings without changing them (patches such as a LoRA, the clip layer, tokenizer options).
    Raises ValueError when the CLIP carries hooks or other state that cannot be fingerprinted."""
    if clip.apply_hooks_to_conds is not None:
        raise ValueError("CLIP hooks are attached to its conditionings: not cacheable")
    tokens, tensors = ["clip", *_runtime_tokens(clip.patcher.load_device), f"layer_idx={clip.layer_idx!r}",
                       f"use_clip_schedule={clip.use_clip_schedule}"], []
    if not _walk(clip.tokenizer_options, tokens, tensors):
        raise ValueError("cannot fingerprint the CLIP's tokenizer options")
    tokens.append(f"words={words_fingerprint(clip)}")
    _patcher_tokens(clip.patcher, tokens, tensors)
    return _digest(tokens, tensors)


# -- caches ---------------------------------------------------------------------------------------

class _FileCache:
    """safetensors files under `root/<kind>/<key[:2]>/<key>.safetensors`, written atomically."""

    kind = ""

    def __init__(self, root: Path):
        self.root = Path(root) / self.kind
        self.hits = self.misses = 0
        self._inputs: dict[str, str] = {}  # key -> the canonical JSON it hashes (from key())

    def _key(self, **inputs) -> str:
        text = json.dumps({"format": FORMAT_VERSION, "kind": self.kind, **inputs}, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        key = hashlib.sha256(text.encode()).hexdigest()
        self._inputs[key] = text
        return key

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def _read(self, key: str, decode):
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            inputs = meta.get(_INPUTS_META, "")
            expected = self._inputs.get(key, inputs)
            if inputs != expected or hashlib.sha256(inputs.encode()).hexdigest() != key:
                raise ValueError("the inputs it records do not match its key")
            value = decode(tensors, meta)
        except (safetensors.SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            # unreadable, truncated, tampered with, or written for other inputs
            log.warning("Personalize cache: discarding %s (%s)", path, e)
            with contextlib.suppress(OSError):
                path.unlink()
            self.misses += 1
            return None
        self.hits += 1
        return value

    def _write(self, key: str, tensors: dict, metadata: dict) -> None:
        inputs = self._inputs.get(key)
        if inputs is None:
            raise KeyError(f"{key} was not made by this cache's key()")
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        tmp = path.with_name(f".{key}.{uuid.uuid4().hex}.tmp")
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata={_INPUTS_META: inputs, **metadata})
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


class LatentCache(_FileCache):
    """VAE latents by image content, VAE fingerprint and preprocessing settings."""

    kind = "latents"

    def key(self, image_hash: str, vae_fp: str, settings: dict) -> str:
        """`settings`: a JSON-able dict of everything that changes the pixels encoded (bucket size,
        crop offset, flip, resize method, tiled encode, ...)."""
        return self._key(image=image_hash, vae=vae_fp, settings=settings)

    def get(self, key: str) -> torch.Tensor | None:
        return self._read(key, lambda tensors, meta: tensors["latent"])

    def put(self, key: str, latent: torch.Tensor) -> None:
        self._write(key, {"latent": latent}, {})


class TextEncodingCache(_FileCache):
    """CLIP CONDITIONING lists by caption and CLIP fingerprint."""

    kind = "text"

    def key(self, caption: str, clip_fp: str) -> str:
        return self._key(caption=caption, clip=clip_fp)

    def get(self, key: str) -> list | None:
        """The CONDITIONING `[[cond, {"pooled_output": ..., ...}], ...]`, tensors on the CPU."""
        def decode(tensors, meta):
            return [[tensors[f"cond.{i}"], {n: tensors[f"extra.{i}.{n}"] if is_tensor else v for n, is_tensor, v in e}]
                    for i, e in enumerate(json.loads(meta[_CONDITIONING_META]))]
        return self._read(key, decode)

    def put(self, key: str, conditioning: list) -> None:
        """Stores every tensor and the plain values (None/bool/int/float/str); raises ValueError for
        anything else (hooks, control objects, tuples), so the caller encodes without caching."""
        tensors, entries = {}, []  # per entry: [name, is_tensor, plain value] in the dict's order
        for i, item in enumerate(conditioning):
            cond, extras = item if isinstance(item, (list, tuple)) and len(item) == 2 else (None, None)
            if not isinstance(cond, torch.Tensor) or not isinstance(extras, dict):
                raise ValueError("not a CONDITIONING entry [tensor, dict]")
            tensors[f"cond.{i}"] = cond
            entries.append([])
            for name, value in extras.items():
                is_tensor = isinstance(value, torch.Tensor)
                if type(name) is not str or not (is_tensor or type(value) in _PLAIN):
                    raise ValueError(f"cannot cache conditioning entry {name!r}: {type(value).__name__}")
                if is_tensor:
                    tensors[f"extra.{i}.{name}"] = value
                entries[-1].append([name, is_tensor, None if is_tensor else value])
        self._write(key, tensors, {_CONDITIONING_META: json.dumps(entries)})
