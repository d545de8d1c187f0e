"""IP-Adapter in the quality world: does an adapter trained there reproduce the colour and shape of an unseen
reference image better than the base model does?

    python benchmarks/quality/ipadapter_eval.py                 # world checkpoint (cached), both variants
    python benchmarks/quality/ipadapter_eval.py --smoke         # tiny random model: checks the pipeline only

The world has no CLIP-Vision model, so one is made here: a small ViT in ComfyUI's own `ClipVisionModel`
(64 px input, 8 px patches) with seeded random weights, i.e. a fixed random image feature, as the adapter's
image encoder. Adapters train on captioned base-world images (reference = target, paper recipe) through the
pack's engine; then, for unseen renders (new seeds) of each base combo and for the held-out purple cross,
the base model and the model + adapter sample with the same empty prompt, seeds and stock KSampler, and the
world's judge checks whether each sample has the reference's colour and shape.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
for extra in (REPO / "tests", REPO / "scripts", REPO / "benchmarks" / "quality"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from harness import runtime as harness_runtime  # noqa: E402

import judge as world_judge  # noqa: E402
import world  # noqa: E402

CLIP_VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 128, "image_size": 64,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 256, "layer_norm_eps": 1e-5,
    "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 3,
    "patch_size": 8, "projection_dim": 128, "torch_dtype": "float32",
}


def world_clip_vision(folder: Path, seed: int = 0):
    """ComfyUI's ClipVisionModel from the config above, seeded random weights (norms 1, biases 0)."""
    import torch
    import comfy.clip_vision
    path = folder / "world_clip_vision.json"
    path.write_text(json.dumps(CLIP_VISION_CONFIG))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in clip_vision.get_sd().items():
        if "norm" in key or "layrnorm" in key:
            state[key] = torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value)
        else:
            fan_in = value.shape[1] * (value[0, 0].numel() if value.ndim == 4 else 1) if value.ndim > 1 else value.shape[0]
            state[key] = (torch.randn(value.shape, generator=generator) / fan_in ** 0.5).to(value.dtype)
    clip_vision.load_sd(state)
    return clip_vision


def sample(model, clip, vae, count: int, seed: int, steps: int, cfg: float):
    """`count` images from the empty prompt with the stock KSampler (euler, normal)."""
    import torch
    import nodes as comfy_nodes  # ComfyUI's nodes.py (this is a benchmark script, not the pack)
    empty = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(count, 4, 8, 8)}
    out = comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", empty, empty, latent)[0]
    images = vae.decode(out["samples"]).clamp(0, 1)
    from PIL import Image
    return [Image.fromarray((im.cpu().numpy() * 255).round().astype(np.uint8)) for im in images]


def match_rates(judged: list[tuple[str, str]], reference: tuple[str, str]) -> dict[str, float]:
    n = max(1, len(judged))
    return {"colour": sum(j[1] == reference[1] for j in judged) / n, "shape": sum(j[0] == reference[0] for j in judged) / n,
            "both": sum(j == reference for j in judged) / n}


