"""Data-parallel training helpers for the one loop (torch.distributed; NCCL on GPUs, gloo on CPU).

The loop stays the same in one process and in N: `job.batch_size` is the *global* batch of a micro
step. Every rank draws the whole global batch's randomness (sample order, variant picks, noise,
timesteps) from the same (seed, step) generators, keeps its contiguous slice of it, and scales its
loss so that summing gradients over ranks gives exactly the gradient of the global batch mean. N
processes with batch B therefore train the same weights as one process with batch B (to float
tolerance), and a checkpoint resumes under any world size. Rank 0 alone writes files.

Why not `DistributedDataParallel`: the trainable tensors live in per-clone patches (LoRA branches,
attention patches), not in one `nn.Module` that DDP could wrap, so gradients are all-reduced here
in flat buckets after backward, the way DDP's reducer does it.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("comfyui-personalize")

_BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


_context = DistContext()


def current() -> DistContext:
    """The process's context: single-process (rank 0 of 1) unless `init_from_env` set it up."""
    return _context


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    backend: "nccl" when CUDA is available, else "gloo". Without torchrun's variables (or with a
    world of 1) this is a no-op that returns the single-process context.
    """
    global _context
    world = env_world_size()
    if world <= 1:
        _context = DistContext()
        return _context
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    _context = DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)
    log.info("distributed: rank %d of %d (local %d, %s)", rank, world, local_rank, backend)
    return _context


def shutdown() -> None:
    global _context
    if dist.is_initialized():
        dist.destroy_process_group()
    _context = DistContext()


def is_writer() -> bool:
    """Only rank 0 writes checkpoints, artifacts and progress."""
    return _context.is_writer


def barrier() -> None:
    if _context.enabled:
        dist.barrier()


def shard(count: int, ctx: DistContext | None = None) -> slice:
    """This rank's contiguous part of a global batch of `count` items (sizes differ by at most one;
    a rank may get none when the batch is smaller than the world). No item is taken twice."""
    ctx = ctx or _context
    return slice(ctx.rank * count // ctx.world_size, (ctx.rank + 1) * count // ctx.world_size)


def take(batch, part: slice):
    """The `part` rows of every tensor field of a dataclass batch (e.g. objectives.NoisedBatch)."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[part] for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def shard_loss(per_sample: torch.Tensor, global_count: int) -> torch.Tensor:
    """This rank's share of the global batch mean: sum of its per-sample losses / global batch size.

    Summed over ranks (by `sync_gradients`) this is exactly the mean over the global batch, also
    when the shards are uneven. In one process it is the plain mean.
    """
    if not _context.enabled:
        return per_sample.mean()
    return per_sample.sum() / global_count


def empty_loss(device) -> torch.Tensor:
    """A differentiable zero for a rank whose shard of a batch is empty."""
    return torch.zeros((), device=device, requires_grad=True)


def _buckets(tensors: list[torch.Tensor]):
    bucket, size = [], 0
    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= _BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def sync_gradients(params: list[torch.Tensor], local_loss: float) -> float:
    """Sum gradients (and the step's loss) over ranks before clipping; returns the global step loss.

    Missing gradients (a rank with an empty shard, a parameter unused on this rank) count as zeros,
    so every rank runs the same collectives and ends with identical gradients; a parameter that no
    rank used keeps no gradient, as in one process (the optimizer then skips it).
    """
    if not _context.enabled:
        return local_loss
    device = collective_device()
    used = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
    for p, was_used in zip(params, used.tolist()):
        if not was_used:
            p.grad = None
    loss = torch.tensor([local_loss], dtype=torch.float64, device=device)
    dist.all_reduce(loss, op=dist.ReduceOp.SUM)
    return float(loss.item())


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Start every rank from rank 0's trainable weights (after init or resume)."""
    if not _context.enabled:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def any_rank(flag: bool, device="cpu") -> bool:
    """True on every rank when `flag` is true on any (e.g. a stop request seen by one process)."""
    if not _context.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def collective_device() -> torch.device:
    """Where small collective tensors live: the rank's GPU under NCCL, else the CPU."""
    if _context.backend == "nccl":
        return torch.device("cuda", _context.local_rank)
    return torch.device("cpu")


# -- exported jobs: what a node writes and `scripts/train_job.py` runs under torchrun -----------------

JOB_FORMAT = "comfyui-personalize.job/1"


def job_document(*, checkpoint: str, dataset_spec, train: dict, artifact: dict, checkpoints_root: str,
                 comfyui_path: str, initial_weights: str | None = None) -> dict:
    """The JSON of an exported job: model file, dataset spec, TrainJob (global batch), where outputs go."""
    spec = dataclasses.asdict(dataset_spec)
    spec["cache_root"] = str(spec["cache_root"]) if spec.get("cache_root") else None
    return {"format": JOB_FORMAT, "checkpoint": str(checkpoint), "dataset": spec, "train": dict(train),
            "artifact": dict(artifact), "checkpoints_root": str(checkpoints_root), "comfyui_path": str(comfyui_path),
            "initial_weights": initial_weights}


def read_job_document(path) -> dict:
    """Load an exported job, or raise ValueError saying what is wrong with it."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"job file {str(path)!r} does not exist: export one with Personalize Export Training Job.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"job file {path.name} is not valid JSON ({exc}).") from exc
    if not isinstance(document, dict) or document.get("format") != JOB_FORMAT:
        raise ValueError(f"{path.name} is not a ComfyUI-Personalize job file (format {JOB_FORMAT}).")
    missing = [k for k in ("checkpoint", "dataset", "train", "artifact", "checkpoints_root") if k not in document]
    if missing:
        raise ValueError(f"job file {path.name} lacks {missing}: export it again.")
    return document
