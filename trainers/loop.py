"""The one training loop, shared by every method (diffusers' order, OneTrainer's separation).

freeze the base -> attach the method's trainable weights to clones -> optimizer/scheduler ->
resume -> per step: batch, noise + timesteps from the model's own sampling, predict, loss in the
model's prediction space, backward (accumulated), clip, step -> checkpoint -> done.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy.model_management
import torch

from . import checkpoint as ckpt
from . import distributed, objectives, precision
from . import ema as ema_mod
from .conditioning import CaptionConditioner
from .data.captions import CaptionOptions, caption_rng, is_identity, process_caption
from .data.dataset import BatchSampler, TrainingData
from .job import TrainJob
from .methods import Attached, TrainingMethod
from .model_runtime import (
    Denoiser,
    gradient_checkpointing,
    load_for_training,
    make_autograd_safe,
    release_training_model,
    trainable_text_encoder,
    unload_clones,
)
from .optim import build_optimizer, build_scheduler, group_learning_rate
from .progress import Reporter

log = logging.getLogger("comfyui-personalize")

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    method: TrainingMethod
    attached: Attached
    global_step: int
    loss_history: list[float]
    final_checkpoint: Path | None
    summary: dict[str, Any] = field(default_factory=dict)
    ema: ema_mod.EMA | None = None  # the EMA of the trained tensors, when job.ema_decay > 0


class _Cancelled(Exception):
    pass


def _micro_step_generator(seed: int, micro_step: int) -> torch.Generator:
    # One generator per micro step: noise, timesteps and flips depend only on (seed, step),
    # so a resumed run draws exactly what the uninterrupted run would have drawn.
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step * 7_919 + 17) % (2**63))


def train(job: TrainJob, method: TrainingMethod, model, clip, data: TrainingData, *, checkpoint_dir: Path,
          resume_from: str | Path | None = None, reporter: Reporter | None = None, text_cache=None,
          clip_fp: str | None = None) -> TrainResult:
    """Train `method` on `data` with ComfyUI MODEL/CLIP inputs (never mutated) and return the result.

    `text_cache`/`clip_fp`: an optional on-disk text-encoder cache (trainers.data.cache) for caption
    variants, keyed by the CLIP's fingerprint.
    """
    if len(data) == 0:
        raise ValueError("the dataset is empty: add images to the dataset folder.")
    if job.fused_backward and distributed.current().enabled:
        raise ValueError("`fused_backward` steps each weight inside backward, before the data-parallel gradient "
                         "all-reduce, so the processes would drift apart: turn it off for multi-process training.")
    reporter = reporter or Reporter(job.steps)
    checkpoint_dir = Path(checkpoint_dir)
    with torch.inference_mode(False), torch.enable_grad():
        return _train(job, method, model, clip, data, checkpoint_dir, resume_from, reporter, text_cache, clip_fp)


def _train(job, method, model, clip, data, checkpoint_dir, resume_from, reporter, text_cache, clip_fp) -> TrainResult:
    # 1. Freeze the base and attach the method's trainable weights to clones.
    unload_clones(model)  # a loaded sibling's patches (e.g. an earlier run's training clone) are not the base
    if clip is not None:
        unload_clones(clip.patcher)
    # After the unloading: it puts the siblings' backups back, the module's own inference-mode weights.
    make_autograd_safe(model.model)
    model.model.requires_grad_(False)
    if clip is not None:
        clip.cond_stage_model.requires_grad_(False)
    attached = method.attach(model, clip, torch.Generator().manual_seed(job.seed))
    if attached.trains_text_encoder:
        make_autograd_safe(attached.clip.cond_stage_model)
    patcher = attached.model
    device = patcher.load_device
    # A group at learning rate 0 does not train: no gradients (they would pile up outside the optimizer and
    # take over the clipping norm), and its text path runs without them.
    trained_groups = [g for g in attached.groups if g.params and group_learning_rate(job, g) > 0]
    trainables = [p for g in trained_groups for p in g.params]
    precision.cast_trainables(trainables, job.weight_dtype)
    for p in trainables:
        p.requires_grad_(True)
    to_load = [patcher] + ([attached.clip.patcher] if attached.trains_text_encoder else [])
    load_for_training(to_load)

    # 2. Optimizer, schedule, and resume.
    optimizer = build_optimizer(job, attached.groups)
    scheduler = build_scheduler(job, optimizer)
    ema = ema_mod.from_job(job, trainables)
    global_step, loss_history = 0, []
    if resume_from:
        state = ckpt.load_state(resume_from)
        _check_resumable(job, state["job"], resume_from)
        method_state, ema_state = ema_mod.split_state(state["method_state"])
        method.load_trainable_state_dict(method_state)
        if ema is not None:
            ema.load_state_dict(ema_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The saved lr belongs to the saved run's schedule (0 at the end of a finished linear/cosine run):
        # a run resumed into more steps continues on its own schedule from the saved step.
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        global_step, loss_history = int(state["global_step"]), list(state["loss_history"])
        log.info("resumed from %s at step %d", resume_from, global_step)
    distributed.broadcast_parameters(trainables)  # data parallel: every rank starts from rank 0's weights

    # 3. Data streams (instance images, and class images for prior preservation) and conditioning.
    model_sampling = patcher.get_model_object("model_sampling")
    base_model = patcher.model
    conditioner = CaptionConditioner(patcher, attached.clip, device, trains_text_encoder=attached.trains_text_encoder,
                                     text_cache=text_cache, clip_fp=clip_fp, dataset_clip_key=data.clip_key,
                                     trained_words=attached.trained_words)
    streams = [_Stream(data.samples, job.batch_size, job.seed, 1.0, data.caption_options)]
    for images, last in streams[0].sampler.short_batches():
        # kohya cuts epochs the same way; with few images the short batch is a large share of all steps.
        log.warning("dataset: %d image(s) in a bucket at batch size %d: every epoch ends with a batch of %d, a noisy "
                    "step. Repeats (kohya `N_name` folders) or a batch size that divides the image count avoid it.",
                    images, job.batch_size, last)
    if data.class_samples and job.prior_loss_weight > 0:
        # Class captions get the caption choices (one line of several) but never shuffle or dropout.
        class_captions = (CaptionOptions(caption_choices=data.caption_options.caption_choices)
                          if data.caption_options is not None else None)
        streams.append(_Stream(data.class_samples, job.batch_size, job.seed + 1, job.prior_loss_weight, class_captions,
                               base_model_target=job.prior_target == "base_model", is_class=True))
    if any(stream.base_model_target for stream in streams):
        with method.base_behaviour():  # fails now, with the method's reason, rather than at the first class batch
            pass
    denoiser = Denoiser(patcher, keep_loaded=to_load)
    autocast = (torch.autocast(device.type, dtype=_AUTOCAST[job.precision]) if job.precision in _AUTOCAST
                else contextlib.nullcontext())
    summary = {"method": method.name, "steps": job.steps, "start_step": global_step, "samples": len(data),
               "class_samples": len(data.class_samples), "buckets": len(data.buckets()),
               "trainable_params": sum(p.numel() for p in trainables), **method.describe()}
    log.info("training %s", summary)
    text_groups = [g for g in trained_groups if g.acts_in_text_encoder]
    # The step from which no text-path group trains any more (pivotal tuning's embedding fraction, DreamBooth's
    # text_encoder_fraction): from there the text encoder runs without gradients, once per caption.
    text_path_stop = (max((math.ceil(g.train_fraction * job.steps) for g in text_groups), default=0)
                      if attached.trains_text_encoder else job.steps)
    reporter.bind(attached, conditioner)
    reporter.start(summary)

    def save(name: str, reason: str) -> Path:
        path = checkpoint_dir / name
        if distributed.is_writer():  # data parallel: rank 0 alone writes
            ckpt.save_state(path, job=job.to_dict(), method_state=ema_mod.join_state(method.trainable_state_dict(), ema),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            global_step=global_step, loss_history=loss_history,
                            extra={"method": method.describe()})
        reporter.checkpoint(path, global_step, reason)
        return path

    # 4. The loop.
    started = time.perf_counter()
    try:
        text_encoder = attached.clip.cond_stage_model if attached.clip is not None else None
        with gradient_checkpointing(base_model.diffusion_model, job.gradient_checkpointing), \
                trainable_text_encoder(text_encoder, attached.trains_text_encoder):
            while global_step < job.steps:
                if global_step >= text_path_stop:
                    conditioner.stop_text_encoder_training()
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for micro in range(job.grad_accumulation):
                    if reporter.interrupted():
                        raise _Cancelled()
                    micro_step = global_step * job.grad_accumulation + micro
                    # Dropout in trained modules draws from the global RNG: seed it per micro step so
                    # that a resumed run repeats exactly what an uninterrupted one does.
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(_micro_step_generator(job.seed, micro_step).initial_seed())
                        loss = sum(stream.weight * _stream_loss(stream, micro_step, job, method, base_model, model_sampling,
                                                                denoiser, conditioner, autocast, device)
                                   for stream in streams) / job.grad_accumulation
                    loss.backward()
                    step_loss += loss.item()
                step_loss = distributed.sync_gradients(trainables, step_loss)  # sum over ranks, before clipping
                if not torch.isfinite(torch.tensor(step_loss)):
                    raise FloatingPointError(f"loss became {step_loss} at step {global_step + 1}: lower the learning rate "
                                             "or use precision fp32.")
                if job.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainables, job.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                global_step += 1
                if ema is not None:
                    ema.update(global_step)
                loss_history.append(step_loss)
                reporter.step(global_step, step_loss, lr)
                if job.checkpoint_every and global_step % job.checkpoint_every == 0 and global_step < job.steps:
                    save(f"step_{global_step:07d}.pt", "periodic")
                    if distributed.is_writer():
                        ckpt.prune(checkpoint_dir, job.keep_checkpoints)
    except (_Cancelled, comfy.model_management.InterruptProcessingException):
        optimizer.zero_grad(set_to_none=True)  # a partial accumulation is dropped; the step redoes it
        path = save(f"interrupted_step_{global_step:07d}.pt", "cancel")
        log.info("training cancelled at step %d; resume from %s", global_step, path)
        comfy.model_management.interrupt_current_processing(False)
        raise comfy.model_management.InterruptProcessingException() from None
    except Exception:
        if global_step > 0:
            path = save(f"crashed_step_{global_step:07d}.pt", "error")
            log.error("training failed at step %d; resumable checkpoint: %s", global_step, path)
        raise
    finally:
        precision.release(optimizer)
        for p in trainables:
            p.requires_grad_(False)
        release_training_model(to_load)

    final = save("final.pt", "end")
    method.finish()
    elapsed = time.perf_counter() - started
    summary.update({"final_loss": loss_history[-1] if loss_history else None, "seconds": elapsed,
                    "checkpoint": str(final), "text_encode_calls": conditioner.encode_calls})
    reporter.end(summary)
    return TrainResult(method=method, attached=attached, global_step=global_step, loss_history=loss_history,
                       final_checkpoint=final, summary=summary, ema=ema)


class _Stream:
    """One source of batches (instance or class images) with its loss weight and caption processing."""

    def __init__(self, samples, batch_size, seed, weight, caption_options, base_model_target: bool = False,
                 is_class: bool = False):
        self.samples, self.seed, self.weight = samples, seed, weight
        # Class images keep their class captions: a method's caption rewrite (the new token) is for instance images only.
        self.is_class = is_class
        # True: the target is the base model's own prediction on the same noisy input (output preservation),
        # not the sample's noise: zero loss at the start, it penalises only drift from the base, without the
        # variance of a noise target.
        self.base_model_target = base_model_target
        self.sampler = BatchSampler([s.bucket for s in samples], batch_size, seed)
        self.caption_options = caption_options
        if caption_options is not None and is_identity(caption_options, (s.caption for s in samples)):
            self.caption_options = None

    def captions(self, indices: list[int], micro_step: int) -> list[str]:
        if self.caption_options is None:
            return [self.samples[i].caption for i in indices]
        epoch = self.sampler.epoch_of(micro_step)
        return [process_caption(self.samples[i].caption, self.caption_options, caption_rng(self.seed, epoch, i))
                for i in indices]


def _stream_loss(stream: _Stream, micro_step, job, method, base_model, model_sampling, denoiser, conditioner, autocast,
                 device):
    """Loss of one batch of a stream: noise and timesteps from the model's sampling, prediction-space
    target, optional mask and min-SNR weights."""
    generator = _micro_step_generator(stream.seed, micro_step)
    indices = stream.sampler.indices(micro_step)
    samples = [stream.samples[i] for i in indices]
    # One of each sample's encoded variants (crops x flips), drawn from the step's generator.
    picks = [int(u * len(s.latents)) for s, u in zip(samples, torch.rand(len(samples), generator=generator).tolist())]
    latents = torch.stack([s.latents[p] for s, p in zip(samples, picks)]).float().to(device)
    latents = base_model.process_latent_in(latents)
    noised = objectives.add_noise(model_sampling, latents, generator, noise_offset=job.noise_offset,
                                  timestep_range=job.timestep_range)
    # Data parallel: the randomness above covers the whole global batch; this rank keeps its slice.
    global_count, part = len(indices), distributed.shard(len(indices))
    indices, samples, picks, latents = indices[part], samples[part], picks[part], latents[part]
    noised = distributed.take(noised, part)
    if not samples:
        return distributed.empty_loss(device)
    captions = stream.captions(indices, micro_step)
    model_conds = conditioner.batch(captions, samples, samples[0].latent, rewrite=not stream.is_class)
    extra = method.batch_extra(samples, picks, generator)
    with autocast:
        denoised = denoiser(noised.noisy, noised.sigmas, model_conds, extra)
    clean = latents
    if stream.base_model_target:
        with torch.no_grad(), method.base_behaviour():
            # Encoded outside autocast, as the trained path's captions are: the teacher differs only by the weights.
            base_conds = conditioner.base_batch(captions, samples, samples[0].latent, rewrite=not stream.is_class)
            with autocast:
                clean = denoiser(noised.noisy, noised.sigmas, base_conds, extra).float()
    model_pred, target = objectives.prediction_space(model_sampling, denoised.float(), clean, noised.noisy, noised.sigmas)
    masks = None
    if any(s.masks is not None for s in samples):
        masks = torch.stack([s.masks[p] if s.masks is not None else torch.ones(s.bucket[-2:])
                             for s, p in zip(samples, picks)]).to(device)
    losses = objectives.per_sample_loss(model_pred, target, job.loss_type, job.huber_delta, masks)
    if job.min_snr_gamma > 0:
        losses = losses * objectives.min_snr_weights(model_sampling, noised.sigmas, job.min_snr_gamma).to(losses)
    return distributed.shard_loss(losses, global_count)


_MUST_MATCH = ("method", "batch_size", "grad_accumulation", "seed", "optimizer", "weight_dtype", "fused_backward")


def _check_resumable(job: TrainJob, saved: dict, path) -> None:
    """A checkpoint resumes only a run of the same shape; say which setting differs."""
    for name in _MUST_MATCH:
        if saved.get(name, TrainJob.__dataclass_fields__[name].default) != getattr(job, name):
            raise ValueError(f"cannot resume from {Path(path).name}: it was trained with `{name}`={saved.get(name)!r}, "
                             f"this run has {getattr(job, name)!r}. Use the same settings or start a new run.")
    saved_opts = {k: v for k, v in saved.get("method_options", {}).items() if k != "initial_weights"}
    opts = {k: v for k, v in job.method_options.items() if k != "initial_weights"}
    if saved_opts != opts:
        raise ValueError(f"cannot resume from {Path(path).name}: method options differ (checkpoint {saved_opts}, "
                         f"this run {opts}).")
    if saved.get("steps", 0) > job.steps:
        raise ValueError(f"cannot resume from {Path(path).name}: it targets {saved['steps']} steps, more than `steps`={job.steps}.")
