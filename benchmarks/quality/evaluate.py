"""Score personalization methods on the synthetic world: subject fidelity, prompt fidelity,
preservation, diversity, time, memory and artifact size, each method trained through our nodes in a
real ComfyUI graph and sampled with stock nodes.

    python benchmarks/quality/evaluate.py                    # full run (pretrains the world once, cached)
    python benchmarks/quality/evaluate.py --smoke            # a minute: tiny random model, few steps/samples
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for extra in (REPO / "tests", REPO / "scripts", REPO / "benchmarks" / "quality"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from harness import install_model  # noqa: E402
from harness import runtime as harness_runtime  # noqa: E402

import classifier  # noqa: E402
import judge as world_judge  # noqa: E402
import world  # noqa: E402

BASE_SHAPES = ("circle", "square", "triangle")
BASE_COLOURS = ("red", "green", "blue", "yellow")
RECOLOURS = ("blue", "green", "yellow")
IDENTIFIER = "sks"
CONCEPT = ("cross", "purple")


@dataclass
class Method:
    """A method as the benchmark runs it: a training node, its inputs (per-method defaults), which of
    its outputs carry the CLIP and the artifact, and the node that saves the artifact."""

    name: str
    node: str = "PersonalizeTrainLoRA"
    inputs: dict = field(default_factory=dict)
    clip_output: int | None = 1  # None: sample with the checkpoint's CLIP
    model_output: int | None = 0  # None: sample with the checkpoint's MODEL (the method trains only the text side)
    artifact_output: int = 2
    save_node: str | None = "PersonalizeSaveLoRA"  # None: the training node saves the artifact itself
    save_input: str | dict = "lora"  # an input name, or {input: training output index} for several
    save_extra: dict = field(default_factory=lambda: {"save_dtype": "fp16"})
    artifact_folder: str = "loras"
    identifier: str = IDENTIFIER  # the word prompts use for the subject (a new token for textual inversion)
    class_prompt: str = ""  # prior preservation: class images generated in-graph from this prompt
    class_images: int = 0
    links: dict = field(default_factory=dict)  # extra training-node inputs from the checkpoint loader, e.g. {"vae": 2}

    @property
    def slug(self) -> str:
        """The name as a file-name part (tuning labels hold '[', '=' and ',')."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name).strip("_")


LORA_DEFAULTS = {
    "steps": 800, "learning_rate": 1e-3, "rank": 8, "alpha": 8.0, "targets": "attention_ff", "train_text_encoder": False,
    "text_encoder_lr": 5e-5, "dora": False, "prior_loss_weight": 1.0, "prior_target": "images", "batch_size": 4, "grad_accumulation": 1, "optimizer": "adamw",
    "lr_scheduler": "constant", "warmup_steps": 20, "loss_type": "mse", "min_snr_gamma": 5.0, "noise_offset": 0.0,
    "max_grad_norm": 1.0, "precision": "fp32", "gradient_checkpointing": False, "seed": 0, "checkpoint_every": 0,
    "run_name": "quality", "resume": "", "initial_lora": "[none]",
}

_LOOP = {k: LORA_DEFAULTS[k] for k in (
    "batch_size", "grad_accumulation", "optimizer", "lr_scheduler", "warmup_steps", "loss_type", "min_snr_gamma",
    "noise_offset", "max_grad_norm", "precision", "gradient_checkpointing", "seed", "checkpoint_every", "run_name", "resume")}
TOKEN = "<sks>"  # textual inversion needs a token the vocabulary does not have
# Regularization images (kohya's reg folder, generated in-graph by Personalize Class Images, one prompt per line): the
# base model's own samples of every base prompt. The world has no class "cross" to preserve, and without them a UNet
# LoRA learns the subject by shifting the hue of every prompt (red draws green, blue purple: preservation 0.13).
# Also the class in each base colour ("a blue cross": the base model draws a blob of that colour), a DreamBooth class
# prior per colour: it keeps the colour words working next to the learned subject.
REGULARIZATION = {"class_prompt": "\n".join([*(world.caption(shape, colour) for shape, colour in world.base_combos()),
                                            *(world.caption(CONCEPT[0], colour) for colour in BASE_COLOURS)]),
                  "class_images": 64}
# ... pulled towards the base model's own predictions on them (`prior_target`=base_model): on world v4 (16-sample probes,
# lora + reg) preservation 0.58 -> 0.79 and subject 0.56 -> 0.63 against the images as targets.
REG_INPUTS = {"prior_target": "base_model", "prior_loss_weight": 4.0}
# LoRA with it learns on for longer without losing the base (16-sample probes: 800 steps: subject 0.50, preservation
# 0.81; 1600 steps: 0.81, 0.83).
LORA_REG = {**LORA_DEFAULTS, **REG_INPUTS, "steps": 1600}

