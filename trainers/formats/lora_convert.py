"""LoRA files in any layout ComfyUI reads, resolved against a MODEL/CLIP, and written back in one layout.

Everything here goes through ComfyUI's own key maps (`comfy.lora.model_lora_keys_unet/clip`) and its own
adapters (`comfy.lora.load_lora`), so a module means exactly what stock `LoraLoader` makes of it.

Layouts written:
- `kohya`: `lora_unet_*` / `lora_te_*` (`lora_te1_`/`lora_te2_` on SDXL) with `.lora_down/.lora_up/.alpha`.
- `comfyui`: `diffusion_model.<ldm path>` / `text_encoders.<clip key>` with the same suffixes.
- `diffusers`: `unet.<diffusers path>` / `text_encoder[_2].<hf path>` with peft's `.lora_A/.lora_B` and the
  alpha/rank scale folded into `lora_B`. ComfyUI v0.3.64 resolves diffusers UNet attention projections only
  under their attention-processor name (`attn1.processor.to_q`, `attn1.processor.to_out`), so that is the
  name written; reading also accepts the plain peft name (`attn1.to_q`, `attn1.to_out.0`).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import torch
from safetensors import safe_open

from . import kohya_lora
from .kohya_lora import LoraStateDict

LAYOUTS = ("kohya", "comfyui", "diffusers")
# Suffix spellings of plain LoRA factors in the formats ComfyUI reads -> kohya's spelling.
_FACTOR_SUFFIXES = {
    ".lora_up.weight": ".lora_up.weight", ".lora_down.weight": ".lora_down.weight",
    ".lora_B.weight": ".lora_up.weight", ".lora_A.weight": ".lora_down.weight",
    ".lora.up.weight": ".lora_up.weight", ".lora.down.weight": ".lora_down.weight",
    "_lora.up.weight": ".lora_up.weight", "_lora.down.weight": ".lora_down.weight",
    ".lora_B.default.weight": ".lora_up.weight", ".lora_A.default.weight": ".lora_down.weight",
    ".lora_linear_layer.up.weight": ".lora_up.weight", ".lora_linear_layer.down.weight": ".lora_down.weight",
}
_OTHER_SUFFIXES = (".alpha", ".dora_scale", ".lora_mid.weight", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a",
                   ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b",
                   ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2", ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight",
                   ".reshape_weight")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


# -- reading files -------------------------------------------------------------------------------
def read_lora_file(path: str | Path, *, input_name: str = "lora_name") -> LoraStateDict:
    """Load a LoRA safetensors file with its metadata; refuse pickles (never unpickled) and corrupt files."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(9)
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not path.name.lower().endswith((".safetensors", ".sft")) or (not looks_safetensors and head.startswith(_PICKLE_MAGIC)):
        raise ValueError(f"`{input_name}`={path.name!r} is not a safetensors file (pickled .pt/.ckpt files can run "
                         "code when loaded, so they are refused, never unpickled). Convert it to .safetensors first.")
    if not looks_safetensors or struct.unpack("<Q", head[:8])[0] > path.stat().st_size - 8:
        raise ValueError(f"`{input_name}`={path.name!r} is corrupt: its safetensors header is missing or truncated. "
                         "Download or copy the file again.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"`{input_name}`={path.name!r} is corrupt or not a LoRA safetensors file ({exc}). "
                         "Download or copy the file again.") from exc
    if not tensors:
        raise ValueError(f"`{input_name}`={path.name!r} holds no tensors.")
    return LoraStateDict(tensors, metadata)


