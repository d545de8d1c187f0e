"""ComfyUI-Personalize: train and apply personalization adapters inside ComfyUI."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI's loader calls this (we export no NODE_CLASS_MAPPINGS)."""
    from .nodes import PersonalizeExtension

    return PersonalizeExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
