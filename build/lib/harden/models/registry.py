"""One registry of architectures harden can rebuild as trainable `nn.Module`s.

Like timm's registry: each architecture is a small factory function registered by
name; `create_model(name, num_classes=..., **kwargs)` builds it. Models that harden
writes record `(arch, arch_kwargs)` in their MLflow metadata so that they can be
rebuilt and fine-tuned later; anything else still loads as a forward-only module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from harden.errors import HardenError

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ArchInfo:
    name: str
    factory: Factory
    description: str
    default_input: tuple[int, int, int]


_REGISTRY: dict[str, ArchInfo] = {}


def register_arch(name: str, *, default_input: tuple[int, int, int], description: str = "") -> Callable[[Factory], Factory]:
    """Decorator: add a factory `f(num_classes, **kwargs) -> nn.Module` under `name`."""

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        doc = description or (factory.__doc__ or "").strip().splitlines()[0]
        _REGISTRY[name] = ArchInfo(name, factory, doc, default_input)
        return factory

    return decorate


def list_archs() -> list[ArchInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_arch(name: str) -> ArchInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise HardenError(f"unknown architecture {name!r}; known: {known}") from None


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a fresh (randomly initialised) model of a registered architecture."""
    return get_arch(name).factory(num_classes=num_classes, **kwargs)