# -- resolving against a model ---------------------------------------------------------------------
@dataclass
class Module:
    """One adapted layer: the weight key it patches and its tensors under kohya suffixes."""
    target: str
    tensors: dict[str, torch.Tensor]
    part: str  # "unet" or "clip"

    @property
    def is_plain_lora(self) -> bool:
        return set(self.tensors) <= {".lora_up.weight", ".lora_down.weight", ".alpha"} and \
            ".lora_up.weight" in self.tensors and ".lora_down.weight" in self.tensors

    @property
    def kind(self) -> str:
        names = " ".join(self.tensors)
        for word, kind in (("dora_scale", "DoRA"), ("hada", "LoHa"), ("lokr", "LoKr"), ("lora_mid", "LoRA-Tucker"),
                           ("lora_up", "LoRA"), ("diff", "full diff")):
            if word in names:
                return kind
        return "other"

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(up [out, r], down [r, in*k*k], scale) in fp32; scale is alpha/rank as ComfyUI applies it."""
        up, down = self.tensors[".lora_up.weight"].float(), self.tensors[".lora_down.weight"].float()
        rank = down.shape[0]
        alpha = self.tensors.get(".alpha")
        scale = float(alpha.item()) / rank if alpha is not None else 1.0
        return up.flatten(1), down.flatten(1), scale


@dataclass
class ResolvedLora:
    modules: dict[str, Module] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


class KeySpace:
    """ComfyUI's LoRA key maps of a MODEL and/or CLIP, plus the name each layout gives a weight."""

    def __init__(self, model=None, clip=None):
        if model is None and clip is None:
            raise ValueError("`model` and `clip` are both missing: connect the MODEL (and CLIP) the LoRA is for.")
        self.model, self.clip = model, clip
        self.unet_map = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
        self.clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
        self.key_map = {**self.unet_map, **self.clip_map}
        for name, target in list(self.unet_map.items()):  # plain peft names for attention projections
            if ".processor.to_" in name:
                plain = name.replace(".processor.to_", ".to_")
                self.key_map.setdefault(plain + (".0" if plain.endswith(".to_out") else ""), target)
        self.unet_sd = model.model.state_dict() if model is not None else {}
        self.clip_sd = clip.cond_stage_model.state_dict() if clip is not None else {}
        self._names: dict[str, dict[str, str]] = {}

    def part_of(self, target: str) -> str:
        return "unet" if target in self.unet_sd else "clip"

    def weight(self, target: str) -> torch.Tensor:
        return self.unet_sd[target] if target in self.unet_sd else self.clip_sd[target]

    def names(self, layout: str) -> dict[str, str]:
        """weight key -> module name in `layout`."""
        if layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {list(LAYOUTS)}, got {layout!r}.")
        if layout not in self._names:
            names: dict[str, str] = {}
            if layout == "kohya":
                if self.model is not None:
                    names.update(kohya_lora.unet_lora_names(self.model.model))
                if self.clip is not None:
                    names.update(kohya_lora.clip_lora_names(self.clip.cond_stage_model))
            elif layout == "comfyui":
                names.update({k: k[:-len(".weight")] for k in self.unet_sd if k.endswith(".weight")})
                names.update({k: "text_encoders." + k[:-len(".weight")] for k in self.clip_sd if k.endswith(".weight")})
            else:
                for name, target in self.unet_map.items():
                    if name.startswith("unet.") and isinstance(target, str):
                        names.setdefault(target, name)
                for name, target in self.clip_map.items():
                    if name.startswith(("text_encoder.", "text_encoder_2.")) and isinstance(target, str):
                        names.setdefault(target, name)
            self._names[layout] = names
        return self._names[layout]

    def split_key(self, key: str) -> tuple[str, str] | None:
        """`key` -> (module name ComfyUI knows, suffix), or None when no module name matches."""
        for suffix in (*_FACTOR_SUFFIXES, *_OTHER_SUFFIXES):
            if key.endswith(suffix) and key[: -len(suffix)] in self.key_map:
                return key[: -len(suffix)], suffix
        return None


