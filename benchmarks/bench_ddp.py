"""Data-parallel throughput: the same exported job on 1, 2, ... processes (torchrun + scripts/train_job.py).

Weak scaling, as accelerate/kohya users run it: every process takes `--batch-per-process` images per
step, so N processes train on an N-times larger global batch; throughput is images per second
over the timed steps (the first `--warmup` steps, with their one-off costs, are not timed). The
speedup is throughput(N) / throughput(1); the target on GPUs is >= 1.8x on 2.

On CPU each process gets `--threads` threads (default: the cores divided by the largest process
count), so 1 and N processes use the same cores per process; on a machine with fewer free cores
than processes the CPU numbers say little. On GPUs (`--device cuda`) process i uses GPU i.

Usage (repository root; COMFYUI_PATH set):
  python benchmarks/bench_ddp.py [--processes 1,2] [--device cpu|cuda] [--steps 12] [--model PATH]
Default model: the tiny SD1.5 test checkpoint (scripts/tiny_model.py); use a real checkpoint on GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "scripts"))


def make_job(root: Path, model: Path, images: int, resolution: int, batch: int, steps: int, rank: int) -> Path:
    from sample_images import make_sample_dataset

    make_sample_dataset(root / "data", n=images, size=resolution, seed=0, subject="sks")
    document = {
        "format": "comfyui-personalize.job/1", "checkpoint": str(model), "comfyui_path": os.environ.get("COMFYUI_PATH", ""),
        "dataset": {"folder": str(root / "data"), "resolution": resolution, "bucket_step": 32, "cache_root": str(root / "cache")},
        "train": {"method": "lora", "method_options": {"rank": rank, "alpha": float(rank), "targets": "attention_ff"},
                  "steps": steps, "batch_size": batch, "learning_rate": 1e-4, "precision": "fp32", "seed": 0,
                  "run_name": "bench"},
        "artifact": {"folder": str(root / "loras"), "name": "bench", "save_dtype": "fp16"},
        "checkpoints_root": str(root / "checkpoints"),
    }
    path = root / f"job_b{batch}.json"
    path.write_text(json.dumps(document))
    return path


def run(job: Path, processes: int, device: str, threads: int, warmup: int) -> dict:
    """Start torchrun and time rank 0's step events as they arrive."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           str(REPO / "scripts" / "train_job.py"), str(job), "--events", "--device", device]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stamps, tail = {}, []
    for line in proc.stdout:
        if "PERSONALIZE_EVENT " in line:
            event = json.loads(line.split("PERSONALIZE_EVENT ", 1)[1])
            if event["type"] == "personalize.step":
                stamps[event["data"]["step"]] = time.perf_counter()
        else:
            tail = (tail + [line.rstrip()])[-20:]
    if proc.wait() != 0:
        raise RuntimeError(f"{processes} processes failed:\n" + "\n".join(tail))
    timed = sorted(stamps)[warmup:]
    seconds = stamps[timed[-1]] - stamps[timed[0]]
    return {"steps": len(timed) - 1, "seconds": seconds, "step_s": seconds / (len(timed) - 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-per-process", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="threads per process on CPU (0: cores / max processes)")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint file (default: the tiny test model)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.processes.split(",")]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(counts))
    if args.model is None:
        from tiny_model import cached_tiny_checkpoint
        args.model = cached_tiny_checkpoint("taesd")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        for n in counts:
            batch = args.batch_per_process * n
            job = make_job(Path(tmp), args.model, max(16, 2 * batch), args.resolution, batch, args.steps, args.rank)
            result = run(job, n, args.device, threads, args.warmup)
            rows.append({"processes": n, "global_batch": batch, **result,
                         "images_per_s": batch / result["step_s"]})
    base = rows[0]["images_per_s"]
    print(f"device {args.device}, model {args.model.name}, {args.resolution}px, LoRA rank {args.rank}, "
          f"{args.batch_per_process} images per process per step, {threads} threads per process (CPU)")
    print(f"{'processes':>9} {'global batch':>12} {'s/step':>8} {'images/s':>9} {'speedup':>8}")
    for row in rows:
        print(f"{row['processes']:>9} {row['global_batch']:>12} {row['step_s']:>8.3f} {row['images_per_s']:>9.2f} "
              f"{row['images_per_s'] / base:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