METHODS = {
    "lora": Method("lora", inputs=dict(LORA_DEFAULTS)),
    "lora_all_layers": Method("lora_all_layers", inputs={**LORA_REG, "targets": "all",
                                                         "learning_rate": 5e-4}, **REGULARIZATION),
    "lora_reg": Method("lora_reg", inputs=dict(LORA_REG), **REGULARIZATION),
    "lora_prior": Method("lora_prior", inputs=dict(LORA_DEFAULTS), class_prompt="a cross", class_images=24),
    "lora_cross_kv": Method("lora_cross_kv", inputs={**LORA_DEFAULTS, "targets": "cross_attention_kv"}),
    "dora": Method("dora", inputs={**LORA_REG, "dora": True}, **REGULARIZATION),
    "lora_text_encoder": Method("lora_text_encoder", inputs={**LORA_REG, "train_text_encoder": True},
                                **REGULARIZATION),
    "hypernetwork": Method("hypernetwork", node="PersonalizeTrainHypernetwork", clip_output=None, artifact_output=1,
                           save_node="PersonalizeSaveHypernetwork", save_input="hypernetwork", save_extra={},
                           artifact_folder="hypernetworks", **REGULARIZATION,
                           inputs={**{k: v for k, v in LORA_DEFAULTS.items() if k not in (
                               "rank", "alpha", "targets", "train_text_encoder", "text_encoder_lr", "dora", "initial_lora")},
                               "learning_rate": 1e-4, "layer_structure": "1, 2, 1", "activation": "linear",
                               "layer_norm": False, "dropout": False, "last_layer_dropout": False,
                               "activate_output": False, "weight_init": "normal", **REG_INPUTS}),
    "textual_inversion": Method("textual_inversion", node="PersonalizeTrainTextualInversion", clip_output=0, model_output=None,
                                artifact_output=1, save_node="PersonalizeSaveEmbedding", save_input="embedding",
                                save_extra={"format": "safetensors"}, artifact_folder="embeddings", identifier=TOKEN,
                                inputs={**_LOOP, "steps": 800, "learning_rate": 5e-3, "token": TOKEN, "vectors": 4,
                                        "init_word": "shape", "captions": "captions", "trigger_word": IDENTIFIER}),
    "pivotal": Method("pivotal", node="PersonalizeTrainPivotal", clip_output=1, save_node="PersonalizeSavePivotal",
                      save_input={"lora": 2, "embedding": 3}, identifier=TOKEN, **REGULARIZATION,
                      inputs={**_LOOP, "steps": 800, "learning_rate": 1e-3, "embedding_lr": 5e-3, "embedding_fraction": 0.5,
                              "rank": 8, "alpha": 8.0, "targets": "attention_ff", "train_text_encoder": False,
                              "text_encoder_lr": 5e-5, **REG_INPUTS, "token": TOKEN,
                              "vectors": 2, "init_word": "shape",
                              "captions": "captions", "trigger_word": IDENTIFIER}),
    "dreambooth": Method("dreambooth", node="PersonalizeTrainDreamBooth", save_node=None, artifact_folder="checkpoints",
                         links={"vae": 2},
                         inputs={**_LOOP, "steps": 400, "learning_rate": 5e-5, "instance_prompt": "",
                                 "prior_preservation": False, "prior_loss_weight": 1.0, "prior_target": "images",
                                 "train_text_encoder": False,
                                 "text_encoder_lr": 1e-6, "text_encoder_fraction": 0.5, "weight_dtype": "fp32",
                                 "weight_rounding": "stochastic", "fused_backward": False, "ema_decay": 0.0,
                                 "ema_warmup_steps": 100, "ema_on_cpu": False, "use_ema": True,
                                 "save_name": "quality/dreambooth", "save_dtype": "fp16"}),
}
METHODS["dreambooth_prior"] = Method(**{**METHODS["dreambooth"].__dict__, "name": "dreambooth_prior",
                                        **REGULARIZATION,
                                        # The base-model prior holds the base so well that the subject needs the rate
                                        # and steps that, without it, overwrite every prompt (16-sample probes: lr 5e-5 x
                                        # 400: subject 0.00, preservation 0.96; 1e-4 x 800: 0.56, 0.73).
                                        "inputs": {**METHODS["dreambooth"].inputs, **REG_INPUTS, "prior_preservation": True,
                                                   "learning_rate": 1e-4, "steps": 800,
                                                   "save_name": "quality/dreambooth_prior"}})


