"""Validation previews during training: a settings node, and a Reporter that samples images with the
current trained weights through ComfyUI's own sampler every N steps and sends them to the browser."""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import comfy.samplers
import folder_paths
import numpy as np
import torch
from PIL import Image

from ..trainers.formats.files import safe_stem, write_new_file
from ..trainers.model_runtime import load_for_training
from ..trainers.progress import Reporter
from . import routes
from ._api import io

log = logging.getLogger("comfyui-personalize")
Previews = io.Custom("PERSONALIZE_PREVIEWS")
MAX_PROMPTS = 8
PREVIEW_SUBFOLDER = "personalize/previews"


@dataclass
class PreviewSettings:
    """What to render and how often: one image per prompt, same seed every time, ComfyUI's sampler."""

    vae: object
    prompts: list[str]
    negative_prompt: str = ""
    every_n_steps: int = 100
    sample_steps: int = 20
    cfg: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    sampler_name: str = "euler"
    scheduler: str = "normal"

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("`prompts` is empty: write one validation prompt per line (e.g. 'a photo of sks cross').")
        if len(self.prompts) > MAX_PROMPTS:
            raise ValueError(f"`prompts` has {len(self.prompts)} lines; at most {MAX_PROMPTS} previews are rendered per "
                             "round, so keep the ones you want to watch.")
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise ValueError(f"`{name}`={getattr(self, name)} must be a multiple of 8.")

    def due(self, step: int) -> bool:
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def rounds_after(self, step: int, total: int) -> int:
        return total // self.every_n_steps - step // self.every_n_steps if self.every_n_steps > 0 else 0


def _encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _stop_if_interrupted(*_) -> None:
    """Sampler callback: without one, ComfyUI's sampling loop never checks for Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def _to_png(image: torch.Tensor, path) -> None:
    pixels = np.clip(image.float().cpu().numpy() * 255.0, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=4)


class PreviewReporter(Reporter):
    """The engine's Reporter plus validation images every `settings.every_n_steps` steps."""

    def __init__(self, total_steps: int, send, settings: PreviewSettings, run_name: str):
        super().__init__(total_steps, send)
        self.settings = settings
        stem = safe_stem(run_name, input_name="run_name").replace("/", "_")
        self.subfolder = f"{PREVIEW_SUBFOLDER}/{stem}_{uuid.uuid4().hex[:8]}"
        self.attached = None
        self._text = {}
        self._round_seconds: list[float] = []

    def bind(self, attached, conditioner) -> None:
        if attached.clip is None:
            raise ValueError("`previews` need the CLIP the model is trained with; this method trains without one. "
                             "Disconnect `previews`.")
        self.attached = attached

    def side_work_left(self, step: int) -> float:
        if not self._round_seconds:
            return 0.0
        average = sum(self._round_seconds) / len(self._round_seconds)
        return average * self.settings.rounds_after(step, self.total)

    def step(self, step: int, loss: float, lr: float) -> None:
        super().step(step, loss, lr)
        if self.attached is None or not self.settings.due(step):
            return
        started = time.perf_counter()
        try:
            images = self.render(step)
        except comfy.model_management.InterruptProcessingException:
            raise
        except Exception as exc:  # a failed preview must not end a long run: report it and stop previewing
            log.warning("previews stopped at step %d: %s", step, exc, exc_info=True)
            self.attached = None
            self.send("personalize.preview", {"step": step, "total": self.total, "images": [], "error": str(exc)})
            return
        finally:
            self.exclude(time.perf_counter() - started)
        seconds = time.perf_counter() - started
        self._round_seconds.append(seconds)
        self.send("personalize.preview", {"step": step, "total": self.total, "images": images, "seconds": seconds})

    def conditioning(self, text: str):
        """CONDITIONING of `text` with the trained CLIP; cached when the text encoder does not train."""
        if self.attached.trains_text_encoder:
            return _encode(self.attached.clip, text)
        if text not in self._text:
            self._text[text] = _encode(self.attached.clip, text)
        return self._text[text]

    def render(self, step: int) -> list[dict]:
        """Sample one image per prompt with the weights as they are now; returns /view references."""
        model = self.attached.model
        try:
            # The loop seeds its own randomness per step; fork so sampling leaves no trace in the global RNG.
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                return [self._sample(model, step, index, prompt) for index, prompt in enumerate(self.settings.prompts)]
        finally:
            # Sampling ends with the patcher's cleanup (and the VAE may have evicted it): back to the training state.
            load_for_training([model] + ([self.attached.clip.patcher] if self.attached.trains_text_encoder else []))

    def _sample(self, model, step: int, index: int, prompt: str) -> dict:
        s = self.settings
        ratio = s.vae.spacial_compression_encode()
        empty = torch.zeros([1, 4, s.height // ratio, s.width // ratio], device=comfy.model_management.intermediate_device())
        latent = comfy.sample.fix_empty_latent_channels(model, empty)
        noise = comfy.sample.prepare_noise(latent, s.seed)
        samples = comfy.sample.sample(model, noise, s.sample_steps, s.cfg, s.sampler_name, s.scheduler,
                                      self.conditioning(prompt), self.conditioning(s.negative_prompt), latent,
                                      disable_pbar=True, seed=s.seed, callback=_stop_if_interrupted)
        image = s.vae.decode(samples)
        image = image.reshape(-1, *image.shape[-3:])[0]
        path = write_new_file(f"{folder_paths.get_temp_directory()}/{self.subfolder}", f"step_{step:07d}_p{index}", ".png",
                              lambda tmp: _to_png(image, tmp))
        return {"filename": path.name, "subfolder": self.subfolder, "type": "temp", "prompt": prompt}


class PersonalizePreviewSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizePreviewSettings",
            display_name="Personalize Training Previews",
            category="personalize/train",
            description="Sample validation images with the weights being trained every N steps (fixed seed, ComfyUI's "
                        "own sampler); the training node's live view shows them. Connect to a training node's `previews`.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE that decodes the previews (usually the checkpoint's)."),
                io.String.Input("prompts", default="a photo of sks cross", multiline=True,
                                tooltip=f"Validation prompts, one per line (at most {MAX_PROMPTS}); one image each."),
                io.String.Input("negative_prompt", default="", tooltip="Negative prompt for every preview."),
                io.Int.Input("every_n_steps", default=100, min=0, max=1_000_000,
                             tooltip="Render previews every N optimizer steps; 0 turns previews off."),
                io.Int.Input("sample_steps", default=20, min=1, max=200, tooltip="Sampler steps per preview (a few are enough to watch progress)."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance scale."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Noise seed; the same for every round, so images are comparable."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Preview width in pixels."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Preview height in pixels."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip="ComfyUI sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal", tooltip="ComfyUI noise schedule."),
            ],
            outputs=[Previews.Output(display_name="previews", tooltip="Preview settings for a training node's `previews` input.")],
        )

    @classmethod
    def execute(cls, vae, prompts, negative_prompt, every_n_steps, sample_steps, cfg, seed, width, height, sampler_name,
                scheduler) -> io.NodeOutput:
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        return io.NodeOutput(PreviewSettings(vae, lines, negative_prompt, every_n_steps, sample_steps, cfg, seed, width,
                                             height, sampler_name, scheduler))


routes.register()
NODES = [PersonalizePreviewSettings]
