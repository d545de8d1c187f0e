"""Live training events: per-step loss/LR/speed, validation previews rendered with the current weights
through ComfyUI's sampler, the run history behind `GET /personalize/runs`, and the same events over a plain
websocket of the real server, addressed to the client that queued the prompt."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def live(comfy_runtime):
    class Live:
        previews = comfy_runtime.pack_import("nodes.previews")
        events = comfy_runtime.pack_import("nodes._events")
        routes = comfy_runtime.pack_import("nodes.routes")
    return Live


@pytest.fixture(scope="module")
def data(pack, base, tmp_path_factory):
    from harness import make_sample_dataset
    folder = tmp_path_factory.mktemp("events-data")
    make_sample_dataset(folder, n=4, size=64, seed=3, subject="sks")
    _, clip, vae = base
    with torch.inference_mode():
        spec = pack.build.DatasetSpec(folder=str(folder), resolution=64, buckets=False, use_cache=False)
        return pack.build.build_training_data(spec, vae, clip)[0]


def _train_lora(pack, base, data, tmp_path, reporter, steps=4):
    model, clip, _ = base
    options = {"rank": 4, "alpha": 4.0, "targets": "attention"}
    job = pack.job.TrainJob(method="lora", steps=steps, batch_size=2, learning_rate=2e-2, seed=4, precision="fp32",
                            method_options=options)
    method = pack.methods.create_method("lora", options)
    with torch.inference_mode():
        return pack.loop.train(job, method, model, clip, data, checkpoint_dir=tmp_path, reporter=reporter)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_previews_show_current_weights_and_do_not_change_training(pack, live, base, data, tmp_path, comfy_runtime):
    """Every 2nd step one image per prompt is sampled with the trained clone; the loss curve is the same with
    previews and without (sampling leaves the training RNG alone)."""
    _, _, vae = base
    sent = []
    settings = live.previews.PreviewSettings(vae, ["a photo of sks cross", "sks cross on a beach"], every_n_steps=2,
                                             sample_steps=2, cfg=1.0, seed=9, width=64, height=64)
    reporter = live.previews.PreviewReporter(4, lambda event, payload: sent.append((event, payload)), settings, "ev/run")
    with_previews = _train_lora(pack, base, data, tmp_path / "a", reporter)
    # A preview that fails (here: no VAE) is reported once and turned off; training goes on unchanged.
    broken_sent = []
    broken = live.previews.PreviewReporter(4, lambda event, payload: broken_sent.append((event, payload)),
                                           live.previews.PreviewSettings(None, ["x"], every_n_steps=1), "ev/broken")
    with_broken_previews = _train_lora(pack, base, data, tmp_path / "b", broken)
    assert with_previews.loss_history == with_broken_previews.loss_history
    failed = [p for e, p in broken_sent if e == "personalize.preview"]
    assert len(failed) == 1 and failed[0]["images"] == [] and "spacial_compression_encode" in failed[0]["error"]
    assert broken_sent[-1][0] == "personalize.end"

    kinds = [event for event, _ in sent]
    assert kinds[0] == "personalize.start" and kinds[-1] == "personalize.end"
    steps = [p for e, p in sent if e == "personalize.step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["total"] == 4 and s["lr"] > 0 for s in steps)
    previews = [p for e, p in sent if e == "personalize.preview"]
    assert [p["step"] for p in previews] == [2, 4]
    temp = Path(comfy_runtime.folder_paths.get_temp_directory())
    files = [[temp / ref["subfolder"] / ref["filename"] for ref in p["images"]] for p in previews]
    assert all(len(round_) == 2 and all(f.is_file() for f in round_) for round_ in files)
    assert Image.open(files[0][0]).size == (64, 64)
    assert [ref["prompt"] for ref in previews[0]["images"]] == settings.prompts
    # Same seed and prompt in both rounds: the picture changes only because the weights did.
    assert np.abs(_pixels(files[0][0]) - _pixels(files[1][0])).mean() > 0.5
    assert np.abs(_pixels(files[1][0]) - _pixels(files[1][1])).mean() > 0.5  # and the prompt matters


def test_time_spent_on_previews_is_not_counted_as_training_speed(pack):
    reporter = pack.progress.Reporter(10)
    reporter.timing(1)
    time.sleep(0.3)
    reporter.exclude(0.3)
    rate, eta = reporter.timing(2)
    assert rate > 20 and eta < 1.0


def test_preview_settings_refuse_bad_inputs(live, base):
    _, _, vae = base
    with pytest.raises(ValueError, match="`prompts` is empty"):
        live.previews.PreviewSettings(vae, [])
    with pytest.raises(ValueError, match="`width`"):
        live.previews.PreviewSettings(vae, ["x"], width=100)
    with pytest.raises(ValueError, match="`prompts` has 9"):
        live.previews.PreviewSettings(vae, ["x"] * 9)


def test_run_history_keeps_recent_runs_with_their_status(live, monkeypatch):
    monkeypatch.setattr(live.events, "MAX_POINTS", 8)
    history = live.events.RunHistory(max_runs=2)

    def send(prompt, event, **payload):
        history.record(f"personalize.{event}", {"prompt_id": prompt, "node": "3", **payload})

    send("p1", "start", steps=20)
    for step in range(1, 21):
        send("p1", "step", step=step, total=20, loss=1.0 / step, lr=1e-4, it_per_s=2.0, eta_s=1.0)
    send("p1", "preview", step=10, images=[{"filename": "a.png"}])
    send("p1", "preview", step=12, images=[], error="boom")
    send("p1", "checkpoint", path="/x/interrupted.pt", step=20, reason="cancel")
    (run,) = history.runs(prompt_id="p1")
    assert run["status"] == "cancelled" and run["checkpoint"]["path"] == "/x/interrupted.pt"
    assert len(run["points"]) <= 8 and run["points"][-1][0] == 20 and run["last"]["step"] == 20
    assert run["previews"] == [{"step": 10, "images": [{"filename": "a.png"}]}] and run["preview_error"] == "boom"
    send("p2", "start", steps=1)
    send("p2", "error", message="`resume` 'x': no such checkpoint")
    send("p3", "start", steps=1)
    send("p3", "end", final_loss=0.1)
    assert [r["prompt_id"] for r in history.runs(node="3")] == ["p3", "p2"]  # newest first, at most 2
    assert history.runs(prompt_id="p2")[0]["status"] == "error"
    assert history.runs(prompt_id="p3")[0]["status"] == "finished"
    assert history.runs(node="4") == []


def test_run_history_tells_workflows_apart(live):
    """Node ids repeat across workflows: asked for one workflow, the history gives its runs and headless ones (no
    workflow to tell them apart), never another workflow's run of the same node id."""
    history = live.events.RunHistory()
    for prompt, workflow in (("a", "wf-A"), ("b", "wf-B"), ("headless", None)):
        history.record("personalize.start", {"prompt_id": prompt, "node": "3", "workflow": workflow, "steps": 1})
    assert [r["prompt_id"] for r in history.runs(node="3", workflow="wf-A")] == ["headless", "a"]
    assert [r["prompt_id"] for r in history.runs(node="3", workflow="wf-B")] == ["headless", "b"]
    assert len(history.runs(node="3")) == 3
    assert "workflow" not in history.runs(prompt_id="a")[0]["summary"]


