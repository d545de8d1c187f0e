"""The live training view in a real browser: headless Debian Chromium (Playwright) against the real
`main.py --cpu` server. Loads the example workflow through the UI, queues it, watches the chart gain
points and a preview appear, reloads the page (history comes back), and cancels (the run stops and the
widget names the resumable checkpoint). Screenshots go to output/tests/web_ui/ (or $PERSONALIZE_TEST_OUTPUT)."""
import json
import os
import time
from pathlib import Path

import pytest
from workflows import LORA_API, LORA_UI

pytestmark = [pytest.mark.server, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SHOTS = Path(os.environ.get("PERSONALIZE_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "output" / "tests")) / "web_ui"
LIVE = ".personalize-live"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is not installed (scripts/bootstrap.sh installs it)")
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{CHROMIUM} is missing: scripts/bootstrap.sh installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def _wait_app(page, timeout_ms=90_000):
    page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.extensionManager",
                           timeout=timeout_ms)
    page.wait_for_function("() => window.comfyAPI.app.app.extensions?.some(e => e.name === 'Personalize.LiveTraining')",
                           timeout=timeout_ms)
    _wait_graph_settled(page)
    page.keyboard.press("Escape")  # close a first-run dialog, if any


def _wait_graph_settled(page, timeout=30.0, quiet=2.0):
    """Wait until the frontend's own start-up workflow load is over: the graph's nodes (none on a first visit)
    unchanged for `quiet` seconds (`networkidle` never comes while a run sends previews)."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        nodes = page.evaluate("() => window.comfyAPI.app.app.graph.nodes.map((n) => `${n.id}:${n.type}`).join(',')")
        if nodes != last:
            last, since = nodes, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.2)


def _load_example(page, values: dict) -> dict:
    """Load the example workflow as a user would (app.loadGraphData), then set widget values by node id.
    Returns the API prompt the frontend made of the workflow as loaded (`app.graphToPrompt`)."""
    workflow = json.loads(LORA_UI.read_text())
    return page.evaluate("""async ([workflow, values]) => {
        const app = window.comfyAPI.app.app;
        for (let attempt = 0; app.graph.getNodeById(3)?.type !== "PersonalizeTrainLoRA"; attempt++) {
            if (attempt === 5) throw new Error("the example workflow did not stay loaded");
            await app.loadGraphData(workflow);
            await new Promise((resolve) => setTimeout(resolve, 500 * attempt));
        }
        const asLoaded = (await app.graphToPrompt()).output;
        for (const [id, widgets] of Object.entries(values)) {
            const node = app.graph.getNodeById(Number(id));
            for (const [name, value] of Object.entries(widgets)) {
                const widget = node.widgets.find((w) => w.name === name);
                if (!widget) throw new Error(`node ${id} has no widget ${name}`);
                widget.value = value;
            }
        }
        app.canvas.ds.scale = 1;  // the training node's live view at full size, in the viewport
        app.canvas.ds.offset = [-760, -60];
        app.canvas.setDirty(true, true);
        return asLoaded;
    }""", [workflow, values])


def _live(page) -> dict:
    return page.evaluate(f"""() => {{
        const el = document.querySelector('{LIVE}');
        if (!el) return null;
        const imgs = [...el.querySelectorAll('img.pl-preview')];
        return {{...el.dataset, note: el.querySelector('.pl-note').textContent,
                 status_text: el.querySelector('.pl-status').textContent,
                 images: imgs.map((img) => ({{src: img.src, loaded: img.complete && img.naturalWidth > 0}}))}};
    }}""")


def _wait_live(page, predicate, timeout=120.0, what="the live view"):
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = _live(page)
        if state and predicate(state):
            return state
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not get there in {timeout:.0f} s; last state: {state}")


def test_live_view_chart_previews_reload_and_cancel(browser, comfy_server, tiny_checkpoint, tmp_path):
    from harness import make_sample_dataset
    folder = tmp_path / "browser-data"
    make_sample_dataset(folder, n=4, size=64, seed=5, subject="sks")
    values = {
        1: {"ckpt_name": tiny_checkpoint},
        2: {"folder": str(folder), "resolution": 64, "bucket_step": 32},
        3: {"steps": 400, "rank": 4, "alpha": 4.0, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 0,
            "run_name": "browser"},
        7: {"width": 64, "height": 64},
        8: {"steps": 2, "cfg": 1.0},
        11: {"every_n_steps": 3, "sample_steps": 2, "cfg": 1.0, "width": 64, "height": 64},
    }
    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    errors = []
    page.on("pageerror", lambda error: errors.append(f"{error}\n{getattr(error, 'stack', '')}"))
    page.goto(comfy_server.url)
    _wait_app(page)
    as_loaded = _load_example(page, values)
    # The frontend reads every widget value of the example where the API twin has it (seed controls included).
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in as_loaded.items()} == json.loads(LORA_API.read_text())
    # The session's server may hold an earlier, finished run of a headless graph's node 3 (the view restores runs
    # queued without a workflow, and may do so only now): the new run is the running one with another prompt id.
    earlier = _live(page)
    assert earlier["status"] != "running", earlier
    page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")

    state = _wait_live(page, lambda s: s["promptId"] != earlier["promptId"] and s["status"] == "running"
                       and int(s["points"]) >= 3, what="the loss chart")
    assert "loss" in state["status_text"] and "/400" in state["status_text"]
    page.locator(LIVE).screenshot(path=str(SHOTS / "1_chart.png"))
    state = _wait_live(page, lambda s: s["images"] and all(i["loaded"] for i in s["images"]), what="a preview image")
    assert "subfolder=personalize%2Fpreviews" in state["images"][0]["src"]
    page.locator(LIVE).screenshot(path=str(SHOTS / "2_preview.png"))
    prompt_id, points_before = state["promptId"], int(state["points"])

    page.reload()
    _wait_app(page)
    if _live(page) is None:  # the frontend did not restore the open workflow: load it again
        _load_example(page, values)
    state = _wait_live(page, lambda s: s["promptId"] == prompt_id and int(s["points"]) >= points_before,
                       what="the history after a reload")
    state = _wait_live(page, lambda s: int(s["points"]) > points_before + 1 and s["images"], what="live steps after a reload")
    page.screenshot(path=str(SHOTS / "3_after_reload.png"))

    page.locator(f"{LIVE} button.pl-cancel").click()
    state = _wait_live(page, lambda s: s["status"] == "cancelled", what="the cancel")
    assert "Resumable checkpoint:" in state["note"], state
    checkpoint = Path(state["note"].split("Resumable checkpoint:")[1].strip())
    assert checkpoint.is_file() and checkpoint.name.startswith("interrupted_step_")
    page.locator(LIVE).screenshot(path=str(SHOTS / "4_cancelled.png"))
    stopped_at = int(state["step"])
    assert 1 <= stopped_at < 400 and f"Cancelled at step {stopped_at}." in state["note"]  # the chart has every done step
    time.sleep(1.5)
    assert not comfy_server.queue_state()["queue_running"]
    (run,) = comfy_server.get("/personalize/runs", params={"prompt_id": prompt_id}).json()["runs"]
    assert run["status"] == "cancelled" and run["points"][-1][0] == stopped_at  # no step after the cancel

    page.locator(f"{LIVE} button.pl-resume").click()  # the checkpoint goes into `resume`
    resume = page.evaluate("() => window.comfyAPI.app.app.graph.getNodeById(3).widgets.find(w => w.name === 'resume').value")
    assert resume == str(checkpoint)

    # A second run right after: its bad input (fewer steps than the checkpoint it resumes) shows on the node.
    page.evaluate("""() => { const node = window.comfyAPI.app.app.graph.getNodeById(3);
        node.widgets.find(w => w.name === 'steps').value = 2; }""")
    page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")
    state = _wait_live(page, lambda s: s["status"] == "error" and s["promptId"] != prompt_id, what="the error on the node")
    assert "`steps`=2" in state["note"] and int(state["points"]) == 0, state
    page.locator(LIVE).screenshot(path=str(SHOTS / "5_error.png"))

    # Another workflow with the same node ids (the example saved under a new id): its node 3 shows none of the runs
    # above, which belong to the example's workflow.
    ours_runs = {prompt_id, state["promptId"]}
    other_id = "0b6c54f3-2f4e-4d8a-9a51-3c1d2e7f8a90"
    page.evaluate("""async ([workflow, id]) => {
        await window.comfyAPI.app.app.loadGraphData({...workflow, id}); }""", [json.loads(LORA_UI.read_text()), other_id])
    _wait_graph_settled(page)
    assert page.evaluate("() => window.comfyAPI.app.app.graph.id") == other_id
    state = _wait_live(page, lambda s: int(s.get("restored", 0)) >= 1, what="the new view's history request")
    assert state["promptId"] not in ours_runs and state["status"] != "running", state

    ours = [e for e in errors if "live_training" in e or "live_chart" in e]  # the frontend has a few of its own
    assert not ours, ours
    page.close()
