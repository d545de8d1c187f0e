"""Registry of training methods: each registers once by name (no if/elif chains)."""
from __future__ import annotations

from collections.abc import Callable

from .base import Attached, ParamGroup, TrainingMethod

_METHODS: dict[str, Callable[..., TrainingMethod]] = {}


def register_method(name: str):
    """Class decorator: make a method available to jobs as `method=name`."""
    def wrap(cls):
        if name in _METHODS:
            raise ValueError(f"training method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return wrap


def create_method(name: str, options: dict) -> TrainingMethod:
    if name not in _METHODS:
        raise ValueError(f"unknown training method {name!r}; available: {sorted(_METHODS)}")
    return _METHODS[name](**options)


def available_methods() -> list[str]:
    return sorted(_METHODS)


from . import controlnet, dreambooth, hypernetwork, ip_adapter, lora, pivotal, textual_inversion  # noqa: E402,F401,I001  (they register themselves)

__all__ = ["Attached", "ParamGroup", "TrainingMethod", "register_method", "create_method", "available_methods"]