# The concept dataset: each of the 5 images with four caption lines (the dataset's caption choices draw one per step):
# the subject prompt itself; the colour named, so the colour word carries part of the purple (kohya's advice: caption
# what should stay changeable); and other words before the identifier, so that what it learned does not hang on the
# exact text before it (the text encoder is causal: "a green sks cross" encodes "sks" differently from "a sks cross").
# Measured on world v4 (lora + reg probes): subject 0.19 with the first line alone, 0.56 with the first two; with all
# four and the colour-class regularization 0.83 / preservation 0.89 (24 + 8 samples), and the recolour prompts draw
# the cross (in a blend of the named colour and purple) where they drew base shapes before.
CONCEPT_CAPTIONS = ("a {identifier} cross", "a purple {identifier} cross",
                    "a {{single|plain|simple|flat|small|big}} {identifier} cross", "the {identifier} cross")
# Two kohya repeats: 10 samples cut into batches of 4, 4 and 2 per epoch, as when each caption had its own folder. Five
# samples alone give batches of 4 and 1 (half the steps on one image). Measured (one 48-sample run each, lora_reg):
# subject 0.75 with five, 0.67 with ten, 0.77 last session with two folders: the run-to-run spread (~0.1) hides any
# effect, so this is hygiene, not a gain.
CONCEPT_REPEATS = 2


def write_concept_folder(folder: Path, seed: int = 0) -> None:
    """The concept images, each with its alternative captions on separate lines, in a kohya `N_concept` repeat folder
    (the folder is the benchmark's own: what an earlier run left there is removed first)."""
    shutil.rmtree(folder, ignore_errors=True)
    captions = "\n".join(line.format(identifier=IDENTIFIER) for line in CONCEPT_CAPTIONS)
    world.write_folder(folder / f"{CONCEPT_REPEATS}_concept",
                       [(item.image, captions) for item in world.concept_images(5, seed=seed)])


def subject_prompt(colour: str | None = None, identifier: str = IDENTIFIER) -> str:
    return f"a {colour + ' ' if colour else ''}{identifier} cross"


def _sampling_branch(prompt: dict, node_id: int, model_ref, clip_ref, vae_ref, text: str, count: int, seed: int,
                     prefix: str, steps: int, cfg: float) -> int:
    ids = [str(node_id + i) for i in range(6)]
    prompt[ids[0]] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip_ref}}
    prompt[ids[1]] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip_ref}}
    prompt[ids[2]] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": count}}
    prompt[ids[3]] = {"class_type": "KSampler", "inputs": {
        "model": model_ref, "positive": [ids[0], 0], "negative": [ids[1], 0], "latent_image": [ids[2], 0],
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt[ids[4]] = {"class_type": "VAEDecode", "inputs": {"samples": [ids[3], 0], "vae": vae_ref}}
    prompt[ids[5]] = {"class_type": "SaveImage", "inputs": {"images": [ids[4], 0], "filename_prefix": prefix}}
    return node_id + 6


def method_graph(method: Method, ckpt: str, folder: Path, prompts: dict[str, str], counts: dict[str, int],
                 steps_override: int | None, sample_steps: int, cfg: float) -> tuple[dict, dict[str, str]]:
    """API-format graph: train with the method, then sample every prompt with stock nodes.
    Returns the graph and {prompt key: SaveImage node id}."""
    inputs = dict(method.inputs)
    if steps_override:
        inputs["steps"] = steps_override
    inputs["run_name"] = f"quality_{method.slug}"
    dataset = {"folder": str(folder), "vae": ["1", 2], "clip": ["1", 1], "resolution": 64, "buckets": False,
               "bucket_step": 64, "min_side": 0, "max_side": 0, "no_upscale": False, "crop": "center", "crop_variants": 1,
               "flip": True, "trigger_word": "", "instance_prompt": "", "shuffle_tags": False, "keep_tokens": 0,
               "tag_dropout": 0.0, "caption_dropout": 0.0, "masked_loss": False, "seed": 0, "use_cache": True}
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
              "2": {"class_type": "PersonalizeDatasetFromFolder", "inputs": dataset},
              "3": {"class_type": method.node, "inputs": {"model": ["1", 0], "clip": ["1", 1], "dataset": ["2", 0], **inputs,
                                                        **{k: ["1", i] for k, i in method.links.items()}}}}
    if method.class_images:
        prompt["5"] = {"class_type": "PersonalizeClassImages", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "class_prompt": method.class_prompt, "negative_prompt": "",
            "count": method.class_images, "width": 64, "height": 64, "steps": sample_steps, "cfg": cfg,
            "sampler_name": "euler", "scheduler": "normal", "seed": 0}}
        dataset["class_images"] = ["5", 0]
    if method.save_node:
        links = (method.save_input if isinstance(method.save_input, dict) else {method.save_input: method.artifact_output})
        prompt["4"] = {"class_type": method.save_node, "inputs": {**{k: ["3", i] for k, i in links.items()},
                                                                  "name": f"quality/{method.slug}", **method.save_extra}}
    clip_ref = ["3", method.clip_output] if method.clip_output is not None else ["1", 1]
    model_ref = ["3", method.model_output] if method.model_output is not None else ["1", 0]
    save_nodes = {}
    next_id = 10
    for key, text in prompts.items():
        save_nodes[key] = str(next_id + 5)
        next_id = _sampling_branch(prompt, next_id, model_ref, clip_ref, ["1", 2], text, counts[key], 1000 + next_id,
                                   f"quality/{method.slug}/{key}", sample_steps, cfg)
    return prompt, save_nodes


