"""Write example_workflows/personalize_lora.json (UI format) and its API-format twin from one spec.

Run after changing a node's inputs: `python scripts/make_example_workflow.py`. The UI format stores
widget values by position, so `widgets` must list each node's widget inputs in schema order
(tests/test_example_workflows.py checks the result against the server's /object_info).
"""
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "example_workflows"
import json
# API-format twin of the example workflow: node id -> {class_type, inputs}
api = {
 "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
 "2": {"class_type": "PersonalizeDatasetFromFolder", "inputs": {"folder": "personalize_demo", "vae": ["1", 2], "clip": ["1", 1],
       "resolution": 512, "buckets": True, "bucket_step": 64, "min_side": 0, "max_side": 0, "no_upscale": False,
       "crop": "center", "crop_variants": 4, "flip": False, "trigger_word": "sks", "instance_prompt": "a photo of sks cross",
       "shuffle_tags": False, "keep_tokens": 1, "tag_dropout": 0.0, "caption_dropout": 0.0, "masked_loss": False, "seed": 0,
       "use_cache": True, "class_folder": "", "class_prompt": "", "caption_choices": True}},
 "3": {"class_type": "PersonalizeTrainLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "dataset": ["2", 0],
       "steps": 500, "learning_rate": 0.0001, "rank": 16, "alpha": 16.0, "targets": "attention_ff", "train_text_encoder": False,
       "text_encoder_lr": 5e-05, "dora": False, "prior_loss_weight": 1.0, "prior_target": "images", "batch_size": 1, "grad_accumulation": 1, "optimizer": "adamw",
       "lr_scheduler": "constant", "warmup_steps": 0, "loss_type": "mse", "min_snr_gamma": 5.0, "noise_offset": 0.0,
       "max_grad_norm": 1.0, "precision": "bf16", "gradient_checkpointing": False, "seed": 0, "checkpoint_every": 100,
       "run_name": "sks_cross", "resume": "", "initial_lora": "[none]", "previews": ["11", 0]}},
 "4": {"class_type": "PersonalizeSaveLoRA", "inputs": {"lora": ["3", 2], "name": "personalize/sks_cross", "save_dtype": "fp16"}},
 "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks cross, in blue", "clip": ["3", 1]}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["3", 1]}},
 "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
 "8": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
       "seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
 "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
 "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "personalize/sks_cross"}},
 "11": {"class_type": "PersonalizePreviewSettings", "inputs": {"vae": ["1", 2], "prompts": "a photo of sks cross\nsks cross on a beach",
       "negative_prompt": "blurry, low quality", "every_n_steps": 50, "sample_steps": 20, "cfg": 7.0, "seed": 0, "width": 512,
       "height": 512, "sampler_name": "euler", "scheduler": "normal"}},
}
titles = {"1": "Load Checkpoint", "2": "Personalize Dataset (folder)", "3": "Personalize Train LoRA", "4": "Personalize Save LoRA",
          "5": "Prompt with the subject", "6": "Negative prompt", "7": "Empty Latent Image", "8": "KSampler (trained LoRA)",
          "9": "VAE Decode", "10": "Save Image", "11": "Personalize Training Previews"}
# widget order and socket types per class (what the UI format stores positionally). The frontend adds a
# control_after_generate widget after every INT input named "seed" unless the schema says otherwise.
widgets = {
 "CheckpointLoaderSimple": ["ckpt_name"],
 "PersonalizeDatasetFromFolder": ["folder", "resolution", "buckets", "bucket_step", "min_side", "max_side", "no_upscale", "crop",
     "crop_variants", "flip", "trigger_word", "instance_prompt", "shuffle_tags", "keep_tokens", "tag_dropout", "caption_dropout",
     "masked_loss", "seed", "use_cache", "class_folder", "class_prompt", "caption_choices"],
 "PersonalizeTrainLoRA": ["steps", "learning_rate", "rank", "alpha", "targets", "train_text_encoder", "text_encoder_lr", "dora",
     "batch_size", "grad_accumulation", "optimizer", "lr_scheduler", "warmup_steps", "loss_type", "min_snr_gamma", "noise_offset",
     "max_grad_norm", "precision", "gradient_checkpointing", "seed", "checkpoint_every", "run_name",
     "resume", "initial_lora", "prior_loss_weight", "prior_target"],
 "PersonalizeSaveLoRA": ["name", "save_dtype"],
 "CLIPTextEncode": ["text"], "EmptyLatentImage": ["width", "height", "batch_size"],
 "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
 "VAEDecode": [], "SaveImage": ["filename_prefix"],
 "PersonalizePreviewSettings": ["prompts", "negative_prompt", "every_n_steps", "sample_steps", "cfg", "seed", "width", "height",
     "sampler_name", "scheduler"],
}
sockets_in = {
 "PersonalizeDatasetFromFolder": [("vae", "VAE"), ("clip", "CLIP"), ("class_images", "PERSONALIZE_CLASS_IMAGES")],
 "PersonalizeTrainLoRA": [("model", "MODEL"), ("clip", "CLIP"), ("dataset", "PERSONALIZE_DATASET"),
     ("control", "PERSONALIZE_TRAINING_CONTROL"), ("previews", "PERSONALIZE_PREVIEWS")],
 "PersonalizeSaveLoRA": [("lora", "LORA_MODEL")], "CLIPTextEncode": [("clip", "CLIP")],
 "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
 "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")], "SaveImage": [("images", "IMAGE")],
 "PersonalizePreviewSettings": [("vae", "VAE")],
}
sockets_out = {
 "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
 "PersonalizeDatasetFromFolder": [("dataset", "PERSONALIZE_DATASET")],
 "PersonalizeTrainLoRA": [("model", "MODEL"), ("clip", "CLIP"), ("lora", "LORA_MODEL"), ("loss", "LOSS_MAP"), ("checkpoint", "STRING")],
 "PersonalizeSaveLoRA": [("path", "STRING")], "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
 "EmptyLatentImage": [("LATENT", "LATENT")], "KSampler": [("LATENT", "LATENT")], "VAEDecode": [("IMAGE", "IMAGE")], "SaveImage": [],
 "PersonalizePreviewSettings": [("previews", "PERSONALIZE_PREVIEWS")],
}
pos = {"1": [40, 300], "2": [420, 80], "3": [820, 80], "4": [1260, 60], "5": [1260, 260], "6": [1260, 480], "7": [1260, 700],
       "8": [1680, 260], "9": [2060, 260], "10": [2320, 260], "11": [40, 560]}
