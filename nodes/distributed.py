"""Data-parallel training from the UI: export a job that `torchrun ... scripts/train_job.py` runs, or
launch that run on this machine's GPUs (or CPU processes) and relay its progress to the UI."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths

from ..trainers.data.cache import default_cache_root
from ..trainers.distributed import job_document, read_job_document
from ..trainers.formats.files import safe_stem, write_new_file
from ..trainers.methods import available_methods
from ._api import io, ui
from ._events import websocket_sender
from .dataset import Dataset
from .train import _COMMON_HELP, checkpoints_root, job_from_inputs, resolve_resume, training_inputs

log = logging.getLogger("comfyui-personalize")

PACK_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = PACK_ROOT / "scripts" / "train_job.py"
EVENT_PREFIX = "PERSONALIZE_EVENT "
EXIT_CANCELLED = 130
ARTIFACT_FOLDERS = {"lora": "loras", "hypernetwork": "hypernetworks", "textual_inversion": "embeddings",
                    "dreambooth": "checkpoints"}


def jobs_folder() -> Path:
    return Path(folder_paths.get_output_directory()) / "personalize" / "jobs"


def torchrun_command(job_path, processes: int, device: str = "auto", extra=()) -> list[str]:
    """The command that runs an exported job on `processes` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            str(TRAIN_SCRIPT), str(job_path), "--device", device, *extra]


def _method_options(text: str) -> dict:
    try:
        options = json.loads(text or "{}")
    except ValueError as exc:
        raise ValueError(f"`method_options` is not valid JSON ({exc}); write e.g. {{\"rank\": 16, \"alpha\": 16}}.") from None
    if not isinstance(options, dict):
        raise ValueError("`method_options` must be a JSON object such as {\"rank\": 16}.")
    return options


class PersonalizeExportTrainingJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        h = _COMMON_HELP
        return io.Schema(
            node_id="PersonalizeExportTrainingJob",
            display_name="Personalize Export Training Job",
            category="personalize/distributed",
            description="Write a training job (model file, dataset, method and settings) that `torchrun --nproc-per-node N "
                        "scripts/train_job.py JOB` runs data-parallel, here or on another machine with the same paths.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"), tooltip="The checkpoint file every process loads with ComfyUI's own loader."),
                Dataset.Input("dataset", tooltip="From Personalize Dataset (folder): its settings are exported; each process rebuilds it from the latent cache."),
                io.Combo.Input("method", options=available_methods(), default="lora", tooltip="Training method."),
                io.String.Input("method_options", default='{"rank": 16, "alpha": 16.0, "targets": "attention_ff"}', multiline=True, tooltip="The method's options as JSON (LoRA: rank, alpha, targets, train_text_encoder, dora)."),
                io.Int.Input("steps", default=500, min=1, max=1_000_000, tooltip=h["steps"]),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=10.0, step=1e-6, round=False, tooltip=h["learning_rate"]),
                io.Float.Input("text_encoder_lr", default=5e-5, min=0.0, max=10.0, step=1e-6, round=False, tooltip=h["text_encoder_lr"]),
                io.Int.Input("processes", default=2, min=1, max=64, tooltip="Processes (GPUs) the job is for: each takes batch_size images per step, so the global batch is batch_size x processes. Another process count still runs it (the global batch is split)."),
                *training_inputs("ddp_job"),
                io.String.Input("artifact_name", default="personalize/ddp_lora", tooltip="File name of the trained artifact inside the method's model folder (loras, hypernetworks, ...)."),
                io.Combo.Input("save_dtype", options=["fp16", "bf16", "fp32"], default="fp16", tooltip="Precision of the saved artifact."),
            ],
            outputs=[
                io.String.Output(display_name="job", tooltip="Path of the written job file, for Personalize Launch Training."),
                io.String.Output(display_name="command", tooltip="The torchrun command line that runs the job."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ckpt_name, dataset, method, method_options, steps, learning_rate, text_encoder_lr, processes,
                artifact_name, save_dtype, **common) -> io.NodeOutput:
        spec = getattr(dataset, "spec", None)
        if spec is None:
            raise ValueError("`dataset` carries no folder settings to export: use Personalize Dataset (folder).")
        checkpoint = folder_paths.get_full_path("checkpoints", ckpt_name)
        if checkpoint is None:
            raise ValueError(f"`ckpt_name` {ckpt_name!r} is not in the checkpoints folder.")
        resume = resolve_resume(common.get("resume", ""))
        common["batch_size"] = common["batch_size"] * processes  # the engine's batch is the global one
        job = job_from_inputs(method, _method_options(method_options), steps=steps, learning_rate=learning_rate,
                              text_encoder_lr=text_encoder_lr, **common)
        if spec.use_cache and spec.cache_root is None:  # the processes reuse the latents this dataset cached
            spec = dataclasses.replace(spec, cache_root=default_cache_root())
        folder = folder_paths.get_folder_paths(ARTIFACT_FOLDERS.get(method, "loras"))[0]
        document = job_document(checkpoint=checkpoint, dataset_spec=spec, train=job.to_dict(),
                                artifact={"folder": folder, "name": safe_stem(artifact_name, input_name="artifact_name"),
                                          "save_dtype": save_dtype},
                                checkpoints_root=str(checkpoints_root()), comfyui_path=os.path.dirname(folder_paths.__file__))
        document["resume"] = str(resume) if resume else None
        path = write_new_file(jobs_folder(), safe_stem(job.run_name, input_name="run_name"), ".json",
                              lambda tmp: tmp.write_text(json.dumps(document, indent=1)))
        command = shlex.join(torchrun_command(path, processes))
        return io.NodeOutput(str(path), command, ui=ui.PreviewText(f"job: {path}\nrun: {command}"))


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line.rstrip("\n"))
    lines.put(None)


