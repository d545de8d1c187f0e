"""Does a trained ControlNet make the sampled shape follow the condition? IoU between the condition
silhouette and the judged shape mask, on the quality world, before and after training.

Training goes through our nodes in a real ComfyUI graph (Personalize ControlNet Dataset with the
silhouette maker -> Personalize Train ControlNet -> Personalize Save ControlNet); sampling uses stock
nodes only (ControlNetLoader, ControlNetApplyAdvanced, KSampler, VAEDecode) on held-out silhouettes.
"Before" is the base model: a fresh ControlNet leaves it bit-identical (zero convolutions, tested).

    python benchmarks/quality/controlnet_eval.py                 # world checkpoint, full run
    python benchmarks/quality/controlnet_eval.py --smoke         # tiny random model, a few steps
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
for extra in (REPO / "tests", REPO / "scripts", REPO / "benchmarks" / "quality"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import judge as world_judge
import world
from harness import install_model
from harness import runtime as harness_runtime



def judged_mask(image) -> np.ndarray:
    """The object mask the judge measures (largest foreground component against the border's median colour),
    empty when the judge finds no clear object."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    if world_judge.describe(image)["shape"] == world_judge.NONE:
        return np.zeros(arr.shape[:2], dtype=bool)
    b = world_judge.BORDER
    border = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3), arr[:, :b].reshape(-1, 3),
                             arr[:, -b:].reshape(-1, 3)])
    foreground = np.linalg.norm(arr - np.median(border, axis=0), axis=2) > world_judge.FOREGROUND_DISTANCE
    labels, count = world_judge._components(foreground)  # the judge's own connected components
    if count == 0:
        return foreground
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def training_graph(ckpt: str, folder: Path, steps: int, learning_rate: float, batch_size: int) -> dict:
    common = {"batch_size": batch_size, "grad_accumulation": 1, "optimizer": "adamw", "lr_scheduler": "constant",
              "warmup_steps": 0, "loss_type": "mse", "min_snr_gamma": 5.0, "noise_offset": 0.0, "max_grad_norm": 1.0,
              "precision": "fp32", "gradient_checkpointing": False, "seed": 0, "checkpoint_every": 0, "resume": "",
              "run_name": "controlnet_eval"}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "PersonalizeControlNetDataset", "inputs": {
            "folder": str(folder), "condition": "silhouette", "condition_folder": "", "vae": ["1", 2], "clip": ["1", 1],
            "resolution": 64, "buckets": False, "crop": "center", "crop_variants": 1, "flip": True, "instance_prompt": "",
            "caption_dropout": 0.5, "low_threshold": 0.4, "high_threshold": 0.8, "silhouette_threshold": 0.15,
            "seed": 0, "use_cache": True}},
        "3": {"class_type": "PersonalizeTrainControlNet", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "dataset": ["2", 0], "steps": steps, "learning_rate": learning_rate,
            **common}},
        "4": {"class_type": "PersonalizeSaveControlNet", "inputs": {"control_net": ["3", 0], "name": "controlnet_eval",
                                                                    "precision": "fp16"}},
    }