def run(args) -> dict:
    import torch
    rt = harness_runtime.boot()
    build = rt.pack_import("trainers.data.build")
    job_mod = rt.pack_import("trainers.job")
    loop = rt.pack_import("trainers.loop")
    methods = rt.pack_import("trainers.methods")
    ipa_nodes = rt.pack_import("nodes.ipadapter")
    ipa_apply = rt.pack_import("trainers.ipadapter.apply")
    import comfy.sd

    work = Path(tempfile.mkdtemp(prefix="ipadapter-eval-"))
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True, output_clip=True)
        world.write_folder(work / "train", world.base_dataset(args.train_images, seed=0))
        spec = build.DatasetSpec(folder=str(work / "train"), resolution=64, buckets=False, keep_pixels=True, flip=True)
        data, _ = build.build_training_data(spec, vae, clip)
    clip_vision = world_clip_vision(work)

    references = [(f"{c} {s}", item) for (s, c), item in zip(world.base_combos(), world.base_dataset(12, seed=4242))]
    references += [(f"purple cross {i}", item) for i, item in enumerate(world.concept_images(args.novel, seed=77))]
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "models": {}}

    def evaluate(name, make_model):
        rows, t = {}, time.perf_counter()
        for r, (label, item) in enumerate(references):
            with torch.inference_mode():
                images = sample(make_model(item), clip, vae, args.samples, 1000 + r, args.sample_steps, args.cfg)
            judged = [world_judge.judge(im) for im in images]
            rows[label] = {**match_rates(judged, (item.shape, item.colour)), "judged": judged}
        seen = [v for k, v in rows.items() if not k.startswith("purple cross")]
        novel = [v for k, v in rows.items() if k.startswith("purple cross")]
        summary = {f"{part}_{m}": float(np.mean([v[m] for v in group])) if group else float("nan")
                   for part, group in (("unseen_render", seen), ("novel_concept", novel)) for m in ("colour", "shape", "both")}
        report["models"][name] = {"summary": summary, "per_reference": rows, "sample_seconds": time.perf_counter() - t}
        print(name, json.dumps(summary), flush=True)

    evaluate("base model", lambda item: model)
    for variant in args.variants:
        options = {"variant": variant, "text_drop": args.text_drop, "image_drop": 0.05, "both_drop": 0.05,
                   "resampler_depth": 2}
        with torch.inference_mode():
            uncond = ipa_nodes.prepare_features(data, clip_vision, variant, True)
        job = job_mod.TrainJob(method="ip_adapter", method_options=options, steps=args.steps, batch_size=args.batch_size,
                               learning_rate=args.lr, min_snr_gamma=5.0, warmup_steps=20, seed=0)
        method = methods.create_method("ip_adapter", {**options, "uncond_features": uncond})
        t = time.perf_counter()
        with torch.inference_mode():
            result = loop.train(job, method, model, clip, data, checkpoint_dir=work / f"ckpt_{variant}")
        train_seconds = time.perf_counter() - t
        adapter = method.adapter

        def with_adapter(item, adapter=adapter):
            pixels = torch.from_numpy(np.asarray(item.image.convert("RGB"), dtype=np.float32) / 255.0)[None]
            features = ipa_apply.image_features(clip_vision, pixels, adapter)
            negative = ipa_apply.uncond_features(clip_vision, adapter)
            return ipa_apply.apply_ipadapter(model, adapter, features, negative, weight=args.weight)

        evaluate(f"+ ip-adapter {variant}", with_adapter)
        report["models"][f"+ ip-adapter {variant}"].update(train_seconds=train_seconds,
                                                           final_loss=float(np.mean(result.loss_history[-20:])))
    return report


def print_table(report: dict) -> None:
    columns = ["unseen_render_colour", "unseen_render_shape", "unseen_render_both", "novel_concept_colour",
               "novel_concept_shape", "novel_concept_both"]
    print(f"{'model':<22}" + "".join(f"{c.replace('unseen_render', 'unseen').replace('novel_concept', 'novel'):>15}"
                                     for c in columns))
    for name, row in report["models"].items():
        print(f"{name:<22}" + "".join(f"{row['summary'][c]:>15.3f}" for c in columns))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a world checkpoint (default: pretrain or reuse the cached one)")
    parser.add_argument("--variants", nargs="+", default=["base", "plus"], choices=["base", "plus"])
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text-drop", type=float, default=0.2, help="caption drop rate (higher than the paper's 0.05 "
                                                                      "because the benchmark prompts are empty)")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=8, help="samples per reference image")
    parser.add_argument("--novel", type=int, default=4, help="purple-cross references (a concept the UNet never saw)")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "quality" / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 3 steps, 2 samples")
    args = parser.parse_args(argv)
    if args.smoke:
        from tiny_model import cached_tiny_checkpoint
        args.checkpoint, args.steps, args.samples, args.sample_steps, args.train_images = (
            cached_tiny_checkpoint("taesd"), 3, 2, 2, 12)
        args.novel, args.batch_size = 1, 4
    if args.checkpoint is None:
        from pretrain import pretrained_world_checkpoint
        args.checkpoint = pretrained_world_checkpoint()
    report = run(args)
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("ipadapter_smoke.json" if args.smoke else "ipadapter.json")
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
