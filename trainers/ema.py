"""Exponential moving average of the trained weights (diffusers' EMAModel idea, for any method's tensors).

The shadow is fp32 whatever the weights' storage (bf16 weights would round the tiny EMA steps away),
optionally kept on the CPU to save accelerator memory. Its tensors travel inside the loop's resumable
checkpoint under `EMA_PREFIX`, so a resumed run continues the same average bit for bit.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("comfyui-personalize")

EMA_PREFIX = "__ema__."


class EMA:
    """shadow <- decay_t * shadow + (1 - decay_t) * weight after every optimizer step.

    Warm-up: `decay_t = decay * min(1, t / warmup_steps)` at optimizer step t, so the average starts
    as a copy of the weights and forgets early, far-from-converged values quickly.
    """

    def __init__(self, params: list[torch.Tensor], decay: float, warmup_steps: int = 0, on_cpu: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"`ema_decay` must be in (0, 1) (e.g. 0.999), got {decay}.")
        self.params, self.decay, self.warmup_steps = list(params), float(decay), int(warmup_steps)
        with torch.no_grad():
            self.shadow = [p.detach().to("cpu" if on_cpu else p.device, torch.float32, copy=True) for p in self.params]

    def decay_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * min(1.0, step / self.warmup_steps)

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        for shadow, param in zip(self.shadow, self.params):
            # Blocking: a non-blocking copy from a GPU into CPU memory may not have arrived when lerp_ reads it.
            shadow.lerp_(param.detach().to(shadow.device, torch.float32), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{EMA_PREFIX}{i}": s for i, s in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            log.warning("the checkpoint has no EMA (it was trained without one): the EMA starts from the resumed weights.")
            for shadow, param in zip(self.shadow, self.params):  # made before the resume loaded them
                shadow.copy_(param.detach())
            return
        if len(state) != len(self.shadow):
            raise ValueError(f"the checkpoint's EMA has {len(state)} tensors, this run trains {len(self.shadow)}.")
        for i, shadow in enumerate(self.shadow):
            shadow.copy_(state[f"{EMA_PREFIX}{i}"])

    def named(self, named_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The EMA of each tensor of `named_tensors` (e.g. a method's trainable_state_dict, whose tensors
        share storage with the trained parameters), by the same names."""
        by_storage = {p.data_ptr(): s for p, s in zip(self.params, self.shadow)}
        missing = [k for k, t in named_tensors.items() if t.data_ptr() not in by_storage]
        if missing:
            raise ValueError(f"no EMA for {missing[:3]}: these tensors are not the trained parameters.")
        return {k: by_storage[t.data_ptr()] for k, t in named_tensors.items()}


def from_job(job, params: list[torch.Tensor]) -> EMA | None:
    if job.ema_decay <= 0:
        return None
    return EMA(params, job.ema_decay, job.ema_warmup_steps, job.ema_on_cpu)


def join_state(method_state: dict[str, torch.Tensor], ema: EMA | None) -> dict[str, torch.Tensor]:
    """The method's tensors plus the EMA's, for one resumable checkpoint."""
    return {**method_state, **ema.state_dict()} if ema is not None else method_state


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of `join_state`: (method tensors, EMA tensors)."""
    method = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    return method, {k: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
