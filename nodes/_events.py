"""Live events to the browser that queued the prompt (custom `personalize.*` websocket messages),
and the in-memory history of recent runs that a reloaded page fetches from `GET /personalize/runs`."""
from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger("comfyui-personalize")

MAX_RUNS = 16
MAX_POINTS = 4096  # per run; beyond it the chart keeps every 2nd, then 4th, ... step
MAX_PREVIEW_ROUNDS = 12


class RunHistory:
    """Recent training runs by (prompt_id, node): loss/LR points, latest previews, checkpoint, status, and the id of
    the workflow that queued them (the frontend's graph id, when the prompt came with one).

    Written from the executor thread, read by the HTTP route on the event loop, hence the lock.
    """

    def __init__(self, max_runs: int = MAX_RUNS):
        self.max_runs = max_runs
        self._runs: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()

    def record(self, event: str, message: dict) -> None:
        key = (message.get("prompt_id"), message.get("node"))
        kind = event.removeprefix("personalize.")
        with self._lock:
            run = self._runs.get(key)
            if run is None or kind == "start":
                self._runs.pop(key, None)
                run = {"prompt_id": key[0], "node": key[1], "workflow": message.get("workflow"), "status": "running",
                       "started": time.time(), "summary": {}, "points": [], "stride": 1, "last": None, "previews": [],
                       "checkpoint": None, "end": None, "error": None, "preview_error": None}
                self._runs[key] = run
                while len(self._runs) > self.max_runs:
                    self._runs.popitem(last=False)
            run["updated"] = time.time()
            if kind == "start":
                run["summary"] = _plain(message)
            elif kind == "step":
                _add_point(run, message)
            elif kind == "preview" and message.get("error"):
                run["preview_error"] = message["error"]
            elif kind == "preview":
                run["previews"] = (run["previews"] + [{"step": message["step"], "images": message["images"]}])[-MAX_PREVIEW_ROUNDS:]
            elif kind == "checkpoint":
                run["checkpoint"] = {k: message.get(k) for k in ("path", "step", "reason")}
                if message.get("reason") == "cancel":
                    run["status"] = "cancelled"
            elif kind == "end":
                run["end"], run["status"] = _plain(message), "finished"
            elif kind == "error":
                run["error"], run["status"] = message.get("message"), "error"

    def runs(self, node: str | None = None, prompt_id: str | None = None, workflow: str | None = None) -> list[dict]:
        """Copies of the recorded runs, newest first, optionally of one node and/or prompt. With `workflow`, only runs
        that workflow queued (node ids repeat across workflows) and runs queued without one (headless)."""
        with self._lock:
            found = [run for run in self._runs.values()
                     if (node is None or str(run["node"]) == str(node))
                     and (prompt_id is None or run["prompt_id"] == prompt_id)
                     and (workflow is None or run["workflow"] in (workflow, None))]
            return copy.deepcopy(found[::-1])


def _plain(message: dict) -> dict:
    return {k: v for k, v in message.items() if k not in ("node", "prompt_id", "workflow")}


def _add_point(run: dict, message: dict) -> None:
    run["last"] = _plain(message)
    step = message["step"]
    if step % run["stride"]:
        return
    run["points"].append([step, message["loss"], message["lr"]])
    if len(run["points"]) > MAX_POINTS:
        run["stride"] *= 2
        run["points"] = [p for p in run["points"] if p[0] % run["stride"] == 0]


HISTORY = RunHistory()


def _prompt_id(instance) -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
        if context is not None and context.prompt_id:
            return context.prompt_id
    except ImportError:
        pass
    return getattr(instance, "last_prompt_id", None)


def _workflow_id(instance, prompt_id: str | None) -> str | None:
    """The id of the frontend workflow that queued `prompt_id` (its extra_pnginfo), from the server's running queue."""
    try:
        running, _ = instance.prompt_queue.get_current_queue_volatile()
        for item in running:
            if item[1] == prompt_id:
                workflow = ((item[3] or {}).get("extra_pnginfo") or {}).get("workflow") or {}
                return str(workflow["id"]) if workflow.get("id") else None
    except (AttributeError, IndexError, TypeError, ValueError):  # no queue (in-process executor) or another layout
        pass
    return None


def websocket_sender(node_id: str | None, history: RunHistory = HISTORY) -> Callable[[str, dict], None]:
    """A `send(event, payload)` for the engine's Reporter, addressed to the queuing client.

    Every event is also recorded in `history`, so a reloaded page (a new client) gets the run back.
    """
    try:
        import server  # ComfyUI's server module; absent when the engine runs headless
        instance = server.PromptServer.instance
    except (ImportError, AttributeError):
        instance = None
    prompt_id = _prompt_id(instance)
    workflow = _workflow_id(instance, prompt_id)

    def send(event: str, payload: dict) -> None:
        message = {"node": node_id, "prompt_id": prompt_id, "workflow": workflow, **payload}
        history.record(event, message)
        if instance is None:
            return
        try:
            instance.send_sync(event, message, getattr(instance, "client_id", None))
        except Exception as exc:  # noqa: BLE001 -- a closed socket must never stop a training run
            log.debug("could not send %s: %s", event, exc)

    return send
