"""The one place the pack imports ComfyUI's node API, so its version can be pinned here."""
from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401