def sample(ckpt: str, controlnet: str | None, items, conditions, *, steps: int, cfg: float, seed: int):
    """Stock nodes: each item's caption, with its condition through ControlNetApplyAdvanced when `controlnet`.
    Items of one caption are sampled as one batch (one hint per latent)."""
    import torch
    from PIL import Image

    import nodes
    by_caption: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_caption.setdefault(item.caption, []).append(index)
    images = [None] * len(items)
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt)[:3]
        control = nodes.ControlNetLoader().load_controlnet(controlnet)[0] if controlnet else None
        negative_base = nodes.CLIPTextEncode().encode(clip, "")[0]
        for group, (text, indices) in enumerate(by_caption.items()):
            positive, negative = nodes.CLIPTextEncode().encode(clip, text)[0], negative_base
            if control is not None:
                hints = torch.stack([conditions[i] for i in indices])
                positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
                    positive, negative, control, hints, 1.0, 0.0, 1.0)
            latent = nodes.EmptyLatentImage().generate(64, 64, len(indices))[0]
            out = nodes.KSampler().sample(model, seed + group, steps, cfg, "euler", "normal", positive, negative, latent)[0]
            for i, pixels in zip(indices, nodes.VAEDecode().decode(vae, out)[0]):
                images[i] = Image.fromarray((pixels.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    return images


def scores(images, items, conditions) -> dict:
    ious = [iou(judged_mask(im), c[..., 0].numpy() > 0.5) for im, c in zip(images, conditions)]
    shapes = [world_judge.judge(im)[0] == item.shape for im, item in zip(images, items)]
    return {"iou": float(np.mean(ious)), "iou_over_0.5": float(np.mean([x > 0.5 for x in ious])),
            "shape_accuracy": float(np.mean(shapes))}


def run(checkpoint: Path, *, train_images: int, eval_images: int, steps: int, learning_rate: float, batch_size: int,
        sample_steps: int, cfg: float, out_dir: Path) -> dict:
    from PIL import Image
    rt = harness_runtime.boot()
    pairs = rt.pack_import("trainers.data.pairs")
    ckpt = install_model(rt.base_dir, "checkpoints", checkpoint, "controlnet_eval_world.safetensors")
    folder = out_dir / "train"
    world.write_folder(folder, world.base_dataset(train_images, seed=0))
    held_out = world.base_dataset(eval_images, seed=1)
    import torch
    conditions = [pairs.make_condition(torch.from_numpy(np.asarray(item.image, dtype=np.float32) / 255.0)[None],
                                       "silhouette")[0] for item in held_out]
    before = sample(ckpt, None, held_out, conditions, steps=sample_steps, cfg=cfg, seed=100)
    started = time.perf_counter()
    result = rt.run_prompt(training_graph(ckpt, folder, steps, learning_rate, batch_size))
    graph_seconds = time.perf_counter() - started
    end = [e["data"] for e in result["events"] if e["type"] == "personalize.end"]
    saved = result["outputs"]["4"]["text"][0].removeprefix("saved ")
    after = sample(ckpt, saved, held_out, conditions, steps=sample_steps, cfg=cfg, seed=100)
    table = {"before": scores(before, held_out, conditions), "after": scores(after, held_out, conditions),
             "train_seconds": end[0]["seconds"] if end else graph_seconds, "graph_seconds": graph_seconds,
             "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "train_images": train_images,
             "eval_images": eval_images, "final_loss": end[0].get("final_loss") if end else None}
    sheet = Image.new("RGB", (64 * min(12, eval_images), 64 * 3), (0, 0, 0))
    for i in range(min(12, eval_images)):
        sheet.paste(Image.fromarray((conditions[i].numpy() * 255).astype(np.uint8)), (64 * i, 0))
        sheet.paste(before[i], (64 * i, 64))
        sheet.paste(after[i], (64 * i, 128))
    sheet.save(out_dir / "grid_controlnet.png")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a world checkpoint (default: pretrain or reuse the cached one)")
    parser.add_argument("--train-images", type=int, default=96)
    parser.add_argument("--eval-images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "quality" / "results" / "controlnet")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps, 2 samples: checks the pipeline")
    args = parser.parse_args(argv)
    if args.smoke:
        from tiny_model import cached_tiny_checkpoint
        args.checkpoint, args.steps, args.train_images, args.eval_images, args.sample_steps = (
            cached_tiny_checkpoint("taesd"), 2, 4, 2, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        from pretrain import pretrained_world_checkpoint
        args.checkpoint = pretrained_world_checkpoint()
    table = run(args.checkpoint, train_images=args.train_images, eval_images=args.eval_images, steps=args.steps,
                learning_rate=args.learning_rate, batch_size=args.batch_size, sample_steps=args.sample_steps,
                cfg=args.cfg, out_dir=args.out)
    print(f"{'':<8}{'IoU':>8}{'IoU>0.5':>10}{'shape':>8}")
    for key in ("before", "after"):
        row = table[key]
        print(f"{key:<8}{row['iou']:>8.3f}{row['iou_over_0.5']:>10.3f}{row['shape_accuracy']:>8.3f}")
    print(f"training: {table['steps']} steps x batch {table['batch_size']} in {table['train_seconds']:.0f} s")
    (args.out / "results.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                       "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