class PersonalizeLaunchTraining(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeLaunchTraining",
            display_name="Personalize Launch Training",
            category="personalize/distributed",
            description="Run an exported job with torchrun on this machine (one process per GPU; NCCL on GPUs, gloo on CPU) "
                        "and relay its progress and loss here. Cancel stops every process with a resumable checkpoint.",
            inputs=[
                io.String.Input("job", default="", tooltip="Path of a job file from Personalize Export Training Job."),
                io.Int.Input("processes", default=2, min=1, max=64, tooltip="How many processes (one per GPU) to start."),
                io.Combo.Input("device", options=["auto", "cuda", "cpu"], default="auto", tooltip="auto: the GPUs when there are any, else CPU processes."),
                io.String.Input("resume", default="", tooltip="A checkpoint of this job to continue from (written by any number of processes); empty for the job's own setting."),
            ],
            outputs=[
                io.String.Output(display_name="artifact", tooltip="Path of the trained artifact (e.g. the LoRA file)."),
                io.String.Output(display_name="checkpoint", tooltip="Path of the final resumable checkpoint."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per optimizer step (core's Loss Graph node plots it)."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, job, processes, device, resume) -> io.NodeOutput:
        document = read_job_document(job.strip())
        if device == "cuda" or (device == "auto" and comfy.model_management.get_torch_device().type == "cuda"):
            import torch
            if processes > torch.cuda.device_count():
                raise ValueError(f"`processes`={processes} but this machine has {torch.cuda.device_count()} GPUs.")
            comfy.model_management.unload_all_models()  # hand the GPUs' memory to the training processes
            comfy.model_management.soft_empty_cache()
        resume = str(resolve_resume(resume)) if resume.strip() else (document.get("resume") or "")
        stop_file = Path(tempfile.gettempdir()) / f"personalize-stop-{os.getpid()}-{time.monotonic_ns()}"
        extra = ["--events", "--stop-file", str(stop_file)] + (["--resume", resume] if resume else [])
        result = _run_and_relay(torchrun_command(job.strip(), processes, device, extra), document["train"]["steps"],
                                stop_file, websocket_sender(cls.hidden.unique_id))
        return io.NodeOutput(result["path"], result["checkpoint"], {"loss": result["losses"]})


def _run_and_relay(command: list[str], total: int, stop_file: Path, send) -> dict:
    """Run torchrun, relay rank 0's events (progress bar, websocket), stop it on cancel."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log.info("launching: %s", shlex.join(command))
    proc = subprocess.Popen(command, cwd=str(PACK_ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    bar = comfy.utils.ProgressBar(total)
    tail: list[str] = []
    losses, artifact, cancelled, checkpoint = [], None, False, None
    try:
        while True:
            if not cancelled and comfy.model_management.processing_interrupted():
                stop_file.touch()  # every rank stops at its next micro step and rank 0 saves
                cancelled = True
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            # Another rank's output without a newline (a progress bar's "\r") can come first on the same line.
            before, found, text = line.partition(EVENT_PREFIX)
            if before:
                log.info("%s", before)
                tail = (tail + [before])[-40:]
            if not found:
                continue
            event = json.loads(text)
            kind, data = event["type"], event["data"]
            send(kind, data)
            if kind == "personalize.step":
                losses.append(float(data["loss"]))
                bar.update_absolute(int(data["step"]), total)
            elif kind == "personalize.checkpoint":
                checkpoint = data["path"]
            elif kind == "personalize.artifact":
                artifact = data
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        stop_file.unlink(missing_ok=True)
    if cancelled or code == EXIT_CANCELLED:
        log.info("distributed training cancelled; resumable checkpoint: %s", checkpoint)
        comfy.model_management.interrupt_current_processing(False)
        raise comfy.model_management.InterruptProcessingException()
    if code != 0 or artifact is None:
        errors = [t for t in tail if "Error" in t or t.startswith("error:")]
        raise RuntimeError(f"distributed training failed (exit {code}): {(errors or tail or ['no output'])[-1]}\n"
                           + "\n".join(tail[-15:]))
    return {"path": artifact["path"], "checkpoint": artifact["checkpoint"], "losses": losses}


NODES = [PersonalizeExportTrainingJob, PersonalizeLaunchTraining]