def resolve(lora: dict[str, torch.Tensor], keys: KeySpace, *, input_name: str = "lora") -> ResolvedLora:
    """Group a LoRA state dict into Modules by the weight they patch; refuse keys the model lacks."""
    lora = comfy.lora_convert.convert_lora(dict(lora))
    modules: dict[str, Module] = {}
    unknown = []
    for key, tensor in lora.items():
        split = keys.split_key(key)
        target = keys.key_map.get(split[0]) if split else None
        if split is None or not isinstance(target, str):
            unknown.append(key)
            continue
        suffix = _FACTOR_SUFFIXES.get(split[1], split[1])
        module = modules.setdefault(target, Module(target, {}, keys.part_of(target)))
        module.tensors[suffix] = tensor
    if unknown:
        text_keys = any(k.startswith(("lora_te", "text_encoder")) for k in unknown)
        hint = " It has text-encoder keys: connect `clip`." if keys.clip is None and text_keys else ""
        raise ValueError(
            f"`{input_name}` does not fit this model: {len(unknown)} of its {len(lora)} keys match no layer "
            f"(e.g. {min(unknown)!r}). It was made for a different base architecture (or needs the CLIP); "
            f"use a LoRA made for this model.{hint}")
    for module in modules.values():
        _check_complete(module, input_name)
        _check_shape(module, keys.weight(module.target), input_name)
    return ResolvedLora(modules)


def _check_complete(module: Module, input_name: str) -> None:
    """A module ComfyUI would skip (e.g. an up without its down, an alpha alone) is an error, not a silent no-op."""
    if module.is_plain_lora:
        return
    tensors = {"m" + suffix: t for suffix, t in module.tensors.items()}
    try:
        loaded = module.target in comfy.lora.load_lora(tensors, {"m": module.target}, log_missing=False)
    except KeyError:  # ComfyUI's adapters index the partner key of a factor directly
        loaded = False
    if not loaded:
        raise ValueError(f"`{input_name}` has an incomplete module for {module.target} (only "
                         f"{', '.join(sorted(module.tensors))}): the file is damaged or not a LoRA ComfyUI can apply.")


def _check_shape(module: Module, weight: torch.Tensor, input_name: str) -> None:
    if module.is_plain_lora:
        up, down, _ = module.factors()
        if up.shape[0] != weight.shape[0] or down.shape[1] != weight[0].numel():
            raise ValueError(
                f"`{input_name}` patches {module.target} with a {up.shape[0]}x{down.shape[1]} delta but the layer is "
                f"{weight.shape[0]}x{weight[0].numel()}: it was made for a different base architecture.")


def resolve_lora(lora, keys: KeySpace, *, input_name: str = "lora") -> ResolvedLora:
    """`resolve` keeping the metadata a LoraStateDict carries."""
    resolved = resolve(lora, keys, input_name=input_name)
    resolved.metadata = dict(getattr(lora, "metadata", {}) or {})
    return resolved


# -- the delta of a module, as ComfyUI applies it ----------------------------------------------------
def full_delta(module: Module, base_weight: torch.Tensor) -> torch.Tensor:
    """ΔW (fp32, shape of the weight) that stock LoraLoader adds at strength 1."""
    device = comfy.model_management.get_torch_device()
    if module.is_plain_lora:
        up, down, scale = module.factors()
        return (scale * (up.to(device) @ down.to(device))).reshape(base_weight.shape)
    tensors = {"m" + suffix: t for suffix, t in module.tensors.items()}
    patch = comfy.lora.load_lora(tensors, {"m": module.target}, log_missing=False)[module.target]
    weight = base_weight.to(device, torch.float32)
    patched = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight.clone(), module.target)
    return patched - weight