def test_history_route_is_registered_on_the_runtimes_server(live, comfy_runtime):
    """The pack adds its route at import; the in-process stub server still boots and lists it."""
    assert live.routes.register() is True  # idempotent: a second import adds nothing
    assert len([r for r in comfy_runtime.stub.routes if getattr(r, "path", None) == live.routes.RUNS_PATH]) == 1


# -- the real server, over a plain websocket ---------------------------------------------------------------


def preview_prompt(ckpt: str, folder, *, steps: int, every: int, run_name: str) -> dict:
    """The example LoRA graph at tiny sizes, with its preview node rendering 64 px images in 2 sampler steps."""
    from workflows import lora_prompt
    prompt = lora_prompt(ckpt, folder, steps=steps, run_name=run_name, save_name=f"personalize/{run_name}")
    previews = next(node for node in prompt.values() if node["class_type"] == "PersonalizePreviewSettings")
    previews["inputs"].update(every_n_steps=every, sample_steps=2, cfg=1.0, width=64, height=64)
    return prompt


@pytest.fixture(scope="module")
def server_data(tmp_path_factory):
    from harness import make_sample_dataset
    folder = tmp_path_factory.mktemp("events-http")
    make_sample_dataset(folder, n=4, size=64, seed=1, subject="sks")
    return folder


