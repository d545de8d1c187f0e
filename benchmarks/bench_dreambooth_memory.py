"""Peak memory of each DreamBooth memory option on the tiny SD1.5 model, side by side.

Every option trains the same full fine-tune (UNet only, 2 images at 64x64, batch 1) for a few steps in
its own child process (the helpers of bench_lora_vs_core.py boot ComfyUI and load the checkpoint and
dataset). Per option it prints:
  peak_mb     training-phase peak RSS (VmHWM reset after loading; on a GPU the same run would show
              these savings in `torch.cuda.max_memory_allocated`)
  added_mb    peak minus the RSS before training: what the run itself added
  weights_mb  trainable weights as stored, optim_mb optimizer state, ema_mb the EMA (exact bytes)
  s/step      median step time (the machine is shared: compare within one run only)
8-bit AdamW needs bitsandbytes and a CUDA GPU; on the CPU its row says so.

Usage (from the repository root):
  $PERSONALIZE_PYTHON benchmarks/bench_dreambooth_memory.py [--steps 3] [--threads 2] [--only name ...]
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora_vs_core as shared  # noqa: E402  (torch-free at import)

OPTIONS = {
    "fp32 baseline (AdamW)": {},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "bf16 autocast, fp32 master": {"precision": "bf16"},
    "fp16 autocast, fp32 master": {"precision": "fp16"},
    "full bf16 + stochastic rounding": {"precision": "bf16", "weight_dtype": "bf16", "weight_rounding": "stochastic"},
    "full bf16 + Kahan": {"precision": "bf16", "weight_dtype": "bf16", "weight_rounding": "kahan"},
    "Adafactor": {"optimizer": "adafactor"},
    "8-bit AdamW": {"optimizer": "adamw8bit"},
    "fused backward": {"fused_backward": True},
    "EMA (same device)": {"ema_decay": 0.999},
    "EMA on CPU": {"ema_decay": 0.999, "ema_on_cpu": True},
    "all savings: ckpt + full bf16 SR + Adafactor + fused": {
        "gradient_checkpointing": True, "precision": "bf16", "weight_dtype": "bf16", "optimizer": "adafactor",
        "fused_backward": True},
}


def _tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _optimizer_tensors(optimizer):
    inner = getattr(optimizer, "inner", [optimizer])
    for opt in inner:
        for state in opt.state.values():
            for value in state.values():
                if hasattr(value, "element_size") and value.dim() > 0:
                    yield value
    for value in getattr(optimizer, "compensation", {}).values():
        yield value


def child_main(spec: dict) -> None:
    import gc
    torch = shared._boot_comfy(spec["threads"])
    import folder_paths
    folder_paths.set_output_directory(spec["output"])
    P = shared.PACKAGE
    loop, job_mod = importlib.import_module(f"{P}.trainers.loop"), importlib.import_module(f"{P}.trainers.job")
    methods, optim = importlib.import_module(f"{P}.trainers.methods"), importlib.import_module(f"{P}.trainers.optim")
    model, clip, data, _, _ = shared._load_inputs(spec)
    gc.collect()
    job_options = dict(spec["options"])
    options = {"weight_dtype": job_options.get("weight_dtype", "fp32")}
    seen = {}
    build = optim.build_optimizer

    def spy(job, groups):  # keep the optimizer to measure its state
        seen["optimizer"] = build(job, groups)
        return seen["optimizer"]
    loop.build_optimizer = spy
    from torch.optim.optimizer import register_optimizer_step_post_hook
    stamps = []
    # Only the loop's own optimizer: per-weight inner optimizers (fused / bf16 paths) step too.
    register_optimizer_step_post_hook(lambda opt, a, kw: stamps.append(time.perf_counter()) if opt is seen.get("optimizer") else None)
    rss_before = shared._proc_status_kb("VmRSS")
    reset = shared._reset_peak_rss()
    try:
        job = job_mod.TrainJob(method="dreambooth", steps=spec["steps"], learning_rate=1e-5, seed=0, min_snr_gamma=0.0,
                               method_options=options, **job_options)
        method = methods.create_method("dreambooth", options)
        with torch.inference_mode():
            result = loop.train(job, method, model, clip, data, checkpoint_dir=Path(spec["output"]) / "ckpt")
    except ValueError as exc:
        print(shared.RESULT_TAG + json.dumps({"error": str(exc)}), flush=True)
        return
    peak = shared._proc_status_kb("VmHWM") if reset else None
    ticks = [b - a for a, b in zip(stamps, stamps[1:])]
    params = [p for g in result.attached.groups for p in g.params]
    out = {"peak_mb": peak / 1024 if peak else None, "added_mb": (peak - rss_before) / 1024 if peak and rss_before else None,
           "weights_mb": _tensor_mb(params), "optim_mb": _tensor_mb(_optimizer_tensors(seen["optimizer"])),
           "ema_mb": _tensor_mb(result.ema.shadow) if result.ema else 0.0,
           "step_s": statistics.median(ticks) if ticks else None, "final_loss": result.loss_history[-1]}
    print(shared.RESULT_TAG + json.dumps(out), flush=True)


def _spawn(mode: str, spec: dict | None, threads: int, log_dir: Path, label: str) -> dict:
    """Run this file as a child (`--child`/`--prepare`) and return its tagged JSON result."""
    import os
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, str(Path(__file__).resolve()), mode] + ([json.dumps(spec)] if spec is not None else [])
    log = log_dir / f"{label}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env, cwd=str(shared.ROOT))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(shared.RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child {label} failed (exit {proc.returncode}); log {log}:\n{log.read_text()[-4000:]}")
    return json.loads(lines[-1][len(shared.RESULT_TAG):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="option names (substrings) to run")
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-dreambooth-"))
    checkpoint = _spawn("--prepare", None, args.threads, log_dir, "prepare")["checkpoint"]
    sys.path.insert(0, str(shared.ROOT / "scripts"))
    from sample_images import make_sample_dataset
    images = log_dir / "images"
    make_sample_dataset(images, n=2, size=shared.IMAGE_SIZE, seed=0, subject="sks")
    rows = []
    for name, options in OPTIONS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        spec = {"checkpoint": checkpoint, "images": str(images), "threads": args.threads, "steps": args.steps,
                "output": str(log_dir / f"out{len(rows)}"), "options": options, "seed": 0}
        result = _spawn("--child", spec, args.threads, log_dir, f"opt{len(rows)}")
        rows.append((name, result))
        print(f"done: {name}", file=sys.stderr, flush=True)
    print(f"\nDreamBooth memory options, tiny SD1.5 (UNet trained in full), 64x64, batch 1, {args.steps} steps, CPU\n")
    header = f"{'option':<54}{'peak_mb':>9}{'added_mb':>10}{'weights_mb':>11}{'optim_mb':>10}{'ema_mb':>8}{'s/step':>8}"
    print(header)
    print("-" * len(header))
    for name, r in rows:
        if "error" in r:
            print(f"{name:<54}  n/a: {r['error'][:90]}")
            continue
        step = f"{r['step_s']:.2f}" if r["step_s"] else "-"
        print(f"{name:<54}{r['peak_mb']:>9.0f}{r['added_mb']:>10.0f}{r['weights_mb']:>11.1f}{r['optim_mb']:>10.1f}"
              f"{r['ema_mb']:>8.1f}{step:>8}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--prepare":
        shared.prepare_main()
    else:
        sys.exit(main())
