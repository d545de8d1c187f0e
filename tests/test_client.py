"""The headless client (`python -m personalize_client`) against a real ComfyUI server."""
from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time

import pytest

from harness import REPO_ROOT, make_sample_dataset
from personalize_client import convert
from personalize_client.convert import WorkflowError, apply_override, ui_to_api

pytestmark = [pytest.mark.server, pytest.mark.slow]

EXAMPLES = REPO_ROOT / "example_workflows"
LORA_UI = EXAMPLES / "personalize_lora.json"


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personalize_client", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def tiny_sets(ckpt: str, folder, steps: int, run_name: str, titles: bool = True) -> list[str]:
    """--set flags that shrink the example LoRA workflow to the tiny test model (nodes by id, class and title)."""
    sets = {"1.ckpt_name": ckpt, "2.folder": str(folder), "2.resolution": 64, "2.bucket_step": 32,
            "PersonalizeTrainLoRA.steps": steps, "3.rank": 4, "3.alpha": 4.0, "3.batch_size": 2,
            "3.learning_rate": 1e-3, "3.run_name": run_name, "3.checkpoint_every": 0, "4.name": f"personalize/{run_name}",
            "7.width": 64, "7.height": 64, ("KSampler (trained LoRA).steps" if titles else "KSampler.steps"): 2, "8.cfg": 1.0,
            "10.filename_prefix": f"personalize/{run_name}"}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client-data")
    make_sample_dataset(folder, n=4, size=64, seed=0, subject="sks")
    return folder


@pytest.mark.parametrize("ui_path", sorted(p for p in EXAMPLES.glob("*.json") if not p.stem.endswith("_api")),
                         ids=lambda p: p.name)
def test_example_workflows_convert_to_their_api_twins(object_info, ui_path):
    twin = ui_path.with_name(ui_path.stem + "_api.json")
    if not twin.exists():
        pytest.skip(f"{ui_path.name} has no API twin")
    assert ui_to_api(json.loads(ui_path.read_text()), object_info) == json.loads(twin.read_text())


def test_seed_inputs_with_and_without_their_control_value(object_info):
    """The frontend gives every INT named seed a control widget (legacy rule) unless its spec says otherwise;
    workflows written with and without that value both convert (the count decides). The pack's seeds say
    control_after_generate=False (a re-queue must keep a training seed); the legacy rule is checked on a copy of
    their schema without the key, as an older version of the pack had it."""
    info = copy.deepcopy(object_info)
    for node_type in ("PersonalizeTrainLoRA", "PersonalizeDatasetFromFolder"):
        options = convert._options(dict(convert._input_specs(info[node_type]))["seed"])
        assert options.pop("control_after_generate") is False
    ui = json.loads(LORA_UI.read_text())
    toggled = 0
    for node in ui["nodes"]:
        specs = convert._input_specs(info.get(node["type"], {}))
        names = [n for n, _ in specs]
        if "seed" not in names or "control_after_generate" in convert._options(dict(specs)["seed"]):
            continue
        position = sum(convert._value_slots(n, sp, False) for n, sp in specs[:names.index("seed") + 1])
        values = node["widgets_values"]
        if len(values) == sum(convert._value_slots(n, sp, True) for n, sp in specs):
            del values[position]
        else:
            values.insert(position, "randomize")
        toggled += 1
    assert toggled >= 2
    assert ui_to_api(ui, info) == json.loads((EXAMPLES / "personalize_lora_api.json").read_text())


def _link(links, origin, slot, target, target_slot, kind):
    links.append([len(links) + 1, origin, slot, target, target_slot, kind])
    return len(links)