@pytest.mark.server
@pytest.mark.slow
def test_events_reach_the_queuing_client_and_the_history_route(comfy_server, tiny_checkpoint, server_data):
    prompt_id = comfy_server.queue(preview_prompt(tiny_checkpoint, server_data, steps=4, every=2, run_name="ws_events"))
    comfy_server.wait(prompt_id, timeout=300)
    steps = [e["data"] for e in comfy_server.events_for(prompt_id, "personalize.step")]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(s["loss"]) and s["lr"] > 0 and s["total"] == 4 and s["it_per_s"] >= 0 for s in steps)
    assert steps[-1]["it_per_s"] > 0 and steps[-1]["eta_s"] == 0
    previews = [e["data"] for e in comfy_server.events_for(prompt_id, "personalize.preview")]
    assert [p["step"] for p in previews] == [2, 4]
    ref = previews[-1]["images"][0]
    image = comfy_server.get("/view", params={k: ref[k] for k in ("filename", "subfolder", "type")})
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    (end,) = comfy_server.events_for(prompt_id, "personalize.end")
    assert end["data"]["checkpoint"].endswith("final.pt") and np.isfinite(end["data"]["final_loss"])

    runs = comfy_server.get("/personalize/runs", params={"prompt_id": prompt_id}).json()["runs"]
    assert len(runs) == 1 and runs[0]["status"] == "finished" and runs[0]["node"] == "3"
    assert [p[0] for p in runs[0]["points"]] == [1, 2, 3, 4]
    assert [p["step"] for p in runs[0]["previews"]] == [2, 4]
    assert comfy_server.get("/api/personalize/runs").status_code == 200  # the frontend's api.fetchApi prefix


@pytest.mark.server
@pytest.mark.slow
def test_a_run_records_the_workflow_that_queued_it(comfy_server, tiny_checkpoint, server_data):
    """The frontend sends its workflow (with the graph's id) in extra_pnginfo: the run carries that id in its events
    and in the history, so a page showing another workflow with the same node ids does not take the run as its own."""
    prompt = preview_prompt(tiny_checkpoint, server_data, steps=1, every=0, run_name="ws_workflow")
    prompt_id = comfy_server.queue(prompt, extra_data={"extra_pnginfo": {"workflow": {"id": "wf-queued", "nodes": []}}})
    comfy_server.wait(prompt_id, timeout=300)
    (start,) = comfy_server.events_for(prompt_id, "personalize.start")
    assert start["data"]["workflow"] == "wf-queued"
    node = start["data"]["node"]
    mine = comfy_server.get("/personalize/runs", params={"node": node, "workflow": "wf-queued"}).json()["runs"]
    other = comfy_server.get("/personalize/runs", params={"node": node, "workflow": "wf-other"}).json()["runs"]
    assert prompt_id in [r["prompt_id"] for r in mine] and mine[0]["workflow"] == "wf-queued"
    assert prompt_id not in [r["prompt_id"] for r in other]


@pytest.mark.server
@pytest.mark.slow
def test_events_of_another_clients_prompt_are_not_sent_here(comfy_server, tiny_checkpoint, server_data):
    prompt = preview_prompt(tiny_checkpoint, server_data, steps=2, every=0, run_name="ws_other")
    prompt_id = comfy_server.queue(prompt, client_id="someone-else")
    deadline = time.monotonic() + 300
    while not comfy_server.history(prompt_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert comfy_server.history(prompt_id)["status"]["status_str"] == "success"
    assert not comfy_server.events_for(prompt_id, "personalize.step")
    (run,) = comfy_server.get("/personalize/runs", params={"prompt_id": prompt_id}).json()["runs"]
    assert [p[0] for p in run["points"]] == [1, 2] and run["previews"] == []


@pytest.mark.server
@pytest.mark.slow
def test_a_bad_input_is_reported_on_the_node(comfy_server, tiny_checkpoint, server_data):
    prompt = preview_prompt(tiny_checkpoint, server_data, steps=2, every=0, run_name="ws_bad")
    prompt["3"]["inputs"]["resume"] = "no/such/checkpoint.pt"
    prompt_id = comfy_server.queue(prompt)
    comfy_server.wait(prompt_id, timeout=300, check=False)
    (error,) = comfy_server.events_for(prompt_id, "personalize.error")
    assert "`resume`" in error["data"]["message"] and error["data"]["node"] == "3"
    (run,) = comfy_server.get("/personalize/runs", params={"prompt_id": prompt_id}).json()["runs"]
    assert run["status"] == "error" and "`resume`" in run["error"]