links, nodes = [], []
out_links = {}
for nid, node in api.items():
    for name, value in node["inputs"].items():
        if isinstance(value, list):
            links.append([len(links) + 1, int(value[0]), value[1], int(nid), name])
for link in links:
    out_links.setdefault((link[1], link[2]), []).append(link[0])
final_links = []
for order, (nid, node) in enumerate(api.items()):
    cls = node["class_type"]
    ins = []
    for slot, (name, typ) in enumerate(sockets_in.get(cls, [])):
        link = next((lk for lk in links if lk[3] == int(nid) and lk[4] == name), None)
        ins.append({"name": name, "type": typ, "link": link[0] if link else None})
        if link:
            final_links.append([link[0], link[1], link[2], int(nid), slot, typ])
    outs = [{"name": n, "type": t, "links": out_links.get((int(nid), i), []), "slot_index": i} for i, (n, t) in enumerate(sockets_out[cls])]
    wv = ["fixed" if w == "control_after_generate" else node["inputs"][w] for w in widgets[cls]]
    nodes.append({"id": int(nid), "type": cls, "title": titles[nid], "pos": pos[nid], "size": [380, 120 + 26 * len(wv)], "flags": {},
                  "order": order, "mode": 0, "inputs": ins, "outputs": outs,
                  "properties": {"Node name for S&R": cls}, "widgets_values": wv})
final_links.sort()
ui = {"id": "5f0c1d2e-3b8a-4c6f-9d21-7e5a0b1c2d3e", "revision": 0, "last_node_id": len(nodes), "last_link_id": len(final_links),
      "nodes": nodes, "links": final_links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}}, "version": 0.4}
json.dump(ui, open(str(OUT / "personalize_lora.json"), "w"), indent=1)
json.dump(api, open(str(OUT / "personalize_lora_api.json"), "w"), indent=1)
print(len(nodes), len(final_links))


# --- Pivotal tuning example (separate spec): train LoRA + token, save both under one name; and a
# second graph that loads the saved pair with stock nodes only (LoraLoader + embedding:name).
def write_workflow(stem, spec, titles_, widgets_, sockets_in_, sockets_out_, pos_, uid):
    """Write example_workflows/<stem>.json (UI format) and <stem>_api.json from one API-format spec."""
    links_ = []
    for nid, node in spec.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links_.append([len(links_) + 1, int(value[0]), value[1], int(nid), name])
    outgoing = {}
    for link in links_:
        outgoing.setdefault((link[1], link[2]), []).append(link[0])
    ui_nodes, ui_links = [], []
    for order, (nid, node) in enumerate(spec.items()):
        cls = node["class_type"]
        ins = []
        for slot, (name, typ) in enumerate(sockets_in_.get(cls, [])):
            link = next((x for x in links_ if x[3] == int(nid) and x[4] == name), None)
            ins.append({"name": name, "type": typ, "link": link[0] if link else None})
            if link:
                ui_links.append([link[0], link[1], link[2], int(nid), slot, typ])
        outs = [{"name": n, "type": t, "links": outgoing.get((int(nid), i), []), "slot_index": i}
                for i, (n, t) in enumerate(sockets_out_[cls])]
        values = ["fixed" if w == "control_after_generate" else node["inputs"][w] for w in widgets_[cls]]
        ui_nodes.append({"id": int(nid), "type": cls, "title": titles_[nid], "pos": pos_[nid], "size": [380, 120 + 26 * len(values)],
                         "flags": {}, "order": order, "mode": 0, "inputs": ins, "outputs": outs,
                         "properties": {"Node name for S&R": cls}, "widgets_values": values})
    ui_links.sort()
    doc = {"id": uid, "revision": 0, "last_node_id": max(int(n) for n in spec), "last_link_id": len(ui_links), "nodes": ui_nodes,
           "links": ui_links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}}, "version": 0.4}
    json.dump(doc, open(str(OUT / f"{stem}.json"), "w"), indent=1)
    json.dump(spec, open(str(OUT / f"{stem}_api.json"), "w"), indent=1)