# -- writing ---------------------------------------------------------------------------------------
def write_modules(modules: dict[str, Module], keys: KeySpace, layout: str, *, what: str = "LoRA") -> dict[str, torch.Tensor]:
    """Tensors of `modules` under `layout`'s names; conv factors get the weight's kernel shape back."""
    names = keys.names(layout)
    out: dict[str, torch.Tensor] = {}
    for target in sorted(modules):
        _to_cpu(modules[target])
        module = modules[target]
        name = names.get(target)
        if name is None:
            raise ValueError(f"{what}: the `{layout}` layout has no name for {target}; choose another `layout`.")
        shape = keys.weight(target).shape
        if module.is_plain_lora:
            up, down, scale = module.factors()
            rank = down.shape[0]
            up = up.reshape(shape[0], rank, *([1] * (len(shape) - 2)))
            down = down.reshape(rank, *shape[1:])
            if layout == "diffusers":  # peft files carry no alpha: fold alpha/rank into B
                out[f"{name}.lora_B.weight"] = (up * scale).contiguous()
                out[f"{name}.lora_A.weight"] = down.contiguous()
            else:
                out[f"{name}.lora_up.weight"] = up.contiguous()
                out[f"{name}.lora_down.weight"] = down.contiguous()
                out[f"{name}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
            continue
        if layout == "diffusers":
            raise ValueError(f"{what}: {target} is a {module.kind} module, which the diffusers/peft layout cannot "
                             "hold. Use PersonalizeResizeLoRA to turn it into a plain LoRA first, or pick `kohya`.")
        for suffix, tensor in module.tensors.items():
            out[f"{name}{suffix}"] = tensor.contiguous()
    return out


def _to_cpu(module: Module) -> None:
    module.tensors = {k: v.detach().cpu() for k, v in module.tensors.items()}


def lora_module(up: torch.Tensor, down: torch.Tensor, target: str, part: str, scale: float = 1.0) -> Module:
    """A plain LoRA Module from 2-D factors (alpha chosen so alpha/rank == scale)."""
    rank = down.shape[0]
    return Module(target, {".lora_up.weight": up.contiguous(), ".lora_down.weight": down.contiguous(),
                           ".alpha": torch.tensor(scale * rank, dtype=torch.float32)}, part)


def diff_module(delta: torch.Tensor, target: str, part: str) -> Module:
    return Module(target, {".diff": delta.contiguous()}, part)


def output_metadata(sources: list[dict[str, str]], modules: dict[str, Module], extra: dict) -> dict[str, str]:
    """kohya-style metadata for a derived LoRA: the base model fields of its sources, new rank/alpha."""
    meta: dict[str, str] = {}
    for source in sources:
        for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "ss_sd_model_name", "ss_tag_frequency"):
            if key in source and key not in meta:
                meta[key] = source[key]
    ranks = sorted({m.tensors[".lora_down.weight"].shape[0] for m in modules.values() if m.is_plain_lora})
    meta["ss_network_module"] = "networks.lora"
    if ranks:
        meta["ss_network_dim"] = str(max(ranks))
        meta["ss_network_alpha"] = str(max(ranks))
    for key, value in extra.items():
        meta[f"personalize.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def check_same_base(metadatas: list[dict[str, str]], *, input_name: str = "loras") -> None:
    """Refuse LoRAs whose metadata names different base architectures."""
    seen = {}
    for index, meta in enumerate(metadatas, 1):
        arch = meta.get("ss_base_model_version") or meta.get("modelspec.architecture", "").split("/")[0] or None
        if arch:
            seen.setdefault(_family_of(arch), index)
    if len(seen) > 1:
        raise ValueError(f"`{input_name}` mixes base architectures ({', '.join(f'#{i}: {a}' for a, i in seen.items())}): "
                         "LoRAs for different base models cannot be merged. Use LoRAs made for the same base model.")


def _family_of(arch: str) -> str:
    arch = arch.lower()
    for word, family in (("xl", "sdxl"), ("v2", "sd2"), ("sd2", "sd2"), ("v1", "sd1"), ("sd1", "sd1")):
        if word in arch:
            return family
    return arch


def convert(lora, keys: KeySpace, layout: str, *, input_name: str = "lora") -> LoraStateDict:
    """Rename a LoRA into `layout` (values unchanged apart from folding alpha/rank for diffusers)."""
    resolved = resolve_lora(lora, keys, input_name=input_name)
    tensors = write_modules(resolved.modules, keys, layout)
    meta = dict(resolved.metadata)
    meta["personalize.layout"] = layout
    return LoraStateDict(tensors, meta)
