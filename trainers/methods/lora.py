"""LoRA (and DoRA) as a training method.

Adapter layers: our own small `LoraDelta`, attached per ModelPatcher clone. Plain LoRA runs as a
side branch of the layer (`out + scale * up(down(x))`, peft-style) installed as an object patch of
the module's `forward`; DoRA, which needs the merged weight's norm, runs as a weight wrapper
(`add_weight_wrapper`). Both are applied only while that clone is loaded and undone when it
unloads. Why not peft: it injects layers into the `nn.Module` tree, which every clone shares, so a
training run would leak into sibling branches of the graph. Why not `comfy.weight_adapter.LoraDiff`:
it merges into the full weight on every forward (a full-size weight gradient per layer: measured
~1.7x slower than the branch here) and has no DoRA. The math matches what ComfyUI's loader applies
to the exported kohya file (W + alpha/rank * up@down; DoRA with a per-input-column magnitude as
`dora_scale`).
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from comfy.weight_adapter import WeightAdapterTrainBase

from ..formats.kohya_lora import clip_lora_names, module_names, unet_lora_names
from ..formats.lora_convert import KeySpace, convert
from . import Attached, ParamGroup, TrainingMethod, register_method

TargetPreset = Literal["attention", "attention_ff", "all", "cross_attention_kv"]
TARGET_PRESETS = ("attention_ff", "attention", "all", "cross_attention_kv")

_CROSS_KV = re.compile(r"\.attn2\.(to_k|to_v)$")
_ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TRANSFORMER = re.compile(r"(\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))|\.proj_in|\.proj_out)$")
_TEXT_ENCODER = re.compile(r"\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def unet_target_matches(module_name: str, module: torch.nn.Module, preset: str) -> bool:
    """Whether a UNet module trains under a target preset (kohya's LoRA / LoCon choices)."""
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return False
    if preset == "attention":
        return bool(_ATTENTION.search(module_name))
    if preset == "attention_ff":
        return bool(_TRANSFORMER.search(module_name))
    if preset == "cross_attention_kv":
        return bool(_CROSS_KV.search(module_name))
    return True  # "all": every linear and conv layer


def _branch_capable(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    return isinstance(module, torch.nn.Linear)


@dataclass
class LoraConfig:
    rank: int = field(default=16, metadata={"help": "LoRA rank (network_dim): capacity of the adapter."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha: the update is scaled by alpha/rank (kohya's network_alpha)."})
    targets: TargetPreset = field(default="attention_ff", metadata={"help": "Which UNet layers get a LoRA: attention; attention_ff (kohya default: all transformer linears); all (also ResNet convs, LoCon); cross_attention_kv (Custom Diffusion: only the text key/value projections, so prompts without the subject change least)."})
    train_text_encoder: bool = field(default=False, metadata={"help": "Also train a LoRA on the text encoder(s), at text_encoder_lr."})
    dora: bool = field(default=False, metadata={"help": "DoRA: learn a per-column magnitude as well (loads in ComfyUI as dora_scale)."})
    initial_weights: dict | None = field(default=None, metadata={"help": "A kohya LoRA state dict to start from (continue training a LoRA)."})

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ValueError(f"`rank` must be at least 1, got {self.rank}. Use 4-128 for LoRA.")
        if not self.alpha > 0:
            raise ValueError(f"`alpha` must be positive, got {self.alpha}.")
        if self.targets not in TargetPreset.__args__:
            raise ValueError(f"`targets` must be one of {TargetPreset.__args__}, got {self.targets!r}.")


class LoraDelta(WeightAdapterTrainBase):
    """A trainable low-rank update of one weight: a weight-wrapper function W -> W'."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, dora: bool, generator: torch.Generator):
        super().__init__()
        out_dim, in_dim = weight.shape[0], weight.shape[1]
        kernel = tuple(weight.shape[2:])
        self.weight_shape = tuple(weight.shape)
        self.scale = alpha / rank
        self.rank, self.alpha = rank, alpha
        down = torch.empty((rank, in_dim) + kernel, dtype=torch.float32)
        # kohya/peft init: down ~ kaiming-uniform(a=sqrt(5)) from our seeded generator, up = 0.
        bound = 1.0 / math.sqrt(in_dim * max(1, math.prod(kernel)))
        down.uniform_(-bound, bound, generator=generator)
        self.lora_down = torch.nn.Parameter(down)
        self.lora_up = torch.nn.Parameter(torch.zeros((out_dim, rank) + (1,) * len(kernel), dtype=torch.float32))
        self.dora_scale = None
        self.enabled = True  # False: the layer computes its base weight (TrainingMethod.base_behaviour)
        if dora:
            self.dora_scale = torch.nn.Parameter(self._column_norm(weight.float()))

    @staticmethod
    def _column_norm(weight: torch.Tensor) -> torch.Tensor:
        # Norm of each input column over outputs (and kernel): shape [1, in, 1, ...].
        return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(1, weight.shape[1], *([1] * (weight.ndim - 2)))

    def delta(self) -> torch.Tensor:
        return (self.lora_up.flatten(1) @ self.lora_down.flatten(1)).reshape(self.weight_shape) * self.scale

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        merged = w.float() + self.delta()
        if self.dora_scale is not None:
            merged = merged * (self.dora_scale / (self._column_norm(merged) + torch.finfo(torch.float32).eps))
        return merged.to(w.dtype)

    def branch_forward(self, module: torch.nn.Module):
        """A replacement `forward` for `module`: its own output plus the low-rank branch."""
        base_forward = module.forward
        if isinstance(module, torch.nn.Conv2d):
            conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)

            def low_rank(x):
                return F.conv2d(F.conv2d(x, self.lora_down, None, **conv), self.lora_up)
        else:
            def low_rank(x):
                return F.linear(F.linear(x, self.lora_down), self.lora_up)

        def forward(x, *args, **kwargs):
            out = base_forward(x, *args, **kwargs)
            if not self.enabled:
                return out
            return out + (low_rank(x.to(self.lora_down.dtype)) * self.scale).to(out.dtype)
        return forward

    def passive_memory_usage(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def export(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        out = {
            "lora_down.weight": self.lora_down.detach().to("cpu", dtype).contiguous(),
            "lora_up.weight": self.lora_up.detach().to("cpu", dtype).contiguous(),
            "alpha": torch.tensor(float(self.alpha), dtype=dtype),
        }
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale.detach().to("cpu", dtype).contiguous()
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take kohya tensors; their delta is kept whatever their alpha (ComfyUI applies alpha/rank, 1 without alpha)."""
        alpha = tensors.get("alpha")
        file_scale = float(alpha) / self.rank if alpha is not None else 1.0
        with torch.no_grad():
            self.lora_down.copy_(tensors["lora_down.weight"].reshape(self.lora_down.shape))
            self.lora_up.copy_(tensors["lora_up.weight"].float().reshape(self.lora_up.shape) * (file_scale / self.scale))
            if self.dora_scale is not None and "dora_scale" in tensors:
                self.dora_scale.copy_(tensors["dora_scale"].reshape(self.dora_scale.shape))


@register_method("lora")
class LoraMethod(TrainingMethod):
    """LoRA/DoRA on the UNet and optionally the text encoder(s), exported in kohya format."""

    def __init__(self, **options):
        self.config = LoraConfig(**options)
        self.deltas: dict[str, LoraDelta] = {}  # kohya module name -> delta

    def _add(self, patcher, modules, names, select, generator, role_params):
        state = patcher.model.state_dict()
        for module_name, module in modules:
            weight_key = f"{module_name}.weight"
            kohya_name = names.get(weight_key)
            if kohya_name is None or not select(module_name, module):
                continue
            delta = LoraDelta(state[weight_key], self.config.rank, self.config.alpha, self.config.dora, generator)
            if self.config.dora or not _branch_capable(module):
                patcher.add_weight_wrapper(weight_key, delta)  # ComfyUI's loader moves these with the model
            else:
                delta.to(patcher.load_device)  # an object patch is never moved by the loader: it computes there
                patcher.add_object_patch(f"{module_name}.forward", delta.branch_forward(module))
            self.deltas[kohya_name] = delta
            role_params.extend(delta.parameters())

    def attach(self, model, clip, generator):
        cfg = self.config
        model = model.clone()
        unet_params: list = []
        self._add(model, model.model.named_modules(), unet_lora_names(model.model),
                  lambda n, m: unet_target_matches(n, m, cfg.targets), generator, unet_params)
        if not unet_params:
            raise ValueError(f"no UNet layer matches `targets`={cfg.targets!r} in this model.")
        groups = [ParamGroup(unet_params, "main", "unet")]
        if clip is not None:
            clip = clip.clone()
        if cfg.train_text_encoder:
            if clip is None:
                raise ValueError("`train_text_encoder` is on but no CLIP is connected: connect the checkpoint's CLIP.")
            te_params: list = []
            self._add(clip.patcher, clip.cond_stage_model.named_modules(), clip_lora_names(clip.cond_stage_model),
                      lambda n, m: isinstance(m, torch.nn.Linear) and bool(_TEXT_ENCODER.search(n)), generator, te_params)
            groups.append(ParamGroup(te_params, "text_encoder", "text_encoder"))
        if cfg.initial_weights:
            self._start_from(cfg.initial_weights, model, clip)
        return Attached(model=model, clip=clip, groups=groups, trains_text_encoder=cfg.train_text_encoder)

    def _start_from(self, lora: dict, model, clip) -> None:
        """Continue `lora` (any layout ComfyUI reads, any alpha): each module starts at the file's delta."""
        kohya = convert(lora, KeySpace(model, clip), "kohya", input_name="initial_lora")
        names = module_names(kohya)
        untrained = sorted(names - set(self.deltas))
        if untrained:
            hint = ("turn on `train_text_encoder`" if any(n.startswith("lora_te") for n in untrained)
                    else "set `targets` to the layers it was trained on (e.g. all)")
            raise ValueError(f"`initial_lora` has {len(untrained)} modules this run does not train (e.g. {untrained[0]}): "
                             f"{hint}, or they would be dropped.")
        for name in sorted(names):
            tensors = {k[len(name) + 1:]: v for k, v in kohya.items() if k.startswith(name + ".")}
            if "lora_down.weight" not in tensors:
                raise ValueError(f"`initial_lora` module {name} is not a LoRA ({', '.join(sorted(tensors))}): only "
                                 "LoRA and DoRA files can be trained on.")
            if "dora_scale" in tensors and not self.config.dora:
                raise ValueError("`initial_lora` is a DoRA (its modules have dora_scale): turn on `dora` to continue it.")
            if tensors["lora_down.weight"].shape[0] != self.config.rank:
                raise ValueError(f"`initial_lora` has rank {tensors['lora_down.weight'].shape[0]} but `rank` is "
                                 f"{self.config.rank}: set `rank` to the file's.")
            self.deltas[name].load(tensors)

    @contextlib.contextmanager
    def base_behaviour(self) -> Iterator[None]:
        for delta in self.deltas.values():
            delta.enabled = False
        try:
            yield
        finally:
            for delta in self.deltas.values():
                delta.enabled = True

    def trainable_state_dict(self):
        return self.export()

    def load_trainable_state_dict(self, state, strict: bool = True):
        names = module_names(state)
        unknown = names - set(self.deltas)
        if unknown and strict:
            raise ValueError(f"checkpoint has LoRA modules this run does not train (e.g. {sorted(unknown)[0]}): "
                             "the rank, targets or model differ from the checkpoint's.")
        for name, delta in self.deltas.items():
            tensors = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if not tensors:
                if strict:
                    raise ValueError(f"checkpoint lacks LoRA module {name}: it was made with other targets or model.")
                continue
            if tensors["lora_down.weight"].shape[0] != self.config.rank:
                raise ValueError(f"checkpoint LoRA rank {tensors['lora_down.weight'].shape[0]} differs from `rank`={self.config.rank}.")
            delta.load(tensors)

    def export(self, dtype=torch.float32):
        out = {}
        for name, delta in self.deltas.items():
            for suffix, tensor in delta.export(dtype).items():
                out[f"{name}.{suffix}"] = tensor
        return out

    def describe(self):
        cfg = self.config
        return {"rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets, "dora": cfg.dora,
                "train_text_encoder": cfg.train_text_encoder, "modules": len(self.deltas)}
