"""Hypernetworks (AUTOMATIC1111 format): small MLPs that transform the K and V inputs of attention.

Applied through ComfyUI's `attn1_patch`/`attn2_patch` on a MODEL clone, exactly as the stock
`HypernetworkLoader` applies a loaded file (both attentions, matched by K width), so training and
inference compute the same function. ComfyUI's loader builds its layers inside a function, so the
module stack is rebuilt here in the same order (Linear, activation, LayerNorm, Dropout p=0.3).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import Attached, ParamGroup, TrainingMethod, register_method

ACTIVATIONS = {
    "linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "softsign": torch.nn.Softsign,
    "mish": torch.nn.Mish,
}
WeightInit = Literal["normal", "xavier", "kaiming"]


@dataclass
class HypernetworkConfig:
    layer_structure: tuple[float, ...] = field(default=(1, 2, 1), metadata={"help": "Relative widths of the MLP layers, first and last 1 (A1111: '1, 2, 1')."})
    activation: str = field(default="linear", metadata={"help": "Activation between layers (those ComfyUI's loader knows)."})
    layer_norm: bool = field(default=False, metadata={"help": "LayerNorm after each linear layer."})
    dropout: bool = field(default=False, metadata={"help": "Dropout (p=0.3, as ComfyUI applies it) after hidden layers."})
    last_layer_dropout: bool = field(default=False, metadata={"help": "Also dropout before the last layer."})
    activate_output: bool = field(default=False, metadata={"help": "Apply the activation after the last layer too."})
    weight_init: WeightInit = field(default="normal", metadata={"help": "Initial weights: normal (std 0.01), xavier or kaiming; biases 0."})
    sizes: tuple[int, ...] | None = field(default=None, metadata={"help": "K widths to train a module pair for; None = every width the model's attentions use."})

    def __post_init__(self):
        self.layer_structure = tuple(float(x) for x in self.layer_structure)
        if len(self.layer_structure) < 2 or self.layer_structure[0] != 1 or self.layer_structure[-1] != 1:
            raise ValueError(f"`layer_structure` must start and end with 1, e.g. (1, 2, 1); got {self.layer_structure}.")
        if any(x <= 0 for x in self.layer_structure):
            raise ValueError(f"`layer_structure` widths must be positive, got {self.layer_structure}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}.")
        if self.weight_init not in WeightInit.__args__:
            raise ValueError(f"`weight_init` must be one of {WeightInit.__args__}, got {self.weight_init!r}.")


def build_mlp(dim: int, cfg: HypernetworkConfig, generator: torch.Generator) -> torch.nn.Sequential:
    """The layer stack ComfyUI's loader rebuilds from a saved state dict, built by the same rules.

    ComfyUI walks the saved weights (Linear, then LayerNorm when `is_layer_norm`) by index and decides
    activation and dropout from that index, so with layer norm the last Linear is followed by the
    activation too. Building by the same walk makes training compute what inference will.
    """
    widths = [int(dim * w) for w in cfg.layer_structure]
    entries: list[torch.nn.Module] = []
    for i in range(len(widths) - 1):
        linear = torch.nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            if cfg.weight_init == "normal":
                linear.weight.normal_(0.0, 0.01, generator=generator)
            else:
                fan = widths[i] + widths[i + 1] if cfg.weight_init == "xavier" else widths[i]
                bound = (6.0 / fan) ** 0.5
                linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.zero_()
        entries.append(linear)
        if cfg.layer_norm:
            entries.append(torch.nn.LayerNorm(widths[i + 1]))
    layers: list[torch.nn.Module] = []
    i = 0
    while i < len(entries):
        last, penultimate = i == len(entries) - 1, i == len(entries) - 2
        layers.append(entries[i])
        if cfg.activation != "linear" and (not last or cfg.activate_output):
            layers.append(ACTIVATIONS[cfg.activation]())
        if cfg.layer_norm:
            i += 1
            layers.append(entries[i])
        if cfg.dropout and not last and (not penultimate or cfg.last_layer_dropout):
            layers.append(torch.nn.Dropout(p=0.3))
        i += 1
    return torch.nn.Sequential(*layers)


def a1111_state_dict(mlp: torch.nn.Sequential, cfg: HypernetworkConfig) -> dict[str, torch.Tensor]:
    """`mlp`'s weights under the names A1111's HypernetworkModule loads strictly: `linear.<i>.*`, where i counts
    its module list (Linear, activation, LayerNorm, and no Dropout, since the file says use_dropout False).
    ComfyUI's loader reads them by order, so it takes these names as well."""
    weighted = iter(m for m in mlp if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))
    out, index, layers = {}, 0, len(cfg.layer_structure) - 1

    def put(module):
        nonlocal index
        out.update({f"linear.{index}.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()})
        index += 1

    for i in range(layers):
        put(next(weighted))  # Linear
        if cfg.activation != "linear" and (i < layers - 1 or cfg.activate_output):
            index += 1  # the activation: no weights
        if cfg.layer_norm:
            put(next(weighted))
    return out


class HypernetworkPatch:
    """An attn1/attn2 patch: k += mlp_k(k) * strength, v += mlp_v(v) * strength, by K width."""

    def __init__(self, modules: dict[int, torch.nn.ModuleList], strength: float = 1.0):
        self.modules, self.strength = modules, strength

    def __call__(self, q, k, v, extra_options):
        pair = self.modules.get(k.shape[-1]) if self.strength else None
        if pair is not None:
            k = k + pair[0](k.to(pair[0][0].weight.dtype)).to(k.dtype) * self.strength
            v = v + pair[1](v.to(pair[1][0].weight.dtype)).to(v.dtype) * self.strength
        return q, k, v

    def to(self, device_or_dtype):
        # ComfyUI's loader also calls model_patches_to(the UNet's dtype): the trained weights keep their own.
        if isinstance(device_or_dtype, torch.dtype):
            return self
        for pair in self.modules.values():
            pair.to(device_or_dtype)
        return self


def attention_widths(diffusion_model: torch.nn.Module) -> list[int]:
    """K widths the model's attentions see (self-attention: inner dim; cross-attention: context)."""
    widths = set()
    for name, module in diffusion_model.named_modules():
        if name.endswith((".attn1.to_k", ".attn2.to_k")) and isinstance(module, torch.nn.Linear):
            widths.add(module.in_features)
    return sorted(widths)


@register_method("hypernetwork")
class HypernetworkMethod(TrainingMethod):
    """A1111-style hypernetwork on the base MODEL (frozen); exported as the A1111 `.pt` dict."""

    def __init__(self, initial_state: dict | None = None, **options):
        self.config = HypernetworkConfig(**options)
        self.initial_state = initial_state
        self.modules: dict[int, torch.nn.ModuleList] = {}
        self.patch: HypernetworkPatch | None = None

    def attach(self, model, clip, generator):
        model = model.clone()
        sizes = self.config.sizes or attention_widths(model.model.diffusion_model)
        if not sizes:
            raise ValueError("this MODEL has no attention layers a hypernetwork can patch.")
        self.modules = {int(d): torch.nn.ModuleList([build_mlp(int(d), self.config, generator) for _ in range(2)])
                        for d in sizes}
        if self.initial_state:
            self.load_trainable_state_dict(self.initial_state)
        patch = self.patch = HypernetworkPatch(self.modules)
        model.set_model_attn1_patch(patch)
        model.set_model_attn2_patch(patch)
        for pair in self.modules.values():
            pair.train()
        params = [p for pair in self.modules.values() for p in pair.parameters()]
        return Attached(model=model, clip=clip, groups=[ParamGroup(params, "main", "hypernetwork")])

    @contextlib.contextmanager
    def base_behaviour(self) -> Iterator[None]:
        strength, self.patch.strength = self.patch.strength, 0.0
        try:
            yield
        finally:
            self.patch.strength = strength

    def trainable_state_dict(self):
        return {f"{dim}.{key}": value.detach().clone() for dim, pair in self.modules.items()
                for key, value in pair.state_dict().items()}

    def load_trainable_state_dict(self, state):
        for dim, pair in self.modules.items():
            own = {k[len(f"{dim}."):]: v for k, v in state.items() if k.startswith(f"{dim}.")}
            expected = pair.state_dict()
            if own.keys() != expected.keys() or any(own[k].shape != expected[k].shape for k in own):
                raise ValueError(f"the hypernetwork state does not match this configuration at width {dim} "
                                 "(layer structure, layer norm or model differ).")
            pair.load_state_dict(own)

    def finish(self) -> None:
        """After training: inference behaviour (no dropout) and frozen weights."""
        for pair in self.modules.values():
            pair.eval()
            pair.requires_grad_(False)

    def export(self, name: str = "hypernetwork", step: int = 0) -> dict:
        """The A1111 dict: {width: [state_k, state_v], settings...}, tensors and plain values only."""
        cfg = self.config
        out = {dim: [a1111_state_dict(pair[i], cfg) for i in range(2)] for dim, pair in self.modules.items()}
        # `use_dropout` is written False: ComfyUI's loader builds its layers in training mode, so a file
        # that asks for dropout would drop 30% of activations at inference. Without Dropout layers it
        # computes exactly the eval-mode function training ended with; the setting is kept aside.
        out.update({"activation_func": cfg.activation, "is_layer_norm": cfg.layer_norm, "use_dropout": False,
                    "trained_use_dropout": cfg.dropout,
                    "activate_output": cfg.activate_output, "last_layer_dropout": cfg.last_layer_dropout,
                    "layer_structure": list(cfg.layer_structure), "weight_initialization": cfg.weight_init,
                    "name": name, "step": int(step)})
        return out

    def describe(self):
        cfg = self.config
        return {"layer_structure": list(cfg.layer_structure), "activation": cfg.activation, "widths": sorted(self.modules)}
