"""IP-Adapter training (the paper's recipe): base model frozen; the image projection and new K/V train on
image-caption pairs whose target image is also the reference; text, image and both are dropped at small
rates so classifier-free guidance works. Exported in the official layout the apply node loads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..ipadapter.adapter import AdapterSpec, IPAdapterModel
from ..ipadapter.patch import TRAIN_TOKENS, ImageCondition, cross_attention_sites, install
from ..model_runtime import encode_sample_conds
from . import Attached, ParamGroup, TrainingMethod, register_method

FEATURES = "ip_features"  # sample.extras key: per variant, the CLIP-Vision feature of its pixels


@dataclass
class IPAdapterConfig:
    variant: Literal["base", "plus"] = field(default="base", metadata={"help": "base: linear projection of the pooled CLIP image embedding (4 tokens); plus: Resampler over the penultimate hidden states (16 tokens, more detail)."})
    tokens: int = field(default=0, metadata={"help": "Image tokens per cross-attention; 0 = the official count (base 4, plus 16)."})
    resampler_depth: int = field(default=4, metadata={"help": "plus: Resampler layers (official 4)."})
    text_drop: float = field(default=0.05, metadata={"help": "Fraction of samples trained with the empty caption (paper 0.05)."})
    image_drop: float = field(default=0.05, metadata={"help": "Fraction of samples trained without the image (paper 0.05)."})
    both_drop: float = field(default=0.05, metadata={"help": "Fraction trained with neither caption nor image (paper 0.05)."})
    init_scale: float = field(default=0.01, metadata={"help": "Initial gain of the projection's output norm: small, so the first steps change the model little."})

    def __post_init__(self):
        if self.variant not in ("base", "plus"):
            raise ValueError(f"`variant` must be 'base' or 'plus', got {self.variant!r}.")
        if self.tokens < 0 or self.resampler_depth < 1:
            raise ValueError("`tokens` must be >= 0 and `resampler_depth` >= 1.")
        rates = (self.text_drop, self.image_drop, self.both_drop)
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError(f"`text_drop`, `image_drop` and `both_drop` must be >= 0 and sum to at most 1, got {rates}.")


def add_image_features(data, encode) -> None:
    """Store `encode(pixels [N, H, W, 3]) -> features [N, ...]` of every variant in `sample.extras`.

    `data` must have been built with `keep_pixels=True`; repeated samples share one object and are encoded once.
    """
    seen = set()
    for sample in list(data.samples) + list(data.class_samples):
        if id(sample) in seen:
            continue
        seen.add(id(sample))
        pixels = sample.extras.get("pixels")
        if not pixels:
            raise ValueError("the dataset has no pixels for the image encoder: rebuild it with `keep_pixels`=True.")
        features = encode(torch.stack(pixels))
        sample.extras[FEATURES] = [f for f in features]


@register_method("ip_adapter")
class IPAdapterMethod(TrainingMethod):
    def __init__(self, uncond_features: torch.Tensor | None = None, initial_state: dict | None = None, **options):
        self.config = IPAdapterConfig(**options)
        self.uncond_features, self.initial_state = uncond_features, initial_state
        self.adapter: IPAdapterModel | None = None
        self.condition = ImageCondition()
        self._pending: tuple | None = None  # (tokens, text-drop rows) of the batch whose model call comes next
        self._empty: dict = {}

    def build_spec(self, diffusion_model) -> AdapterSpec:
        if self.uncond_features is None:
            raise ValueError("the IP-Adapter method needs the CLIP-Vision features of 'no image' (`uncond_features`).")
        sites = cross_attention_sites(diffusion_model)
        if not sites:
            raise ValueError("`model` has no cross-attention layers: an IP-Adapter cannot be trained on it.")
        cross_dim = sites[0].attn.to_k.in_features
        cfg = self.config
        tokens = cfg.tokens or (4 if cfg.variant == "base" else 16)
        inner = tuple(s.attn.to_k.out_features for s in sites)
        if cfg.variant == "base":
            return AdapterSpec("base", int(self.uncond_features.shape[-1]), cross_dim, tokens, inner)
        dim = 768 if cross_dim <= 768 else 1280  # the official Resampler widths (SD1.5 plus, SDXL plus)
        return AdapterSpec("plus", int(self.uncond_features.shape[-1]), cross_dim, tokens, inner, resampler_dim=dim,
                           depth=cfg.resampler_depth, heads=dim // 64)

    def attach(self, model, clip, generator):
        model = model.clone()
        spec = self.build_spec(model.model.diffusion_model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator.initial_seed())
            self.adapter = IPAdapterModel(spec)
        with torch.no_grad():
            # K/V start as the text K/V (paper); the projection's output gain starts small.
            for site, layer in zip(cross_attention_sites(model.model.diffusion_model), self.adapter.layers()):
                layer.to_k_ip.weight.copy_(site.attn.to_k.weight.detach().float())
                layer.to_v_ip.weight.copy_(site.attn.to_v.weight.detach().float())
            self.adapter.image_proj.final_norm.weight.fill_(self.config.init_scale)
        if self.initial_state:
            self.load_trainable_state_dict(self.initial_state)
        self.adapter.to(model.load_device)
        install(model, self.adapter, self.condition)
        self.patcher, self.device = model, model.load_device
        self._empty_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize("")) if clip is not None else None
        previous = model.model_options.get("model_function_wrapper")
        model.set_model_unet_function_wrapper(self._batch_wrapper(previous))
        self.adapter.train()
        return Attached(model=model, clip=clip, groups=[ParamGroup(list(self.adapter.parameters()), "main", "ip_adapter")])

    def _batch_wrapper(self, previous):
        """The UNet call of a training batch: its image tokens go into that call's transformer_options and the
        caption-dropped rows get the empty caption's conds. Any other call (a preview) passes through unchanged."""
        def wrapper(apply_model, args):
            c, pending, self._pending = args["c"], self._pending, None
            if pending is not None and pending[0].shape[0] == args["input"].shape[0]:
                tokens, rows = pending
                c = dict(c)
                options = dict(c.get("transformer_options", {}))
                options[TRAIN_TOKENS] = {**options.get(TRAIN_TOKENS, {}), id(self.condition): tokens}
                c["transformer_options"] = options
                if bool(rows.any()):
                    empty = self._empty.get(tuple(args["input"].shape[1:]), {})
                    for key in ("c_crossattn", "y"):
                        if key in c and key in empty:
                            c[key] = _replace_rows(c[key], rows, empty[key].cond)
            if previous is not None:
                return previous(apply_model, {**args, "c": c})
            return apply_model(args["input"], args["timestep"], **c)
        return wrapper

    def batch_extra(self, samples, picks, generator):
        features = torch.stack([s.extras[FEATURES][p] for s, p in zip(samples, picks)]).to(self.device)
        u = torch.rand(len(samples), generator=generator)
        cfg = self.config
        drop_image = u < cfg.image_drop
        drop_text = (u >= cfg.image_drop) & (u < cfg.image_drop + cfg.text_drop)
        drop_both = (u >= cfg.image_drop + cfg.text_drop) & (u < cfg.image_drop + cfg.text_drop + cfg.both_drop)
        no_image = (drop_image | drop_both).to(self.device)
        uncond = self.uncond_features.to(self.device).expand_as(features)
        features = torch.where(no_image.view(-1, *[1] * (features.ndim - 1)), uncond, features)
        self._pending = (self.adapter.image_tokens(features), (drop_text | drop_both).to(self.device))
        latent = samples[0].latent
        if self._empty_conditioning is not None and tuple(latent.shape) not in self._empty:
            self._empty[tuple(latent.shape)] = encode_sample_conds(self.patcher, self._empty_conditioning, latent, self.device)
        return None

    def trainable_state_dict(self):
        return {k: v.detach().cpu().clone() for k, v in self.adapter.state_dict().items()}

    def load_trainable_state_dict(self, state):
        expected = self.adapter.state_dict()
        if state.keys() != expected.keys() or any(state[k].shape != expected[k].shape for k in state):
            raise ValueError("the IP-Adapter state does not match this configuration (variant, tokens, CLIP-Vision "
                             "width or base model differ).")
        self.adapter.load_state_dict({k: v.float() for k, v in state.items()})

    def finish(self):
        self._pending = None
        self.adapter.eval()
        self.adapter.requires_grad_(False)

    def export(self) -> dict[str, torch.Tensor]:
        """The official flat state dict (`image_proj.*`, `ip_adapter.N.to_k_ip/to_v_ip.weight`)."""
        return self.trainable_state_dict()

    def describe(self):
        spec = self.adapter.spec if self.adapter is not None else None
        return {"variant": self.config.variant, "tokens": spec.tokens if spec else None,
                "clip_vision_width": spec.embed_dim if spec else None, "layers": len(spec.inner_dims) if spec else None}


def _replace_rows(value: torch.Tensor, rows: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """`value` with the rows in `rows` set to `empty` (a [1, ...] tensor; token count repeated to match)."""
    empty = empty.to(value.device, value.dtype)
    if empty.ndim == 3 and empty.shape[1] != value.shape[1]:
        if value.shape[1] % empty.shape[1]:
            return value  # cannot align token counts: keep the caption for this batch
        empty = empty.repeat(1, value.shape[1] // empty.shape[1], 1)
    return torch.where(rows.view(-1, *[1] * (value.ndim - 1)), empty.expand_as(value), value)