def _folder_bytes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def score(judged: dict[str, list[tuple[str, str]]], expected: dict[str, tuple[str, str]]) -> dict[str, float]:
    def accuracy(keys):
        pairs = [(j, expected[k]) for k in keys for j in judged[k]]
        return sum(j == e for j, e in pairs) / max(1, len(pairs))
    subject = [k for k in judged if k == "subject"]
    recolour = [k for k in judged if k.startswith("recolour_")]
    base = [k for k in judged if k.startswith("base_")]
    return {"subject_fidelity": accuracy(subject), "prompt_fidelity": accuracy(recolour), "preservation": accuracy(base)}


def diversity(images) -> float:
    """Mean pairwise mean-absolute pixel difference of the subject samples (0 = identical)."""
    import numpy as np
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    pairs = list(combinations(arrays, 2))
    return float(sum(np.abs(a - b).mean() for a, b in pairs) / max(1, len(pairs)))


def contact_sheet(rows: dict[str, list], path: Path) -> None:
    from PIL import Image, ImageDraw
    width = max(len(v) for v in rows.values()) * 64 + 130
    sheet = Image.new("RGB", (width, 64 * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * 64 + 26), label[:20], fill=(0, 0, 0))
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((64, 64)), (130 + c * 64, r * 64))
    sheet.save(path)


def with_overrides(name: str, overrides: dict) -> Method:
    """The method with some training-node inputs changed (for tuning runs: `--set learning_rate=1e-4`)."""
    method = METHODS[name]
    if not overrides:
        return method
    unknown = sorted(set(overrides) - set(method.inputs))
    if unknown:
        raise SystemExit(f"--set {unknown}: not inputs of {method.node} (it has {sorted(method.inputs)})")
    label = name + "[" + ",".join(f"{k}={v}" for k, v in overrides.items()) + "]"
    return Method(**{**method.__dict__, "name": label, "inputs": {**method.inputs, **overrides}})


