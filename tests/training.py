"""Engine-level test helpers shared by the method tests: cancel a run at a step, then resume it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest


class CancelAt:
    """A Reporter that asks for a cancel once `step` optimizer steps are done (as /interrupt does)."""

    def __init__(self, progress, total: int, step: int):
        self.inner, self.step_to_cancel, self.done = progress.Reporter(total), step, 0

    def interrupted(self) -> bool:
        return self.done >= self.step_to_cancel

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, step, loss, lr):
        self.done = step
        self.inner.step(step, loss, lr)


def cancel_then_resume(progress, train: Callable[..., Any], folder: Path, *, total: int, at: int = 2) -> tuple[Any, Any]:
    """`train(folder, reporter=None, resume=None)` uninterrupted, then cancelled after step `at` (exactly one
    checkpoint written) and resumed from it; returns (uninterrupted result, resumed result)."""
    import comfy.model_management

    whole = train(folder / "whole")
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(folder / "split", reporter=CancelAt(progress, total, at))
    saved = sorted((folder / "split").glob("interrupted_step_*.pt"))
    assert [p.name for p in saved] == [f"interrupted_step_{at:07d}.pt"]
    return whole, train(folder / "split", resume=saved[0])
