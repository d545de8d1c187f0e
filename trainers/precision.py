"""Memory-saving update paths: full-bf16 weights with stochastic rounding or Kahan compensation, and the
fused backward pass (each parameter steps and frees its gradient as soon as backward produced it).

Both work through `ParamwiseOptimizer`: one ordinary optimizer per parameter (the PyTorch recipe for
optimizer-in-backward), so any torch optimizer gains them. A bf16 parameter is stepped on a temporary
fp32 copy (its optimizer state is stored in bf16 too and widened for the step), and the result is
written back with stochastic rounding (OneTrainer's choice) or with a Kahan compensation buffer, so
updates smaller than bf16's resolution are not lost. Only one parameter is widened at a time.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

Rounding = Literal["nearest", "stochastic", "kahan"]
WeightDtype = Literal["fp32", "bf16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cast_trainables(params: list[torch.Tensor], weight_dtype: str) -> None:
    """Store trainable floating tensors in `weight_dtype` (one at a time: no transient full copy)."""
    dtype = DTYPES[weight_dtype]
    with torch.no_grad():
        for p in params:
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def stochastic_round_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Write fp32 `source` into bf16 `target`, rounding up with probability equal to the dropped fraction.

    bf16 is the top 16 bits of fp32: adding uniform noise to the low 16 bits of the (sign-magnitude)
    pattern and truncating rounds the magnitude up exactly that often, so E[target] == source.
    """
    bits = source.detach().to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536)  # keep the top 16 bits
    target.copy_(rounded.view(torch.float32))
    return target


def kahan_update_(param: torch.Tensor, update: torch.Tensor, compensation: torch.Tensor) -> None:
    """param += update in bf16, carrying the rounding error in `compensation` (Kahan summation)."""
    y = update + compensation.float()
    old = param.float()
    param.copy_(old + y)
    compensation.copy_(y - (param.float() - old))


class ParamwiseOptimizer(torch.optim.Optimizer):
    """One inner optimizer per parameter, stepped in turn or, with `fused`, from the backward pass.

    `param_groups` are the inner optimizers' own group dicts, so learning-rate schedulers reach them.
    With `fused` each parameter's gradient is clipped on its own (`max_grad_norm`; kohya's fused
    backward pass does the same) and freed right after its step.
    """

    def __init__(self, make_inner: Callable[[list[dict]], torch.optim.Optimizer], param_groups: list[dict], *,
                 rounding: Rounding = "stochastic", fused: bool = False, max_grad_norm: float = 0.0, seed: int = 0):
        params = [p for g in param_groups for p in g["params"]]
        super().__init__(params, {})
        self.inner, self.params = [], []
        for group in param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                self.inner.append(make_inner([{"params": [p], **options}]))
                self.params.append(p)
        self.param_groups = [o.param_groups[0] for o in self.inner]
        self.rounding, self.fused, self.max_grad_norm, self.seed = rounding, fused, max_grad_norm, seed
        self.counts = [0] * len(self.params)
        self.compensation: dict[int, torch.Tensor] = {}
        if rounding == "kahan":
            self.compensation = {i: torch.zeros_like(p) for i, p in enumerate(self.params) if p.dtype == torch.bfloat16}
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)] if fused else []

    def _hook(self, index: int):
        def hook(param):
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
            self._step_one(index)
            param.grad = None
        return hook

    @torch.no_grad()
    def _step_one(self, index: int) -> None:
        param, inner = self.params[index], self.inner[index]
        if param.grad is None:
            return
        self.counts[index] += 1
        if param.dtype == torch.float32:
            inner.step()
            return
        # Step a temporary fp32 copy (state widened too), then store it back in the parameter's dtype.
        low = param.data
        state = inner.state.get(param, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                state[key] = value.float()
        param.data = low.float()
        param.grad = param.grad.float()
        inner.step()
        widened = param.data
        param.data = low
        for key, value in inner.state[param].items():
            if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                inner.state[param][key] = value.to(low.dtype)
        if self.rounding == "stochastic":
            generator = torch.Generator(device=low.device)
            generator.manual_seed((self.seed * 1_000_003 + index * 7_919 + self.counts[index]) % (2**63))
            stochastic_round_(low, widened, generator)
        elif self.rounding == "kahan" and index in self.compensation:
            kahan_update_(low, widened - low.float(), self.compensation[index])
        else:
            low.copy_(widened)

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ParamwiseOptimizer does not take a closure.")
        if not self.fused:  # fused: every parameter already stepped during backward
            for index in range(len(self.params)):
                self._step_one(index)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None

    def state_dict(self):
        return {"inner": [o.state_dict() for o in self.inner], "counts": list(self.counts),
                "compensation": {int(i): c for i, c in self.compensation.items()}}

    def load_state_dict(self, state_dict):
        if len(state_dict.get("inner", [])) != len(self.inner):
            raise ValueError("the checkpoint's optimizer state does not match this run (`fused_backward`, "
                             "`weight_dtype` or the trained weights differ).")
        for inner, saved in zip(self.inner, state_dict["inner"]):
            inner.load_state_dict(saved)
        self.param_groups[:] = [o.param_groups[0] for o in self.inner]  # load_state_dict made new group dicts
        self.counts = list(state_dict["counts"])
        for i, c in state_dict.get("compensation", {}).items():
            self.compensation[int(i)].copy_(c)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def release(optimizer) -> None:
    """Detach the fused backward hooks of an optimizer (no-op for ordinary optimizers)."""
    if isinstance(optimizer, ParamwiseOptimizer):
        optimizer.remove_hooks()
