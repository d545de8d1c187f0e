"""HTTP routes of the pack: the recent training runs, for a page that reloads mid-run."""
from __future__ import annotations

import logging

from ._events import HISTORY, RunHistory

log = logging.getLogger("comfyui-personalize")

RUNS_PATH = "/personalize/runs"
_registered: set[int] = set()


def runs_response(query, history: RunHistory = HISTORY) -> dict:
    """`{"runs": [...]}` newest first; `?node=<id>`, `?prompt_id=<id>` and `?workflow=<graph id>` filter."""
    return {"runs": history.runs(node=query.get("node") or None, prompt_id=query.get("prompt_id") or None,
                                 workflow=query.get("workflow") or None)}


def register(routes=None) -> bool:
    """Add the routes to ComfyUI's route table once (before the server builds its app).

    Returns False where there is no server (headless engine use).
    """
    if routes is None:
        try:
            import server
            routes = server.PromptServer.instance.routes
        except (ImportError, AttributeError):
            return False
    if id(routes) in _registered:
        return True
    from aiohttp import web

    @routes.get(RUNS_PATH)
    async def get_runs(request):
        return web.json_response(runs_response(request.rel_url.query))

    _registered.add(id(routes))
    log.debug("registered %s", RUNS_PATH)
    return True
