"""Live events to the browser that queued the prompt (custom `personalize.*` websocket messages)."""
from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("comfyui-personalize")


def websocket_sender(node_id: str | None) -> Callable[[str, dict], None]:
    """A `send(event, payload)` for the engine's Reporter, addressed to the queuing client."""
    try:
        import server  # ComfyUI's server module; absent when the engine runs headless
        instance = server.PromptServer.instance
    except (ImportError, AttributeError):
        return lambda event, payload: None

    def send(event: str, payload: dict) -> None:
        message = {"node": node_id, "prompt_id": getattr(instance, "last_prompt_id", None), **payload}
        try:
            instance.send_sync(event, message, getattr(instance, "client_id", None))
        except Exception as exc:  # a closed socket must never stop a training run
            log.debug("could not send %s: %s", event, exc)

    return send
