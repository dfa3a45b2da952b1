"""Provider registry: provider type name → implementation and its config schema."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ProviderError
from .base import CommandResult, FileChunk, InstanceSpec, PortForward, Provider, Transport

if TYPE_CHECKING:
    from ..config import Config, Field

# type name -> module holding a Provider subclass and CONFIG_FIELDS
PROVIDER_TYPES: dict[str, str] = {"local": "backends.providers.local"}


def provider_schema(ptype: str) -> "dict[str, Field] | None":
    if ptype not in PROVIDER_TYPES:
        return None
    import importlib

    return importlib.import_module(PROVIDER_TYPES[ptype]).CONFIG_FIELDS


def build_providers(config: "Config") -> dict[str, Provider]:
    """One Provider per configured provider section (``local`` by default)."""
    from .local import LocalProvider

    out: dict[str, Provider] = {}
    for name, pc in config.providers.items():
        if pc.type == "local":
            out[name] = LocalProvider(name, pc.options, runs_root=Path(config.paths.runs_dir))
        else:  # the config loader already refused unknown types; this guards direct callers
            raise ProviderError(f"Unknown provider type {pc.type!r} for provider {name!r}.")
    return out


__all__ = ["PROVIDER_TYPES", "Provider", "Transport", "CommandResult", "FileChunk", "InstanceSpec", "PortForward",
           "build_providers", "provider_schema"]
