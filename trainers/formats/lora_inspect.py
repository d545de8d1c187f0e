"""A readable summary of a LoRA: metadata, base model, layout, rank/alpha and norm per module, trigger words."""
from __future__ import annotations

import json
from collections import Counter

import torch

from .lora_convert import _FACTOR_SUFFIXES, _OTHER_SUFFIXES, KeySpace, resolve_lora

_META_FIELDS = (("ss_output_name", "name"), ("modelspec.title", "title"), ("ss_sd_model_name", "trained on"),
                ("ss_network_module", "network"), ("ss_network_dim", "dim"), ("ss_network_alpha", "alpha"),
                ("ss_resolution", "resolution"), ("ss_steps", "steps"), ("ss_learning_rate", "learning rate"),
                ("ss_training_started_at", "started at"), ("modelspec.date", "date"))


def split_module_keys(lora: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group keys by module name using the suffixes ComfyUI knows (no model needed)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        for suffix in (*_FACTOR_SUFFIXES, *_OTHER_SUFFIXES):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[_FACTOR_SUFFIXES.get(suffix, suffix)] = tensor
                break
        else:
            modules.setdefault(key, {})["?"] = tensor
    return modules


def detect_layout(names) -> str:
    names = list(names)
    if any(n.startswith(("lora_unet_", "lora_te")) for n in names):
        return "kohya"
    if any(n.startswith(("diffusion_model.", "text_encoders.")) for n in names):
        return "comfyui"
    if any(n.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for n in names):
        return "diffusers"
    return "unknown"


def guess_base_model(metadata: dict[str, str], modules: dict[str, dict[str, torch.Tensor]]) -> str:
    """From metadata when present, otherwise from the text encoders and cross-attention widths."""
    for key in ("ss_base_model_version", "modelspec.architecture"):
        if metadata.get(key):
            return metadata[key]
    if any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in modules):
        return "sdxl (guessed from two text encoders)"
    for name, tensors in modules.items():
        if "attn2" in name and ("to_k" in name) and ".lora_down.weight" in tensors:
            width = tensors[".lora_down.weight"].shape[1]
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width, f"unknown (context width {width})") + \
                " (guessed from cross-attention width)"
    return "unknown"


def trigger_words(metadata: dict[str, str], top: int = 10) -> list[str]:
    words = [w.strip() for w in metadata.get("modelspec.trigger_phrase", "").split(",") if w.strip()]
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        frequency = {}
    counts: Counter = Counter()
    for tags in frequency.values() if isinstance(frequency, dict) else []:
        if isinstance(tags, dict):
            counts.update({str(k).strip(): int(v) for k, v in tags.items() if isinstance(v, (int, float))})
    return words + [w for w, _ in counts.most_common(top) if w not in words]


def module_line(name: str, tensors: dict[str, torch.Tensor]) -> str:
    if ".lora_up.weight" in tensors and ".lora_down.weight" in tensors:
        up, down = tensors[".lora_up.weight"].float().flatten(1), tensors[".lora_down.weight"].float().flatten(1)
        rank = down.shape[0]
        alpha = float(tensors[".alpha"].item()) if ".alpha" in tensors else float(rank)
        # ‖up·down‖_F from the r×r Gram matrices, without forming the full delta.
        norm = float(torch.sqrt(torch.clamp(torch.trace((up.T @ up) @ (down @ down.T)), min=0.0))) * alpha / rank
        extra = " DoRA" if ".dora_scale" in tensors else ""
        return f"{name}: LoRA{extra} rank {rank} alpha {alpha:g} out {up.shape[0]} in {down.shape[1]} |ΔW| {norm:.4g}"
    kinds = sorted({s.strip(".").split("_")[0] for s in tensors})
    size = sum(t.numel() for t in tensors.values())
    return f"{name}: {'/'.join(kinds)} ({size} values)"


def inspect_lora(lora, *, model=None, clip=None, max_modules: int = 400) -> str:
    """The text the Inspect node shows."""
    metadata = dict(getattr(lora, "metadata", {}) or {})
    modules = split_module_keys(lora)
    text_modules = sum(1 for n in modules if n.startswith(("lora_te", "text_encoder")))
    lines = [f"layout: {detect_layout(modules)}", f"base model: {guess_base_model(metadata, modules)}",
             f"modules: {len(modules)} ({text_modules} text encoder)",
             f"tensors: {len(lora)}, values: {sum(t.numel() for t in lora.values())}"]
    ranks = Counter(t[".lora_down.weight"].shape[0] for t in modules.values() if ".lora_down.weight" in t)
    if ranks:
        lines.append("ranks: " + ", ".join(f"{r} x{n}" for r, n in sorted(ranks.items())))
    lines += [f"{label}: {metadata[key]}" for key, label in _META_FIELDS if metadata.get(key)]
    words = trigger_words(metadata)
    lines.append("trigger words: " + (", ".join(words) if words else "(none recorded)"))
    if model is not None or clip is not None:
        try:
            resolved = resolve_lora(lora, KeySpace(model, clip))
            lines.append(f"fits the connected model: yes ({len(resolved.modules)} layers patched)")
        except ValueError as exc:
            lines.append(f"fits the connected model: NO - {exc}")
    other = sorted(k for k in metadata if not any(k == f for f, _ in _META_FIELDS) and k != "ss_tag_frequency")
    if other:
        lines.append("other metadata: " + ", ".join(other))
    lines.append("")
    for name in sorted(modules)[:max_modules]:
        lines.append(module_line(name, modules[name]))
    if len(modules) > max_modules:
        lines.append(f"... {len(modules) - max_modules} more modules")
    return "\n".join(lines)
