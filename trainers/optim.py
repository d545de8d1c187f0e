"""Optimizers and learning-rate schedules for the loop."""
from __future__ import annotations

import importlib.util
import math

import torch

from .job import TrainJob
from .methods import ParamGroup
from .precision import ParamwiseOptimizer


def group_learning_rate(job: TrainJob, group: ParamGroup) -> float:
    """The group's own rate, else its role's (0: the group does not train)."""
    return group.lr if group.lr is not None else (job.text_encoder_lr if group.role == "text_encoder" else job.learning_rate)


def build_optimizer(job: TrainJob, groups: list[ParamGroup]) -> torch.optim.Optimizer:
    """One optimizer over all groups, each with its role's learning rate."""
    param_groups = []
    for group in groups:
        lr = group_learning_rate(job, group)
        if not 0.0 < group.train_fraction <= 1.0:
            raise ValueError(f"the training fraction of {group.name or group.role!r} must be in (0, 1], got {group.train_fraction}.")
        if group.params and lr > 0:
            param_groups.append({"params": group.params, "lr": lr, "name": group.name,
                                 "train_fraction": group.train_fraction})
    if not param_groups:
        raise ValueError("nothing to train: every trainable group has learning rate 0.")
    low_precision = any(p.dtype != torch.float32 for g in param_groups for p in g["params"])
    if job.fused_backward or low_precision:
        # Per-weight optimizers: fused backward steps and bf16 rounding (trainers/precision.py).
        return ParamwiseOptimizer(lambda groups: _optimizer(job, groups), param_groups, rounding=job.weight_rounding,
                                  fused=job.fused_backward, max_grad_norm=job.max_grad_norm, seed=job.seed)
    return _optimizer(job, param_groups)


def _optimizer(job: TrainJob, param_groups: list[dict]) -> torch.optim.Optimizer:
    if job.optimizer == "adamw":
        fused = all(p.dtype == torch.float32 for g in param_groups for p in g["params"])
        return torch.optim.AdamW(param_groups, weight_decay=job.weight_decay, fused=fused or None)
    if job.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=0.9)
    if job.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(param_groups, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=job.weight_decay)
    if job.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
            raise ValueError("`optimizer`=adamw8bit needs the bitsandbytes package and a CUDA GPU; use adamw here.")
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(param_groups, weight_decay=job.weight_decay)
    if job.optimizer == "prodigy":
        if importlib.util.find_spec("prodigyopt") is None:
            raise ValueError("`optimizer`=prodigy needs the prodigyopt package (pip install prodigyopt); use adamw otherwise.")
        from prodigyopt import Prodigy
        return Prodigy(param_groups, weight_decay=job.weight_decay)
    raise ValueError(f"unknown `optimizer` {job.optimizer!r}")


def lr_factor(job: TrainJob, step: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (pure function of the step)."""
    if job.warmup_steps and step < job.warmup_steps:
        return (step + 1) / (job.warmup_steps + 1)
    decay_steps = max(1, job.steps - job.warmup_steps)
    progress = min(1.0, (step - job.warmup_steps) / decay_steps)
    if job.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if job.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def build_scheduler(job: TrainJob, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The job's schedule for every group; a group with `train_fraction` < 1 stops (lr 0) after it."""
    def group_factor(fraction: float):
        last_step = math.ceil(fraction * job.steps)
        return lambda step: lr_factor(job, step) if step < last_step else 0.0

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [group_factor(g.get("train_fraction", 1.0)) for g in optimizer.param_groups])
