"""ControlNet training, and training any method under a frozen ControlNet ("personalize under control").

Both hand the loop a `comfy.controlnet.ControlNet` with the batch's hint through `batch_extra`, so the
denoiser runs it through `calc_cond_batch` exactly as sampling does (`get_control`, strength, merge,
`apply_control` in the UNet). ComfyUI's `get_control` has no no_grad: gradients reach the trainable
control module. The base MODEL is only cloned (nothing is attached to it) and stays frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import comfy.controlnet
import comfy.model_management
import torch

from ..formats.controlnet import build_controlnet, check_family, unet_dims
from ..model_runtime import make_autograd_safe
from . import Attached, ParamGroup, TrainingMethod, register_method


def condition_hints(samples: list, picks: list[int]) -> torch.Tensor:
    """The batch's condition images as a ControlNet hint [B, 3, H, W] (0..1), cropped like their targets."""
    missing = [s.source for s in samples if "condition" not in s.extras]
    if missing:
        raise ValueError(f"the `dataset` has no condition image for {missing[0]}: build it with Personalize ControlNet "
                         "Dataset (a condition folder or a condition maker).")
    return torch.stack([s.extras["condition"][p] for s, p in zip(samples, picks)]).movedim(-1, 1).float()


def control_for_batch(control_net, hint: torch.Tensor, base_model, strength: float = 1.0,
                      percent: tuple[float, float] = (0.0, 1.0), previous=None):
    """A copy of `control_net` set up as ControlNetApplyAdvanced + the samplers' pre_run_control set it up."""
    control = control_net.copy().set_cond_hint(hint, strength, percent)
    if previous is not None:
        control.set_previous_controlnet(previous)
    sampling = base_model.model_sampling
    control.pre_run(base_model, lambda a: sampling.percent_to_sigma(a))
    return control


@register_method("controlnet")
class ControlNetMethod(TrainingMethod):
    """A ControlNet for the base MODEL (lllyasviel's layout, zero-initialised); exported as a stock CONTROL_NET."""

    def __init__(self, initial_weights: dict | None = None, strength: float = 1.0):
        if not 0.0 < float(strength) <= 10.0:
            raise ValueError(f"`strength` must be in (0, 10], got {strength}.")
        self.initial_weights, self.strength = initial_weights, float(strength)
        self.control_model: torch.nn.Module | None = None
        self.control_net = None
        self.base_model = None

    def attach(self, model, clip, generator):
        model = model.clone()  # nothing is patched into the base; the clone only keeps the input untouched
        self.control_model = build_controlnet(model, generator)
        if self.initial_weights is not None:
            self.load_trainable_state_dict(self.initial_weights)
        self.control_model.to(model.load_device).train()
        self.control_net = comfy.controlnet.ControlNet(self.control_model, load_device=model.load_device)
        self.base_model = model.model
        params = [p for p in self.control_model.parameters()]
        return Attached(model=model, clip=clip, groups=[ParamGroup(params, "main", "controlnet")])

    def batch_extra(self, samples, picks, generator):
        return {"control": control_for_batch(self.control_net, condition_hints(samples, picks), self.base_model,
                                             self.strength)}

    def trainable_state_dict(self):
        return {k: v.detach().clone() for k, v in self.control_model.state_dict().items()}

    def load_trainable_state_dict(self, state):
        expected = self.control_model.state_dict()
        wrong = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
        if wrong:
            raise ValueError(f"the ControlNet weights do not fit this MODEL ({len(wrong)} tensors missing or of another "
                             f"shape, e.g. {wrong[0]}): it was made for another base model.")
        self.control_model.load_state_dict({k: state[k] for k in expected})

    def finish(self):
        self.control_model.eval().requires_grad_(False)

    def export(self):
        """The trained ControlNet as a stock CONTROL_NET (ControlNetApplyAdvanced takes it)."""
        return comfy.controlnet.ControlNet(self.control_model, load_device=self.control_net.load_device)

    def describe(self):
        return {"strength": self.strength, "hint_channels": 3,
                **({"dims": unet_dims(self.control_model.state_dict())} if self.control_model is not None else {})}


@dataclass
class TrainingControl:
    """The `control` input of training nodes: a frozen stock CONTROL_NET applied to every training batch."""

    control_net: Any
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    image: torch.Tensor | None = None  # IMAGE [1, H, W, 3] for every sample; None: each sample's condition image

    def __post_init__(self):
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            raise ValueError(f"`start_percent` and `end_percent` must satisfy 0 <= start < end <= 1, got "
                             f"{self.start_percent}, {self.end_percent}.")
        if self.image is not None and self.image.shape[0] != 1:
            raise ValueError(f"`image` holds {self.image.shape[0]} images; give one (it conditions every sample), or "
                             "leave it out and give each image its own condition with Personalize ControlNet Dataset.")

    def wrap(self, method: TrainingMethod, dataset) -> UnderControl:
        if self.image is None and not all("condition" in s.extras for s in dataset.samples):
            raise ValueError("`control` has no `image` and the `dataset` has no condition images: connect an image to "
                             "Personalize Training Control, or build the dataset with Personalize ControlNet Dataset.")
        return UnderControl(method, self)


class UnderControl(TrainingMethod):
    """Any method, trained with a frozen ControlNet in every batch; saving and export are the method's own."""

    def __init__(self, inner: TrainingMethod, control: TrainingControl):
        self.inner, self.control = inner, control
        self.name = inner.name
        self.base_model = None

    def attach(self, model, clip, generator):
        check_family(self.control.control_net, model, "control")
        attached = self.inner.attach(model, clip, generator)
        control_model = self.control.control_net.control_model
        comfy.model_management.load_models_gpu(self.control.control_net.get_models())
        make_autograd_safe(control_model)  # loaded under inference mode; values unchanged
        control_model.requires_grad_(False)
        self.base_model = attached.model.model
        return attached

    def batch_extra(self, samples, picks, generator):
        extra = dict(self.inner.batch_extra(samples, picks, generator) or {})
        hint = (self.control.image.movedim(-1, 1).float().expand(len(samples), -1, -1, -1)
                if self.control.image is not None else condition_hints(samples, picks))
        extra["control"] = control_for_batch(self.control.control_net, hint, self.base_model, self.control.strength,
                                             (self.control.start_percent, self.control.end_percent),
                                             previous=extra.get("control"))
        return extra

    def trainable_state_dict(self):
        return self.inner.trainable_state_dict()

    def load_trainable_state_dict(self, state):
        self.inner.load_trainable_state_dict(state)

    def base_behaviour(self):
        return self.inner.base_behaviour()

    def detach(self):
        self.inner.detach()

    def finish(self):
        self.inner.finish()

    def export(self, *args, **kwargs):
        return self.inner.export(*args, **kwargs)

    def describe(self):
        return {**self.inner.describe(), "under_control": {"strength": self.control.strength,
                                                           "percent": [self.control.start_percent, self.control.end_percent]}}
