"""Step time and memory of our Train LoRA against ComfyUI's own `TrainLoraNode`.

Both trainers run on the same tiny SD1.5 checkpoint (TAESD VAE), the same generated images at 64x64
(encoded once per run with the checkpoint's own VAE and CLIP), the same LoRA rank, batch size and
number of steps, each in its own child process, interleaved (ours, core, core, ours, ...) so that
slow drift of the machine hits both alike and each child's peak memory is its own.

Every child:
  1. imports ComfyUI as the server has it (`server`, `nodes`, `comfy_extras.nodes_train`, our pack),
  2. loads the checkpoint and encodes the images and captions (under inference mode, as the
     executor runs nodes),
  3. records its RSS, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`),
  4. calls the node entry point (`PersonalizeTrainLoRA.execute` / `TrainLoraNode.train`) for
     warm-up + timed steps; a global optimizer step post-hook timestamps every optimizer step,
  5. reports per-step times (intervals between the timed steps' optimizer steps, so everything a
     step does is counted: data, noise, forward, loss, backward, clipping, optimizer, progress),
     the whole-process peak RSS (`ru_maxrss`) and the training-phase peak (`VmHWM` after the reset).

Configurations:
  defaults  each trainer with its own node defaults for precision and coverage. Core: bf16 compute
            and LoRA dtype, gradient checkpointing on, a LoRA (or a diff) on every weight and bias.
            Ours: bf16 autocast, no gradient checkpointing, targets attention_ff, min-SNR 5.
  matched   both fp32, no gradient checkpointing; ours with targets "all" (every Linear/Conv2d),
            the closest to core's coverage (core also trains biases and norm weights).

Ratios are ours/core: below 1 means ours is faster / smaller. Targets: step time <= 0.8,
memory <= 1.0.

Usage (from the repository root):
  . scripts/bootstrap.sh
  $PERSONALIZE_PYTHON benchmarks/bench_lora_vs_core.py [--steps 20] [--warmup 3] [--repeats 3]
      [--batch-size 2 4] [--threads 2] [--configs defaults matched] [--json out.json]
  $PERSONALIZE_PYTHON benchmarks/bench_lora_vs_core.py --profile --steps 5 [--profile-config matched]
      [--batch-size 2]      # torch.profiler + cProfile of a few of our steps instead
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "BENCH_RESULT "
PACKAGE = "personalize_bench_pack"
RANK = 4
N_IMAGES = 4
IMAGE_SIZE = 64
CONFIGS = ("defaults", "matched")
TRAINERS = ("ours", "core")


# --------------------------------------------------------------------------------------------
# Child side: everything that imports torch/ComfyUI runs only in child processes.
# --------------------------------------------------------------------------------------------

def _comfy_path() -> str:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        sys.path.insert(0, str(ROOT / "scripts"))
        from tiny_model import find_comfyui  # noqa: E402  (no torch import)
        path = str(find_comfyui())
    return path


def _boot_comfy(threads: int):
    """ComfyUI on the CPU, imported the way a running server has it, plus our pack as a package."""
    import importlib.util

    sys.path.insert(0, _comfy_path())
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (before `nodes`: see design.md section 6)
    import torch
    torch.set_num_threads(threads)
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import folder_paths  # noqa: F401
    import nodes  # noqa: F401
    try:
        import server  # noqa: F401  (our node's websocket sender imports it; import it for both trainers)
    except Exception:  # pragma: no cover - frontend package missing: nothing sends events anyway
        pass
    import comfy_extras.nodes_train  # noqa: F401

    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pkg
    spec.loader.exec_module(pkg)
    import importlib
    importlib.import_module(f"{PACKAGE}.nodes.train")
    importlib.import_module(f"{PACKAGE}.nodes.dataset")
    return torch


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0): the training-phase peak is then read from /proc/self/status."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load_inputs(spec: dict):
    """Checkpoint as CheckpointLoaderSimple loads it, and the dataset as our dataset node encodes it."""
    import torch
    import comfy.sd
    import folder_paths
    build = importlib.import_module(f"{PACKAGE}.trainers.data.build")

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            spec["checkpoint"], output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
        dataset_spec = build.DatasetSpec(folder=spec["images"], resolution=IMAGE_SIZE, buckets=False, use_cache=False)
        data = build.build_training_data(dataset_spec, vae, clip)[0]
        # The same latents and conditioning for core: a LATENT batch and one CONDITIONING entry per image
        # (what core's LoadImageTextSetFromFolderNode + VAEEncode hand its TrainLoraNode).
        latents = {"samples": torch.stack([s.latent for s in data.samples])}
        positive = [s.conditioning[0] for s in data.samples]
    return model, clip, data, latents, positive


def _node_defaults(node_cls) -> dict:
    return {inp.id: inp.default for inp in node_cls.define_schema().inputs if getattr(inp, "default", None) is not None}


def _run_ours(spec, model, clip, data):
    import torch
    node = sys.modules[f"{PACKAGE}.nodes.train"].PersonalizeTrainLoRA
    inputs = _node_defaults(node)
    inputs.update(model=model, clip=clip, dataset=data, steps=spec["warmup"] + spec["steps"], rank=RANK,
                  alpha=float(RANK), batch_size=spec["batch_size"], seed=spec["seed"], run_name="bench")
    if spec["config"] == "matched":
        inputs.update(precision="fp32", gradient_checkpointing=False, targets="all")
    settings = {k: inputs[k] for k in ("precision", "gradient_checkpointing", "targets", "min_snr_gamma",
                                       "learning_rate", "max_grad_norm", "optimizer")}
    with torch.inference_mode():  # as the executor calls nodes
        out = node.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(**inputs)
    lora = out.result[2]
    losses = out.result[3]["loss"]
    trainable = sum(t.numel() for k, t in lora.items() if k.endswith(("lora_down.weight", "lora_up.weight")))
    return losses, trainable, settings


def _run_core(spec, model, latents, positive):
    import torch
    import comfy_extras.nodes_train as core
    if spec["config"] == "matched":
        dtype_settings = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}
    else:
        dtype_settings = {"training_dtype": "bf16", "lora_dtype": "bf16", "gradient_checkpointing": True}
    inputs = dict(model=model, latents=latents, positive=positive, batch_size=spec["batch_size"],
                  steps=spec["warmup"] + spec["steps"], grad_accumulation_steps=1, learning_rate=5e-4, rank=RANK,
                  optimizer="AdamW", loss_function="MSE", seed=spec["seed"], algorithm="LoRA",
                  existing_lora="[None]", **dtype_settings)
    settings = {k: v for k, v in inputs.items() if k in ("training_dtype", "lora_dtype", "gradient_checkpointing",
                                                           "learning_rate", "optimizer", "algorithm")}
    with torch.inference_mode():
        _, lora_sd, loss_map, _ = core.TrainLoraNode().train(**inputs)
    trainable = sum(t.numel() for t in lora_sd.values())
    return loss_map["loss"], trainable, settings


def child_main(spec: dict) -> None:
    import gc
    import resource

    torch = _boot_comfy(spec["threads"])
    import folder_paths
    folder_paths.set_output_directory(spec["output"])
    torch.manual_seed(spec["seed"])

    model, clip, data, latents, positive = _load_inputs(spec)
    gc.collect()

    from torch.optim.optimizer import register_optimizer_step_post_hook
    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda opt, a, kw: stamps.append(time.perf_counter()))

    # The UNet's batch per forward: core evaluates every caption of a batch against every latent of it.
    forward_batches: list[int] = []
    model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args: forward_batches.append(int(args[0].shape[0])))

    rss_before_kb = _proc_status_kb("VmRSS")
    hwm_reset = _reset_peak_rss()
    started = time.perf_counter()
    if spec["trainer"] == "ours":
        losses, trainable, settings = _run_ours(spec, model, clip, data)
    else:
        losses, trainable, settings = _run_core(spec, model, latents, positive)
    total_s = time.perf_counter() - started
    hwm_kb = _proc_status_kb("VmHWM") if hwm_reset else None
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    expected = spec["warmup"] + spec["steps"]
    if len(stamps) != expected:
        raise RuntimeError(f"{spec['trainer']}: saw {len(stamps)} optimizer steps, expected {expected}")
    # Interval k ends at optimizer step warmup+k: each is one whole training step after the warm-up.
    intervals = [b - a for a, b in zip(stamps[spec["warmup"] - 1:], stamps[spec["warmup"]:])]
    result = {
        "trainer": spec["trainer"], "config": spec["config"], "batch_size": spec["batch_size"],
        "repeat": spec["repeat"], "step_s": intervals, "total_s": total_s,
        "rss_before_mb": rss_before_kb / 1024 if rss_before_kb else None,
        "peak_rss_mb": maxrss_kb / 1024,
        "train_peak_mb": (hwm_kb if hwm_kb is not None else maxrss_kb) / 1024,
        "hwm_reset": hwm_reset, "trainable_params": trainable,
        "forward_batch": max(forward_batches) if forward_batches else None, "final_loss": float(losses[-1]),
        "losses_finite": all(math.isfinite(x) for x in losses), "settings": settings,
        "threads": torch.get_num_threads(),
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


def prepare_main() -> None:
    """Build (or find) the cached tiny checkpoint; kept out of the parent so the parent stays torch-free."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from tiny_model import cached_tiny_checkpoint
    print(RESULT_TAG + json.dumps({"checkpoint": str(cached_tiny_checkpoint(vae="taesd"))}), flush=True)


