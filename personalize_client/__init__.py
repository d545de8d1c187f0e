"""Headless client for ComfyUI servers (standard library + requests + websocket-client; no torch, no comfy).

`python -m personalize_client run WORKFLOW.json --server URL` converts a UI-format workflow with the
server's /object_info, queues it, shows progress and loss from /ws, downloads the outputs, and exits
non-zero with the failing node's message.
"""
from .convert import WorkflowError, apply_override, is_api_format, is_ui_format, ui_to_api

__all__ = ["WorkflowError", "apply_override", "is_api_format", "is_ui_format", "ui_to_api"]
