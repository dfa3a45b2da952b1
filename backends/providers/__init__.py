"""Provider registry: provider type name → implementation and its config schema."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ProviderError
from .base import CommandResult, FileChunk, InstanceSpec, PortForward, Provider, Transport

if TYPE_CHECKING:
    from ..config import Config, Field
    from ..ssh import SSHPool

# type name -> module holding a Provider subclass and CONFIG_FIELDS
PROVIDER_TYPES: dict[str, str] = {"local": "backends.providers.local", "ssh": "backends.providers.ssh",
                                  "ec2": "backends.providers.cloud", "digitalocean": "backends.providers.cloud",
                                  "linode": "backends.providers.cloud", "openstack": "backends.providers.cloud"}
CLOUD_TYPES = ("ec2", "digitalocean", "linode", "openstack")


def provider_schema(ptype: str) -> "dict[str, Field] | None":
    if ptype not in PROVIDER_TYPES:
        return None
    import importlib

    module = importlib.import_module(PROVIDER_TYPES[ptype])
    return module.config_fields(ptype) if ptype in CLOUD_TYPES else module.CONFIG_FIELDS


def build_providers(config: "Config") -> dict[str, Provider]:
    """One Provider per configured provider section (``local`` by default).

    Each kind's module (asyncssh for SSH and clouds, libcloud later still) is imported only when a
    provider of that kind is configured: a `labdeck ps` on a local-only setup starts without them."""
    out: dict[str, Provider] = {}
    pools: dict[tuple, SSHPool] = {}
    names: dict[str, str] = {}
    catalog = None
    for name, pc in config.providers.items():
        if pc.type == "local":
            from .local import LocalProvider

            out[name] = LocalProvider(name, pc.options, runs_root=Path(config.paths.runs_dir))
        elif pc.type == "ssh":
            from ..ssh import KnownHosts, SSHPool
            from .ssh import SSHProvider

            key = (pc.options["host_key_policy"], float(pc.options["connect_timeout"]))
            if key not in pools:  # one connection per host, shared by providers with the same settings
                pools[key] = SSHPool(KnownHosts(config.paths.data_dir / "known_hosts", key[0]), connect_timeout=key[1])
            out[name] = SSHProvider(name, pc.options, pool=pools[key], ssh_cache=config.paths.cache_dir / "ssh-G.json")
        elif pc.type in CLOUD_TYPES:
            from ..catalog import Catalog
            from ..ssh import KnownHosts, SSHPool
            from .cloud import CloudProvider

            key = ("accept-new", float(pc.options["connect_timeout"]))
            if key not in pools:
                pools[key] = SSHPool(KnownHosts(config.paths.data_dir / "known_hosts", key[0]), connect_timeout=key[1])
            if catalog is None:
                catalog = Catalog.load(config.paths.data_dir / "catalog.json")
            out[name] = CloudProvider(name, pc.options, ptype=pc.type, pool=pools[key], catalog=catalog)
            continue  # its instances come and go: names are checked when one is launched
        else:  # the config loader already refused unknown types; this guards direct callers
            raise ProviderError(f"Unknown provider type {pc.type!r} for provider {name!r}.")
        for inst in _instance_names(out[name], pc):
            if inst in names:
                raise config.error_at(("providers", name), None,
                                      f"instance name {inst!r} is also in provider {names[inst]!r}; instance names must be unique")
            names[inst] = name
    return out


def _instance_names(provider: Provider, pc) -> list[str]:
    if pc.type == "local":
        return ["local"] if pc.options.get("enabled", True) else []
    return [n for n, h in (pc.options.get("hosts") or {}).items() if h.get("listed", True)]


__all__ = ["PROVIDER_TYPES", "Provider", "Transport", "CommandResult", "FileChunk", "InstanceSpec", "PortForward",
           "build_providers", "provider_schema"]
