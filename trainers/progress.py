"""Progress, cancellation and live events, reached by the loop only through `Reporter`."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import comfy.model_management
import comfy.utils


class TrainingInterrupted(Exception):
    """Raised by the loop after a cancel, once the resumable checkpoint is written."""

    def __init__(self, checkpoint_path, step: int):
        super().__init__(f"training cancelled at step {step}; resumable checkpoint: {checkpoint_path}")
        self.checkpoint_path = checkpoint_path
        self.step = step


class Reporter:
    """ComfyUI's progress bar (which is also a cancellation point) plus optional event sink.

    `send(event, payload)` is given by the node layer (the websocket) and is optional, so the
    engine runs headless too. Time spent outside training (previews, see `exclude`) does not count
    in it/s; the ETA adds the expected time of the side work still to come (`side_work_left`).
    """

    def __init__(self, total_steps: int, send: Callable[[str, dict], None] | None = None):
        self.total = total_steps
        self.send = send or (lambda event, payload: None)
        self.bar = comfy.utils.ProgressBar(total_steps)
        self.started = time.perf_counter()
        self.first_step = None
        self.excluded_s = 0.0

    def interrupted(self) -> bool:
        return comfy.model_management.processing_interrupted()

    def bind(self, attached, conditioner) -> None:
        """Called once before the first step with the trained clones (e.g. to render previews); default: nothing."""

    def start(self, summary: dict[str, Any]) -> None:
        self.send("personalize.start", summary)

    def exclude(self, seconds: float) -> None:
        """Time spent on side work (previews) since the last step: not training time."""
        self.excluded_s += seconds

    def side_work_left(self, step: int) -> float:
        """Expected seconds of side work after `step` (subclasses that render previews say how much)."""
        return 0.0

    def timing(self, step: int) -> tuple[float, float | None]:
        """(training steps per second, seconds left) after `step`; the first step (warm-up) is not timed."""
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = (step - 1, now, self.excluded_s)
        done_since = step - self.first_step[0]
        elapsed = now - self.first_step[1] - (self.excluded_s - self.first_step[2])
        rate = done_since / elapsed if elapsed > 0 and done_since > 0 else 0.0
        eta = (self.total - step) / rate + self.side_work_left(step) if rate > 0 else None
        return rate, eta

    def step(self, step: int, loss: float, lr: float) -> None:
        rate, eta = self.timing(step)
        self.send("personalize.step", {"step": step, "total": self.total, "loss": loss, "lr": lr,
                                        "it_per_s": rate, "eta_s": eta})
        self.bar.update_absolute(step, self.total)  # after the event: a cancel raised here still shows this step

    def checkpoint(self, path, step: int, reason: str) -> None:
        self.send("personalize.checkpoint", {"path": str(path), "step": step, "reason": reason})

    def end(self, summary: dict[str, Any]) -> None:
        self.send("personalize.end", summary)
