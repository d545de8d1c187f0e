"""Run an exported training job, in one process or data-parallel under torchrun.

    torchrun --nproc-per-node 2 scripts/train_job.py JOB.json [--resume CHECKPOINT] [--events]

Each process loads the checkpoint with ComfyUI's own loader, builds the dataset (rank 0 first, so
the others read its latent cache), and runs the one training loop; `trainers.distributed` shards
every global batch over the ranks and all-reduces gradients. Rank 0 alone writes checkpoints and
the artifact and prints progress. `--events` prints one `PERSONALIZE_EVENT {json}` line per event
(what Personalize Launch Training relays to the UI). SIGINT/SIGTERM or `--stop-file` stop every
rank at the next micro step with a resumable checkpoint (exit code 130).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EVENT_PREFIX = "PERSONALIZE_EVENT "
EXIT_CANCELLED = 130
PACK = "personalize_job_pack"


def pack_module(name: str):
    """A module of the pack, imported under a package name of its own (never as top-level `trainers`,
    so nothing of the repo can shadow ComfyUI's `nodes`). The pack's `__init__` is not run: it needs the server."""
    if PACK not in sys.modules:
        package = types.ModuleType(PACK)
        package.__path__ = [str(REPO_ROOT)]
        sys.modules[PACK] = package
    return importlib.import_module(f"{PACK}.{name}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", help="job file written by Personalize Export Training Job")
    parser.add_argument("--resume", default="", help="resumable checkpoint (.pt) of this job, from any world size")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA (NCCL) when available, else CPU (gloo)")
    parser.add_argument("--events", action="store_true", help="print PERSONALIZE_EVENT json lines (rank 0)")
    parser.add_argument("--stop-file", default="", help="stop with a resumable checkpoint once this file exists")
    parser.add_argument("--comfyui", default="", help="ComfyUI folder (default: $COMFYUI_PATH, else the job's)")
    return parser.parse_args(argv)


def _setup_comfy(args, document) -> str:
    """Put ComfyUI first on sys.path and pick the device before `comfy.model_management` is imported."""
    comfy_path = args.comfyui or os.environ.get("COMFYUI_PATH") or document.get("comfyui_path")
    if not comfy_path or not (Path(comfy_path) / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {comfy_path!r}: pass --comfyui or set COMFYUI_PATH.")
    sys.path.insert(0, str(comfy_path))
    import torch
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible.")
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = device == "cpu"
    if device == "cuda":  # each rank computes on its own GPU (ComfyUI uses the current device)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return device


def write_event_line(event: str, payload: dict, stream=None) -> None:
    """One `PERSONALIZE_EVENT {json}` line in one write() on the pipe that every rank shares. print() writes the
    text and its newline in two writes when stdout is unbuffered (PYTHONUNBUFFERED, which the launcher sets), and
    another rank's log line could land between them: the reader then saw an event line with a log line glued on.
    A pipe write of up to PIPE_BUF bytes (4096 on Linux; events are a few hundred) is never interleaved."""
    stream = stream or sys.stdout
    data = (EVENT_PREFIX + json.dumps({"type": event, "data": payload}, default=str) + "\n").encode()
    stream.flush()
    fd = stream.fileno()
    while data:
        data = data[os.write(fd, data):]


class JobReporter:
    """The loop's reporter for a job process: JSON event lines from rank 0, and a stop that all ranks agree on."""

    def __init__(self, total_steps: int, emit: bool, stop_file: str):
        distributed = pack_module("trainers.distributed")
        Reporter = pack_module("trainers.progress").Reporter

        self._dist = distributed
        self._emit = emit and distributed.is_writer()
        self.stop_file = stop_file
        self.stop_requested = False
        self.inner = Reporter(total_steps, self.send)

    def send(self, event: str, payload: dict) -> None:
        if self._emit:
            write_event_line(event, payload)

    def interrupted(self) -> bool:  # called once per micro step on every rank: the collectives line up
        local = self.stop_requested or bool(self.stop_file and os.path.exists(self.stop_file))
        return self._dist.any_rank(local, self._dist.collective_device())

    def __getattr__(self, name):  # bind/start/step/checkpoint/end: the engine's Reporter
        return getattr(self.inner, name)


def _checkpoint_folder(document, resume: Path | None) -> Path:
    """Rank 0 picks a fresh run folder (or the resumed run's) and tells the others."""
    import torch.distributed as dist

    distributed = pack_module("trainers.distributed")
    safe_stem = pack_module("trainers.formats.files").safe_stem
    unique_path = pack_module("trainers.formats.files").unique_path

    folder = None
    if resume is not None:
        folder = resume.parent
    elif distributed.is_writer():
        root = Path(document["checkpoints_root"])
        root.mkdir(parents=True, exist_ok=True)
        folder = unique_path(root, safe_stem(document["train"].get("run_name", "run"), input_name="run_name").replace("/", "_"), "")
        folder.mkdir(parents=True)
    if distributed.current().enabled and resume is None:
        shared = [str(folder) if folder else None]
        dist.broadcast_object_list(shared, src=0)
        folder = Path(shared[0])
    return folder


def _dataset_spec(spec: dict):
    DatasetSpec = pack_module("trainers.data.build").DatasetSpec
    CaptionOptions = pack_module("trainers.data.captions").CaptionOptions

    spec = dict(spec)
    spec["captions"] = CaptionOptions(**spec.get("captions", {}))
    spec["cache_root"] = Path(spec["cache_root"]) if spec.get("cache_root") else None
    return DatasetSpec(**spec)


def _save_artifact(document, method, job, model, data, steps: int, world_size: int) -> Path:
    """Write the trained artifact (rank 0): kohya LoRA safetensors, A1111 hypernetwork, or tensors."""
    import torch

    safe_stem = pack_module("trainers.formats.files").safe_stem
    write_new_file = pack_module("trainers.formats.files").write_new_file
    base_model_family = pack_module("trainers.formats.kohya_lora").base_model_family
    kohya_metadata = pack_module("trainers.formats.kohya_lora").kohya_metadata
    save_new_safetensors = pack_module("trainers.formats.safetensors_io").save_new_safetensors

    artifact = document["artifact"]
    folder = Path(artifact["folder"])
    stem = safe_stem(artifact.get("name") or job.run_name, input_name="name")
    target = folder / stem
    if job.method == "lora":
        tensors = method.export()
        config = method.config
        per_device = {**job.to_dict(), "batch_size": max(1, job.batch_size // world_size)}  # kohya's per-device batch
        metadata = kohya_metadata(rank=config.rank, alpha=config.alpha, base_model=base_model_family(model),
                                  resolution=data.resolution, steps=steps, job=per_device,
                                  dataset_tags=data.tag_frequency(), name=job.run_name,
                                  train_text_encoder=config.train_text_encoder,
                                  extra={"personalize.world_size": str(world_size),
                                         "personalize.global_batch_size": str(job.batch_size)})
        return save_new_safetensors(target.parent, target.name, tensors, metadata, artifact.get("save_dtype", "fp16"))
    if job.method == "hypernetwork":
        exported = method.export(name=job.run_name, step=steps)
        return write_new_file(target.parent, target.name, ".pt", lambda tmp: torch.save(exported, tmp))
    exported = method.export()
    if isinstance(exported, dict) and all(isinstance(v, torch.Tensor) for v in exported.values()):
        return save_new_safetensors(target.parent, target.name, exported, {"personalize.job": job.to_json()},
                                    artifact.get("save_dtype", "fp16"))
    raise ValueError(f"method {job.method!r} has no file export in train_job.py; its final checkpoint holds the weights.")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(message)s")
    read_job_document = pack_module("trainers.distributed").read_job_document
    try:
        document = read_job_document(args.job)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    device = _setup_comfy(args, document)

    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import torch

    distributed = pack_module("trainers.distributed")
    loop = pack_module("trainers.loop")
    build_training_data = pack_module("trainers.data.build").build_training_data
    TrainJob = pack_module("trainers.job").TrainJob
    create_method = pack_module("trainers.methods").create_method

    ctx = distributed.init_from_env(backend="nccl" if device == "cuda" else "gloo")
    reporter = None
    try:
        job = TrainJob.from_dict(document["train"])
        resume = args.resume or document.get("resume")
        resume = Path(resume) if resume else None
        with torch.inference_mode():  # as ComfyUI's executor loads models
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(document["checkpoint"], output_vae=True,
                                                                        output_clip=True)
        spec = _dataset_spec(document["dataset"])
        if not ctx.is_writer:
            distributed.barrier()  # rank 0 encodes first; the others then read its latent cache
        with torch.inference_mode():
            data, _ = build_training_data(spec, vae, clip)
        if ctx.is_writer:
            distributed.barrier()
        options = dict(job.method_options)
        if document.get("initial_weights"):
            options["initial_weights"] = comfy.utils.load_torch_file(document["initial_weights"], safe_load=True)
        method = create_method(job.method, options)
        folder = _checkpoint_folder(document, resume)
        reporter = JobReporter(job.steps, args.events, args.stop_file)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: setattr(reporter, "stop_requested", True))
        try:
            result = loop.train(job, method, model, clip, data, checkpoint_dir=folder, resume_from=resume,
                                reporter=reporter)
        except comfy.model_management.InterruptProcessingException:
            reporter.send("personalize.cancelled", {"checkpoint_dir": str(folder)})
            return EXIT_CANCELLED
        if ctx.is_writer:
            path = _save_artifact(document, method, job, model, data, result.global_step, ctx.world_size)
            reporter.send("personalize.artifact", {"path": str(path), "checkpoint": str(result.final_checkpoint),
                                                   "final_loss": result.summary.get("final_loss"),
                                                   "world_size": ctx.world_size})
        distributed.barrier()
        return 0
    except ValueError as exc:
        if reporter is not None:
            reporter.send("personalize.error", {"message": str(exc)})
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