def profile_main(spec: dict) -> None:
    """torch.profiler (op level) and cProfile (Python level) of our timed steps."""
    import cProfile
    import io
    import pstats

    torch = _boot_comfy(spec["threads"])
    import folder_paths
    folder_paths.set_output_directory(spec["output"])
    torch.manual_seed(spec["seed"])
    model, clip, data, _, _ = _load_inputs(spec)

    from torch.optim.optimizer import register_optimizer_step_post_hook
    state = {"n": 0, "prof": None, "cprof": cProfile.Profile()}
    warmup = spec["warmup"]

    def on_step(opt, a, kw):
        state["n"] += 1
        if state["n"] == warmup:
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
            state["prof"].__enter__()
            state["cprof"].enable()
        elif state["n"] == warmup + spec["steps"]:
            state["cprof"].disable()
            state["prof"].__exit__(None, None, None)

    register_optimizer_step_post_hook(on_step)
    _run_ours(spec, model, clip, data)
    n = spec["steps"]
    print(f"\n=== torch.profiler: ours, config={spec['config']}, batch={spec['batch_size']}, {n} steps "
          f"(times are totals over the {n} steps) ===")
    print(state["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    out = io.StringIO()
    stats = pstats.Stats(state["cprof"], stream=out)
    stats.sort_stats("cumulative").print_stats(45)
    print(f"\n=== cProfile (cumulative) over the same {n} steps ===")
    print(out.getvalue())
    out = io.StringIO()
    pstats.Stats(state["cprof"], stream=out).sort_stats("tottime").print_stats(30)
    print(f"\n=== cProfile (tottime) over the same {n} steps ===")
    print(out.getvalue())


# --------------------------------------------------------------------------------------------
# Parent side: no torch here (so the children's peak RSS is theirs alone).
# --------------------------------------------------------------------------------------------

def _spawn(mode: str, spec: dict | None, threads: int, log_dir: Path, label: str, wait_policy: str = "PASSIVE") -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if wait_policy != "default":
        env["OMP_WAIT_POLICY"] = wait_policy
    env.setdefault("PYTHONHASHSEED", "0")
    cmd = [sys.executable, str(Path(__file__).resolve()), mode] + ([json.dumps(spec)] if spec is not None else [])
    log = log_dir / f"{label}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env, cwd=str(ROOT))
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
        elif mode == "--profile-child":
            print(line)
    if proc.returncode != 0 or (result is None and mode != "--profile-child"):
        tail = log.read_text()[-4000:]
        raise SystemExit(f"child {label} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return result or {}


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _median(values):
    return statistics.median(values) if values else float("nan")


def _summarise(results: list[dict], configs, batch_sizes) -> tuple[str, list[dict]]:
    lines, ratios = [], []
    header = (f"{'config':<9} {'bs':>2} {'trainer':<7} {'runs':>4} {'median ms/step':>14} {'p10-p90 ms':>15} "
              f"{'peak RSS MB':>11} {'RSS before':>10} {'train +MB':>9} {'train params':>12} {'UNet batch':>10} {'final loss':>10}")
    lines.append(header)
    lines.append("-" * len(header))
    for config in configs:
        for bs in batch_sizes:
            row = {}
            for trainer in TRAINERS:
                runs = [r for r in results if r["config"] == config and r["batch_size"] == bs and r["trainer"] == trainer]
                if not runs:
                    continue
                steps = sorted(s for r in runs for s in r["step_s"])
                run_medians = [_median(r["step_s"]) for r in runs]
                p10 = steps[round(0.1 * (len(steps) - 1))]
                p90 = steps[round(0.9 * (len(steps) - 1))]
                peak = _median([r["peak_rss_mb"] for r in runs])
                before = _median([r["rss_before_mb"] for r in runs])
                increase = _median([r["train_peak_mb"] - r["rss_before_mb"] for r in runs])
                row[trainer] = {"step": _median(run_medians), "peak": peak, "increase": increase,
                                "pairs": {r["repeat"]: r for r in runs}}
                lines.append(f"{config:<9} {bs:>2} {trainer:<7} {len(runs):>4} {1000 * row[trainer]['step']:>14.1f} "
                             f"{1000 * p10:>7.1f}-{1000 * p90:<7.1f} {peak:>11.0f} {before:>10.0f} {increase:>9.0f} "
                             f"{runs[0]['trainable_params']:>12,} {runs[0]['forward_batch']:>10} "
                             f"{_median([r['final_loss'] for r in runs]):>10.4f}")
            if "ours" in row and "core" in row:
                ours, core = row["ours"], row["core"]
                paired = [_median(ours["pairs"][k]["step_s"]) / _median(core["pairs"][k]["step_s"])
                          for k in ours["pairs"] if k in core["pairs"]]
                ratio = {"config": config, "batch_size": bs, "step_time": ours["step"] / core["step"],
                         "step_time_paired_min": min(paired), "step_time_paired_max": max(paired),
                         "peak_rss": ours["peak"] / core["peak"],
                         "train_increase": ours["increase"] / core["increase"] if core["increase"] > 0 else float("nan")}
                ratios.append(ratio)
                lines.append(f"{'':<9} {'':>2} ratio ours/core: step time {ratio['step_time']:.3f} "
                             f"(per repeat {ratio['step_time_paired_min']:.3f}-{ratio['step_time_paired_max']:.3f}), "
                             f"peak RSS {ratio['peak_rss']:.3f}, training increase {ratio['train_increase']:.3f}")
            lines.append("")
    return "\n".join(lines), ratios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before the timed ones (>= 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer, configuration and batch size")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[2, 4], help="batch sizes to measure")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per child")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "default"), default="PASSIVE",
                        help="OMP_WAIT_POLICY of the children. PASSIVE (default) keeps idle OpenMP threads from "
                             "spinning: on a 2-core machine shared with other work, spinning threads starve the "
                             "main thread and make step times erratic (seen: 30x). 'default' leaves it unset.")
    parser.add_argument("--json", type=Path, help="also write every run's raw figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the children's logs and outputs")
    parser.add_argument("--profile", action="store_true", help="profile a few of our steps instead of benchmarking")
    parser.add_argument("--profile-config", choices=CONFIGS, default="defaults")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    sys.path.insert(0, str(ROOT / "scripts"))
    from sample_images import make_sample_dataset  # PIL only
    images = work / "images"
    make_sample_dataset(images, n=N_IMAGES, size=IMAGE_SIZE, seed=args.seed)
    checkpoint = _spawn("--prepare", None, args.threads, work, "prepare", args.omp_wait_policy)["checkpoint"]
    base = {"checkpoint": checkpoint, "images": str(images), "steps": args.steps, "warmup": args.warmup,
            "threads": args.threads, "seed": args.seed}

    if args.profile:
        spec = dict(base, trainer="ours", config=args.profile_config, batch_size=args.batch_size[0], repeat=0,
                    output=str(work / "out-profile"))
        _spawn("--profile-child", spec, args.threads, work, "profile", args.omp_wait_policy)
        return 0

    print(f"tiny SD1.5 (TAESD) {checkpoint}\n{N_IMAGES} images {IMAGE_SIZE}x{IMAGE_SIZE}, rank {RANK}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} repeats, {args.threads} threads, "
          f"batch sizes {args.batch_size}, configs {args.configs}, OMP_WAIT_POLICY {args.omp_wait_policy}\n"
          f"load average at start {_loadavg()} ({os.cpu_count()} CPUs)", flush=True)
    results = []
    started = time.perf_counter()
    for repeat in range(args.repeats):
        # Alternate which trainer goes first (ABBA), so drift during a pair favours neither.
        order = TRAINERS if repeat % 2 == 0 else TRAINERS[::-1]
        for config in args.configs:
            for bs in args.batch_size:
                for trainer in order:
                    label = f"r{repeat}-{config}-bs{bs}-{trainer}"
                    spec = dict(base, trainer=trainer, config=config, batch_size=bs, repeat=repeat,
                                output=str(work / f"out-{label}"))
                    t0 = time.perf_counter()
                    r = _spawn("--child", spec, args.threads, work, label, args.omp_wait_policy)
                    results.append(r)
                    print(f"  {label:<28} median {1000 * _median(r['step_s']):7.1f} ms/step  peak {r['peak_rss_mb']:6.0f} MB  "
                          f"train +{r['train_peak_mb'] - r['rss_before_mb']:5.0f} MB  ({time.perf_counter() - t0:4.1f} s)",
                          flush=True)
    for r in results:
        if not r["losses_finite"]:
            print(f"warning: {r['trainer']} {r['config']} bs {r['batch_size']} repeat {r['repeat']} had a non-finite loss")
    table, ratios = _summarise(results, args.configs, args.batch_size)
    print(f"\nall runs: {time.perf_counter() - started:.0f} s; load average at end {_loadavg()}\n")
    print("step time: median over runs of each run's median step (ms); p10-p90 over all timed steps")
    print("peak RSS: whole-process ru_maxrss (load + encode + train); train +MB: training-phase peak minus RSS before training")
    print("UNet batch: samples per UNet forward (core pairs every caption of a batch with every latent: batch^2)")
    print()
    print(table)
    print("targets: step time ratio <= 0.8, memory ratio <= 1.0 (ours/core; < 1 = ours better)")
    for r in ratios:
        verdict_t = "meets" if r["step_time"] <= 0.8 else "misses"
        verdict_m = "meets" if r["peak_rss"] <= 1.0 else "misses"
        print(f"  {r['config']:<9} bs {r['batch_size']}: step time {r['step_time']:.3f} ({verdict_t} 0.8), "
              f"peak RSS {r['peak_rss']:.3f} ({verdict_m} 1.0), training increase {r['train_increase']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "ratios": ratios}, indent=1))
    if not args.keep_logs:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs and outputs kept in {work}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--profile-child":
        profile_main(json.loads(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--prepare":
        prepare_main()
    else:
        sys.exit(main())
