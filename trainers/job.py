"""The training job: every setting a run needs, as one plain dataclass.

Nodes build it from their inputs; a headless tool can build it from JSON (`TrainJob.from_dict`).
Field help doubles as node tooltips, so it is written once.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

CONFIG_VERSION = 1

LossType = Literal["mse", "huber"]
Scheduler = Literal["constant", "cosine", "linear"]
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "adafactor", "sgd"]
Precision = Literal["fp32", "bf16", "fp16"]
WeightDtype = Literal["fp32", "bf16"]
Rounding = Literal["stochastic", "kahan", "nearest"]
PriorTarget = Literal["images", "base_model"]


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass
class TrainJob:
    """Hyper-parameters of one training run, shared by every method."""

    method: str = field(default="lora", **_help("Training method (a name registered in trainers.methods)."))
    method_options: dict[str, Any] = field(default_factory=dict, **_help("Options of the method (e.g. LoRA rank)."))
    steps: int = field(default=500, **_help("Optimizer steps to train for (each step sees batch_size x grad_accumulation samples)."))
    batch_size: int = field(default=1, **_help("Images per forward pass."))
    grad_accumulation: int = field(default=1, **_help("Forward passes whose gradients are summed before each optimizer step."))
    learning_rate: float = field(default=1e-4, **_help("Learning rate of the main trainable weights (UNet LoRA: 1e-4 is kohya's default)."))
    text_encoder_lr: float = field(default=5e-5, **_help("Learning rate of text-encoder weights, when the method trains them."))
    optimizer: Optimizer = field(default="adamw", **_help("adamw; adamw8bit (bitsandbytes, GPU); prodigy (prodigyopt; set learning_rate 1.0); adafactor; sgd."))
    weight_decay: float = field(default=1e-2, **_help("Decoupled weight decay of AdamW."))
    lr_scheduler: Scheduler = field(default="constant", **_help("Learning-rate schedule after warm-up."))
    warmup_steps: int = field(default=0, **_help("Optimizer steps of linear learning-rate warm-up."))
    max_grad_norm: float = field(default=1.0, **_help("Clip the gradient norm to this value; 0 turns clipping off."))
    loss_type: LossType = field(default="mse", **_help("mse, or huber (robust to outliers)."))
    huber_delta: float = field(default=0.1, **_help("Huber loss threshold (only for loss_type huber)."))
    min_snr_gamma: float = field(default=0.0, **_help("Min-SNR-gamma loss weighting (5 is the paper's value); 0 turns it off."))
    noise_offset: float = field(default=0.0, **_help("Noise offset (e.g. 0.05) to learn very dark or bright images."))
    prior_loss_weight: float = field(default=1.0, **_help("Weight of the class-image (prior preservation) loss, when the dataset has class images."))
    prior_target: PriorTarget = field(default="images", **_help("What the class-image loss pulls towards: images (DreamBooth's prior preservation: the class image itself) or base_model (the base model's own prediction on the same noisy class image, computed with the trained weights bypassed: it penalises only drift from the base, with far less noise; one extra forward pass per class batch)."))
    timestep_range: tuple[float, float] = field(default=(0.0, 1.0), **_help("Fraction of the noise schedule to sample timesteps from (0 = least noise)."))
    precision: Precision = field(default="fp32", **_help("Autocast dtype for the forward pass; trainable weights stay fp32."))
    gradient_checkpointing: bool = field(default=False, **_help("Recompute activations in the backward pass: less memory, ~30% slower."))
    weight_dtype: WeightDtype = field(default="fp32", **_help("Storage of the trainable weights: fp32 (master weights) or bf16 (full-bf16: half the weight and optimizer-state memory; see weight_rounding)."))
    weight_rounding: Rounding = field(default="stochastic", **_help("How updates are written into bf16 weights: stochastic rounding (OneTrainer), kahan (compensation buffer, exact sums), or nearest (small updates get lost)."))
    fused_backward: bool = field(default=False, **_help("Step each weight as soon as its gradient is ready and free the gradient (kohya's fused backward pass): no full set of gradients in memory. Needs grad_accumulation 1; clips each weight's gradient on its own."))
    ema_decay: float = field(default=0.0, **_help("Keep an exponential moving average of the trained weights with this decay (e.g. 0.999); 0 turns it off."))
    ema_warmup_steps: int = field(default=0, **_help("The EMA decay ramps linearly from 0 to ema_decay over this many steps (0 = full decay from the start)."))
    ema_on_cpu: bool = field(default=False, **_help("Keep the EMA in CPU memory (saves accelerator memory, slower steps)."))
    seed: int = field(default=0, **_help("Seed of weight init, data order, noise and timesteps: same seed, same result."))
    checkpoint_every: int = field(default=0, **_help("Write a resumable checkpoint every N optimizer steps (0 = only on cancel/error and at the end)."))
    keep_checkpoints: int = field(default=2, **_help("How many periodic checkpoints of a run to keep."))
    run_name: str = field(default="personalize", **_help("Name of the run: its checkpoints folder and output file names."))
    config_version: int = CONFIG_VERSION

    def __post_init__(self):
        positive_ints = ("steps", "batch_size", "grad_accumulation")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate}.")
        if self.text_encoder_lr < 0:
            raise ValueError(f"`text_encoder_lr` must be 0 or more, got {self.text_encoder_lr}.")
        lo, hi = self.timestep_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"`timestep_range` must satisfy 0 <= start < end <= 1, got {self.timestep_range}.")
        for name, allowed in (("loss_type", LossType), ("lr_scheduler", Scheduler), ("optimizer", Optimizer), ("precision", Precision),
                              ("weight_dtype", WeightDtype), ("weight_rounding", Rounding),
                              ("prior_target", PriorTarget)):
            if getattr(self, name) not in allowed.__args__:
                raise ValueError(f"`{name}` must be one of {allowed.__args__}, got {getattr(self, name)!r}.")
        if self.prior_loss_weight < 0:
            raise ValueError(f"`prior_loss_weight` must be 0 or more, got {self.prior_loss_weight}.")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("`warmup_steps` and `checkpoint_every` must be >= 0 and `keep_checkpoints` >= 1.")
        if self.fused_backward and self.grad_accumulation > 1:
            raise ValueError("`fused_backward` steps each weight during backward, so it cannot accumulate gradients: "
                             "set `grad_accumulation` to 1 or turn `fused_backward` off.")
        if (self.fused_backward or self.weight_dtype != "fp32") and self.optimizer == "prodigy":
            raise ValueError("`optimizer`=prodigy adapts one step size over all weights, which per-weight updates "
                             "(`fused_backward`, `weight_dtype` bf16) cannot do: use adamw or adafactor.")
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_warmup_steps < 0:
            raise ValueError(f"`ema_decay` must be in [0, 1) (e.g. 0.999) and `ema_warmup_steps` >= 0, got "
                             f"{self.ema_decay} and {self.ema_warmup_steps}.")
        self.timestep_range = (float(lo), float(hi))

    @property
    def micro_steps(self) -> int:
        return self.steps * self.grad_accumulation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJob:
        data = migrate(dict(data))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(known)}")
        if "timestep_range" in data:
            data["timestep_range"] = tuple(data["timestep_range"])
        return cls(**data)


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a saved job of an older `config_version` to the current one."""
    version = data.get("config_version", CONFIG_VERSION)
    if version > CONFIG_VERSION:
        raise ValueError(f"this job was written by a newer version of the pack (config_version {version}); update the pack.")
    data["config_version"] = CONFIG_VERSION
    return data


def help_text(name: str) -> str:
    """The help of a TrainJob field, for node tooltips."""
    return next(f.metadata["help"] for f in dataclasses.fields(TrainJob) if f.name == name)