def run(methods: list[str], checkpoint: Path, *, count: int, base_count: int, steps: int | None, sample_steps: int,
        cfg: float, out_dir: Path, concept_seed: int = 0, classifier_steps: int = 300, overrides: dict | None = None) -> dict:
    from PIL import Image
    rt = harness_runtime.boot()
    ckpt = install_model(rt.base_dir, "checkpoints", checkpoint, "quality_world.safetensors")
    folder = out_dir / "concept"
    write_concept_folder(folder, concept_seed)
    table = {}
    for name in methods:
        method = with_overrides(name, overrides or {})
        name = method.name
        prompts, expected, counts = {"subject": subject_prompt(identifier=method.identifier)}, {"subject": CONCEPT}, {}
        for colour in RECOLOURS:
            prompts[f"recolour_{colour}"] = subject_prompt(colour, method.identifier)
            expected[f"recolour_{colour}"] = ("cross", colour)
        for shape in BASE_SHAPES:
            for colour in BASE_COLOURS:
                prompts[f"base_{colour}_{shape}"] = world.caption(shape, colour)
                expected[f"base_{colour}_{shape}"] = (shape, colour)
        counts = {k: base_count if k.startswith("base_") else count for k in prompts}
        graph, save_nodes = method_graph(method, ckpt, folder, prompts, counts, steps, sample_steps, cfg)
        artifacts = rt.folder(method.artifact_folder)
        before = _folder_bytes(artifacts)
        started = time.perf_counter()
        result = rt.run_prompt(graph)
        seconds = time.perf_counter() - started
        end = [e["data"] for e in result["events"] if e["type"] == "personalize.end"]
        images = {k: [Image.open(p) for p in rt.image_paths(result, node)] for k, node in save_nodes.items()}
        missing = {k: f"{len(ims)}/{counts[k]}" for k, ims in images.items() if len(ims) != counts[k]}
        if missing:
            raise RuntimeError(f"{name}: the graph returned too few samples {missing}")
        judged = {k: [world_judge.judge(im) for im in ims] for k, ims in images.items()}
        written = {p: size for p, size in _folder_bytes(artifacts).items() if p not in before}
        row = score(judged, expected)
        real_positives = [item.image for item in world.concept_images(5, seed=concept_seed)]
        row.update(classifier.rare_class_experiment(real_positives, images["subject"], steps=classifier_steps))
        row.update(diversity=diversity(images["subject"]), train_seconds=end[0]["seconds"] if end else seconds,
                   graph_seconds=seconds, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   artifact_mb=sum(written.values()) / 2**20)
        table[name] = row
        print(f"{name}: {row}", flush=True)
        contact_sheet({k: v[:8] for k, v in images.items() if not k.startswith("base_") or k.endswith("_circle")},
                      out_dir / f"grid_{method.slug}.png")
    return table


def print_table(table: dict) -> None:
    columns = ["subject_fidelity", "prompt_fidelity", "preservation", "diversity", "train_seconds", "peak_rss_mb",
               "artifact_mb", "balanced_acc_real", "balanced_acc_augmented"]
    short = {"subject_fidelity": "subject", "prompt_fidelity": "prompt", "preservation": "preserve",
             "diversity": "diversity", "train_seconds": "train s", "peak_rss_mb": "peak MB", "artifact_mb": "file MB",
             "balanced_acc_real": "rare:real", "balanced_acc_augmented": "rare:+gen"}
    width = max([18, *(len(name) + 2 for name in table)])
    print(f"{'method':<{width}}" + "".join(f"{short[c]:>10}" for c in columns))
    for name, row in table.items():
        print(f"{name:<{width}}" + "".join(f"{row[c]:>10.3f}" for c in columns))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=48, help="samples per subject/recolour prompt (>= 48 for +-10 points)")
    parser.add_argument("--base-samples", type=int, default=16,
                        help="samples per base prompt (preservation pools the 12 prompts: 16 each is 192 samples)")
    parser.add_argument("--steps", type=int, default=None, help="override every method's training steps")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--checkpoint", type=Path, help="a world checkpoint (default: pretrain or reuse the cached one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "quality" / "results")
    parser.add_argument("--classifier-steps", type=int, default=300, help="training steps of the rare-class classifier")
    parser.add_argument("--set", action="append", default=[], metavar="INPUT=VALUE",
                        help="change a training-node input of the methods run (JSON value), e.g. --set learning_rate=1e-4")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 3 steps, 2 samples: checks the pipeline")
    args = parser.parse_args(argv)
    if args.smoke:
        from tiny_model import cached_tiny_checkpoint
        args.checkpoint, args.steps, args.samples, args.sample_steps = cached_tiny_checkpoint("taesd"), 3, 2, 2
        args.base_samples = 1
        args.classifier_steps = 5
        args.methods = args.methods[:1] if args.methods == list(METHODS) else args.methods
    if args.checkpoint is None:
        from pretrain import pretrained_world_checkpoint
        args.checkpoint = pretrained_world_checkpoint()
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = {}
    for item in args.set:
        key, _, text = item.partition("=")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    table = run(args.methods, args.checkpoint, count=args.samples, base_count=args.base_samples, steps=args.steps, sample_steps=args.sample_steps,
                cfg=args.cfg, out_dir=args.out, classifier_steps=args.classifier_steps, overrides=overrides)
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("methods", "set")}
    results = args.out / "results.json"
    previous = json.loads(results.read_text()) if results.is_file() else {}
    if previous.get("settings") == settings:  # same world and sampling: rows of methods run separately add up
        table = {**previous.get("table", {}), **table}
    print_table(table)
    results.write_text(json.dumps({"settings": settings, "table": table}, indent=1))
    print(f"table: {args.out / 'results.json'}; grids: {args.out}/grid_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
