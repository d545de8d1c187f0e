"""The training engine: usable without the HTTP server (imports `comfy` only)."""