def pivotal_examples():
    lora_widgets = widgets["PersonalizeTrainLoRA"]
    shared = lora_widgets[lora_widgets.index("batch_size"):]  # training_inputs(), shared by every training node
    common = {k: v for k, v in api["3"]["inputs"].items()
              if k in shared and k not in ("initial_lora", "prior_loss_weight", "prior_target")}
    token_widgets = ["token", "vectors", "init_word", "captions", "trigger_word"]
    train_widgets = ["steps", "learning_rate", "embedding_lr", "embedding_fraction", "rank", "alpha", "targets",
                     "train_text_encoder", "text_encoder_lr", *token_widgets, *[w for w in shared if w in common],
                     "prior_loss_weight", "prior_target"]
    spec = {
        "1": api["1"], "2": api["2"],
        "3": {"class_type": "PersonalizeTrainPivotal", "inputs": {"model": ["1", 0], "clip": ["1", 1], "dataset": ["2", 0],
              "steps": 1000, "learning_rate": 1e-4, "embedding_lr": 5e-4, "embedding_fraction": 0.5, "rank": 16, "alpha": 16.0,
              "targets": "attention_ff", "train_text_encoder": False, "text_encoder_lr": 5e-05, "token": "<sks-cross>",
              "vectors": 2, "init_word": "cross", "captions": "captions", "trigger_word": "", "prior_loss_weight": 1.0,
              "prior_target": "images", **common, "run_name": "sks_cross_pivotal"}},
        "4": {"class_type": "PersonalizeSavePivotal", "inputs": {"lora": ["3", 2], "embedding": ["3", 3], "name": "personalize/sks_cross_pivotal", "save_dtype": "fp16"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of <sks-cross>, in blue", "clip": ["3", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["3", 1]}},
        "7": api["7"],
        "8": {"class_type": "KSampler", "inputs": {**api["8"]["inputs"], "model": ["3", 0]}},
        "9": api["9"],
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "personalize/sks_cross_pivotal"}},
    }
    titles_ = {**titles, "3": "Personalize Train Pivotal (LoRA + token)", "4": "Personalize Save Pivotal", "5": "Prompt with the token",
               "8": "KSampler (trained LoRA + token)"}
    widgets_ = {**widgets, "PersonalizeTrainPivotal": train_widgets, "PersonalizeSavePivotal": ["name", "save_dtype"],
                "LoraLoader": ["lora_name", "strength_model", "strength_clip"]}
    sockets_in_ = {**sockets_in, "PersonalizeTrainPivotal": sockets_in["PersonalizeTrainLoRA"],
                   "PersonalizeSavePivotal": [("lora", "LORA_MODEL"), ("embedding", "PERSONALIZE_EMBEDDING")],
                   "LoraLoader": [("model", "MODEL"), ("clip", "CLIP")]}
    sockets_out_ = {**sockets_out, "PersonalizeTrainPivotal": [("model", "MODEL"), ("clip", "CLIP"), ("lora", "LORA_MODEL"),
                    ("embedding", "PERSONALIZE_EMBEDDING"), ("loss", "LOSS_MAP"), ("checkpoint", "STRING")],
                    "PersonalizeSavePivotal": [("lora_name", "STRING"), ("prompt_word", "STRING")],
                    "LoraLoader": [("MODEL", "MODEL"), ("CLIP", "CLIP")]}
    write_workflow("personalize_pivotal", spec, titles_, widgets_, sockets_in_, sockets_out_, pos, "7a1e2f30-personalize-pivotal-example")
    load = {
        "1": api["1"],
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "personalize/sks_cross_pivotal.safetensors",
              "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of embedding:personalize/sks_cross_pivotal, in blue", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["2", 1]}},
        "5": api["7"],
        "6": {"class_type": "KSampler", "inputs": {**api["8"]["inputs"], "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
              "latent_image": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "personalize/sks_cross_pivotal_stock"}},
    }
    load_titles = {"1": "Load Checkpoint", "2": "LoraLoader (the saved pivotal LoRA)", "3": "Prompt with embedding:name",
                   "4": "Negative prompt", "5": "Empty Latent Image", "6": "KSampler", "7": "VAE Decode", "8": "Save Image"}
    load_pos = {"1": [40, 200], "2": [420, 200], "3": [820, 80], "4": [820, 320], "5": [820, 560], "6": [1240, 200],
                "7": [1620, 200], "8": [1880, 200]}
    write_workflow("personalize_pivotal_load", load, load_titles, widgets_, sockets_in_, sockets_out_, load_pos,
                   "7a1e2f31-personalize-pivotal-load-example")


pivotal_examples()