def test_reroute_primitive_bypass_mute_and_converted_widgets(object_info):
    links: list = []
    clip_to_reroute = _link(links, 1, 1, 10, 0, "CLIP")
    reroute_to_text = _link(links, 10, 0, 2, 0, "CLIP")
    clip_to_neg = _link(links, 1, 1, 3, 0, "CLIP")
    model_to_bypassed = _link(links, 1, 0, 12, 0, "MODEL")
    bypassed_to_sampler = _link(links, 12, 0, 5, 0, "MODEL")
    pos, neg = _link(links, 2, 0, 5, 1, "CONDITIONING"), _link(links, 3, 0, 5, 2, "CONDITIONING")
    latent = _link(links, 4, 0, 5, 3, "LATENT")
    seed = _link(links, 11, 0, 5, 4, "INT")
    decode, vae = _link(links, 5, 0, 6, 0, "LATENT"), _link(links, 1, 2, 6, 1, "VAE")
    save, muted = _link(links, 6, 0, 7, 0, "IMAGE"), _link(links, 6, 0, 13, 0, "IMAGE")
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [], "widgets_values": ["tiny.safetensors"]},
        {"id": 2, "type": "CLIPTextEncode", "inputs": [{"name": "clip", "type": "CLIP", "link": reroute_to_text}], "widgets_values": ["a sks cross"]},
        {"id": 3, "type": "CLIPTextEncode", "inputs": [{"name": "clip", "type": "CLIP", "link": clip_to_neg},
                                                       {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": None}],
         "widgets_values": ["blurry"]},
        {"id": 4, "type": "EmptyLatentImage", "inputs": [], "widgets_values": [64, 64, 1]},
        {"id": 5, "type": "KSampler", "inputs": [
            {"name": "model", "type": "MODEL", "link": bypassed_to_sampler}, {"name": "positive", "type": "CONDITIONING", "link": pos},
            {"name": "negative", "type": "CONDITIONING", "link": neg}, {"name": "latent_image", "type": "LATENT", "link": latent},
            {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": seed}],
         "widgets_values": [7, "randomize", 3, 1.5, "euler", "normal", 1.0]},
        {"id": 6, "type": "VAEDecode", "inputs": [{"name": "samples", "type": "LATENT", "link": decode}, {"name": "vae", "type": "VAE", "link": vae}]},
        {"id": 7, "type": "SaveImage", "inputs": [{"name": "images", "type": "IMAGE", "link": save}], "widgets_values": ["out"]},
        {"id": 10, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": clip_to_reroute}]},
        {"id": 11, "type": "PrimitiveNode", "inputs": [], "widgets_values": [1234, "fixed"]},
        {"id": 12, "type": "LoraLoaderModelOnly", "mode": 4, "inputs": [{"name": "model", "type": "MODEL", "link": model_to_bypassed}],
         "widgets_values": ["missing.safetensors", 1.0]},
        {"id": 13, "type": "PreviewImage", "mode": 2, "inputs": [{"name": "images", "type": "IMAGE", "link": muted}]},
        {"id": 14, "type": "Note", "inputs": [], "widgets_values": ["a note"]},
    ]
    prompt = ui_to_api({"nodes": nodes, "links": links}, object_info)
    assert sorted(prompt, key=int) == ["1", "2", "3", "4", "5", "6", "7"]
    assert prompt["2"]["inputs"] == {"text": "a sks cross", "clip": ["1", 1]}
    assert prompt["3"]["inputs"] == {"text": "blurry", "clip": ["1", 1]}
    assert prompt["5"]["inputs"] == {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                                     "seed": 1234, "steps": 3, "cfg": 1.5, "sampler_name": "euler", "scheduler": "normal",
                                     "denoise": 1.0}
    with pytest.raises(WorkflowError, match="several nodes"):
        apply_override(prompt, "text", "x", {}, object_info)
    with pytest.raises(WorkflowError, match="connected"):
        apply_override(prompt, "5.model", 3, {}, object_info)
    nodes[0]["type"] = "NotInstalledLoader"
    with pytest.raises(WorkflowError, match="not installed"):
        ui_to_api({"nodes": nodes, "links": links}, object_info)


def test_the_client_imports_neither_torch_nor_comfy():
    code = ("import sys, personalize_client.__main__; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'comfy', 'nodes', 'folder_paths')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_run_ui_workflow_with_progress_loss_and_downloads(comfy_server, tiny_checkpoint, dataset, tmp_path):
    done = cli("run", LORA_UI, "--server", comfy_server.url, "--out", tmp_path, *tiny_sets(tiny_checkpoint, dataset, 4, "client_ok"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4/4" in done.stderr and "loss" in done.stderr  # the progress bar with the loss
    assert "saved personalize/client_ok" in done.stdout  # Save LoRA's text output
    images = sorted(tmp_path.rglob("*.png"))
    assert len(images) == 1, done.stdout
    served = comfy_server.base_dir / "output" / "personalize" / images[0].name
    assert images[0].read_bytes() == served.read_bytes()


def test_a_node_error_exits_non_zero_with_the_message(comfy_server, tiny_checkpoint, tmp_path):
    """Here with the API-format twin of the example workflow."""
    done = cli("run", EXAMPLES / "personalize_lora_api.json", "--server", comfy_server.url, "--out", tmp_path,
               *tiny_sets(tiny_checkpoint, tmp_path / "missing", 2, "client_err", titles=False))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "node 2 (PersonalizeDatasetFromFolder)" in done.stderr and "`folder`" in done.stderr


def test_bad_overrides_are_usage_errors(comfy_server, tiny_checkpoint, dataset):
    done = cli("run", LORA_UI, "--server", comfy_server.url, "--set", "99.steps=3")
    assert done.returncode == 2 and "no node `99`" in done.stderr
    done = cli("run", LORA_UI, "--server", comfy_server.url, "--set", "3.not_an_input=3")
    assert done.returncode == 2 and "has no input `not_an_input`" in done.stderr


def test_ctrl_c_interrupts_the_prompt_on_the_server(comfy_server, tiny_checkpoint, dataset, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "personalize_client", "run", str(LORA_UI), "--server", comfy_server.url,
                             "--out", str(tmp_path), *tiny_sets(tiny_checkpoint, dataset, 500, "client_cancel")],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as from a terminal: a suite started in the background (`&`) passes SIGINT on ignored,
                            # and Python then never raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline, seen = time.monotonic() + 240, []
        for line in proc.stderr:
            seen.append(line)
            if "loss" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(seen) + err
    history = comfy_server.history()  # the client waited for the server to stop the prompt
    assert history, "".join(seen) + err
    entry = max(history.values(), key=lambda e: e["prompt"][0])
    assert entry["prompt"][2]["3"]["inputs"]["run_name"] == "client_cancel"
    assert any(event == "execution_interrupted" for event, _ in entry["status"]["messages"])
    assert comfy_server.alive


def test_sweep_over_servers_writes_a_results_table(comfy_server, tiny_checkpoint, dataset, tmp_path):
    done = cli("run", LORA_UI, "--servers", f"{comfy_server.url},{comfy_server.url}", "--out", tmp_path,
               *tiny_sets(tiny_checkpoint, dataset, 2, "client_sweep"), "--sweep", "learning_rate=1e-3,2e-3", "--sweep", "rank=2")
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["params"] for r in results] == [{"learning_rate": 1e-3, "rank": 2}, {"learning_rate": 2e-3, "rank": 2}]
    assert all(r["status"] == "success" and r["final_loss"] > 0 and r["files"] for r in results)
    assert "final_loss" in done.stdout and "learning_rate=0.002" in done.stdout
    assert (tmp_path / "results.csv").is_file()
