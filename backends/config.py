"""labdeck's configuration: a TOML file, strictly checked.

* The file lives at the platformdirs user config path (``labdeck/config.toml``),
  or at ``$LABDECK_HOME/config.toml``.
* Every key is known: an unknown key, a wrong type or a bad value is an error
  that names the file, the line and the key (never silently ignored).
* :meth:`Config.explain` lists the effective value of every key and where it
  came from (default, file:line, or environment variable).

Provider sections (``[providers.NAME]``) are checked against the schema of
their ``type``; with no provider section at all, the embedded default is the
``local`` provider (this machine).
"""

from __future__ import annotations

import getpass
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError
from .paths import Paths


@dataclass(frozen=True)
class Field:
    type: type | tuple[type, ...]
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns an error text or None
    # for a table of named tables (e.g. [providers.lab.hosts.gpu1]): the schema of each entry
    entries: "dict[str, Field] | None" = None


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of: {', '.join(choices)}"

    return check


TABS = ("instances", "jobs", "monitor", "lineage", "models")
IMAGE_MODES = ("auto", "halfblock", "kitty", "sixel")  # tui/termimage.py MODES


def _valid_pattern(v: Any) -> str | None:
    if not v:
        return None
    try:
        from .metrics import LogMetricParser

        LogMetricParser(v)
    except ValueError as e:
        return f"is not a usable pattern: {e}"
    return None

# section -> key -> Field. "providers" and "keys" are open tables checked elsewhere.
SCHEMA: dict[str, dict[str, Field]] = {
    "store": {
        "team_dir": Field(str, None, "Team directory holding every user's store files (default: <data dir>/team)"),
        "fsync": Field(bool, True, "fsync the store journal on every commit (survives power loss, not only crashes)"),
        "compact_every": Field(int, 2000, "Journal entries after which the store is compacted into one snapshot", _positive),
    },
    "ui": {
        "refresh_seconds": Field((int, float), 2.0, "Seconds between live refreshes of instances and jobs", _positive),
        "theme": Field(str, "textual-dark", "Textual theme name"),
        "start_tab": Field(str, "instances", "Tab shown when labdeck opens", _one_of(*TABS)),
        "images": Field(str, "auto", "How the Media view draws images: auto (Kitty graphics or Sixel when the terminal "
                                     "answers for it, outside tmux and SSH; else half blocks), halfblock, kitty, sixel",
                        _one_of(*IMAGE_MODES)),
    },
    "jobs": {
        "cancel_grace_seconds": Field((int, float), 10.0, "Seconds between SIGTERM and SIGKILL when a run is cancelled", _non_negative),
    },
    "monitor": {
        "log_pattern": Field(str, "", "Regex with named groups key and value (and optional step) for metrics in log lines "
                                      "('' = built-in key=value / key: value / JSON capture)", _valid_pattern),
        "gpu_source": Field(str, "auto", "Where the agent reads GPUs: auto (nvitop, else nvidia-smi), nvitop, nvidia-smi, none "
                                         "(fake:FILE on the instance: devices from a JSON file, for tests and demos)",
                            lambda v: None if v in ("auto", "nvitop", "nvidia-smi", "none") or v.startswith("fake:")
                            else "must be auto, nvitop, nvidia-smi, none or fake:FILE"),
    },
}

SCHEMA["budget"] = {
    "daily_usd": Field((int, float), 0.0, "Your daily cloud budget in $ (0 = none): a launch that would pass it "
                                          "within the hour is refused", _non_negative),
    "warn_fraction": Field((int, float), 0.8, "Warn when a launch would bring today's spend above this part of the budget",
                           lambda v: None if 0 < v <= 1 else "must be between 0 and 1"),
}

def _hop(v: Any) -> str | None:
    """``[user@]host[:port]``, as ssh's -J takes it ('' = not set)."""
    if not v:
        return None
    ok = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_.-]{0,31}@)?([A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?", v)
    return None if ok else "must be [user@]host[:port], e.g. bastion.example.org or alice@203.0.113.5:2222"


SCHEMA["team"] = {
    # labdeck on a jump host prints, for serving and notebooks, the `ssh -N -L …` line a teammate pastes
    # on a laptop; the laptop reaches the nodes only through this machine, so the line goes -J through it
    "jump_host": Field(str, "", "The jump host as laptops reach it ([user@]host[:port]), for the `ssh -N -L …` line "
                                "printed for serving and notebooks ('' = the address this SSH session came in on, "
                                "from SSH_CONNECTION; none outside an SSH session)", _hop),
}

ENV_OVERRIDES = {"LABDECK_TEAM_DIR": ("store", "team_dir"), "LABDECK_IMAGES": ("ui", "images")}

TOP_LEVEL = set(SCHEMA) | {"providers", "keys"}


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false"}


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return "a number" if set(t) == {int, float} else " or ".join(_TYPE_NAMES.get(x, x.__name__) for x in t)
    return _TYPE_NAMES.get(t, t.__name__)


def locate(text: str, table: tuple[str, ...], key: str | None) -> int | None:
    """Best-effort line number (1-based) of ``key`` inside ``[table]`` in TOML text,
    or of the table header itself when ``key`` is None."""
    current: tuple[str, ...] = ()
    header_line = None
    key_re = re.compile(r'^\s*["\']?' + re.escape(key) + r'["\']?\s*=') if key else None
    dotted = ".".join(table + ((key,) if key else ()))
    dotted_re = re.compile(r"^\s*" + re.escape(dotted) + r"\s*=") if key else None
    for no, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$", line)
        if m:
            current = tuple(p.strip().strip('"\'') for p in m.group(1).split("."))
            if current == table and header_line is None:
                header_line = no
            continue
        if key_re and current == table and key_re.match(line):
            return no
        if dotted_re and current == () and dotted_re.match(line):
            return no
    return header_line


@dataclass
class ProviderConfig:
    name: str
    type: str
    options: dict[str, Any]
    source: str


@dataclass
class Config:
    paths: Paths
    file: Path
    file_exists: bool
    values: dict[str, dict[str, Any]]
    sources: dict[str, str]  # "section.key" -> where it came from
    providers: dict[str, ProviderConfig]
    keys: dict[str, str] = field(default_factory=dict)
    keys_lines: dict[str, int | None] = field(default_factory=dict)
    user: str = field(default_factory=getpass.getuser)

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    @property
    def team_dir(self) -> Path:
        return Path(self.values["store"]["team_dir"]).expanduser()

    def error_at(self, table: tuple[str, ...], key: str | None, message: str, hint: str = "") -> ConfigError:
        """A ConfigError naming this config file, the line and the key."""
        return config_error(self.file, _read_text(self.file) if self.file_exists else "", table, key, message, hint)

    def explain(self) -> list[tuple[str, str, str]]:
        """(key, value, source) for every effective setting, in schema order."""
        rows: list[tuple[str, str, str]] = [
            ("config_file", str(self.file), "exists" if self.file_exists else "not found: defaults in use"),
            ("user", self.user, "Unix user"),
        ]
        for section, fields in SCHEMA.items():
            for key in fields:
                name = f"{section}.{key}"
                rows.append((name, _show(self.values[section][key]), self.sources[name]))
        for p in self.providers.values():
            rows.append((f"providers.{p.name}.type", p.type, p.source))
            for k, v in p.options.items():
                rows.append((f"providers.{p.name}.{k}", _show(v), p.source))
        for k, v in self.keys.items():
            rows.append((f"keys.{k}", v, f"{self.file}:{self.keys_lines.get(k) or '?'}"))
        return rows


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def config_error(path: Path, text: str, table: tuple[str, ...], key: str | None, message: str, hint: str = "") -> ConfigError:
    line = locate(text, table, key)
    where = f"{path}:{line}" if line else str(path)
    dotted = ".".join(table + ((key,) if key else ()))
    return ConfigError(f"{where}: {dotted}: {message}", hint or f"Edit {path} and fix `{dotted}`; `labdeck config` shows the effective settings.")


def check_value(path: Path, text: str, table: tuple[str, ...], key: str, value: Any, spec: Field) -> Any:
    if spec.entries is not None:
        return _check_entries(path, text, table + (key,), value, spec.entries)
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    # bool is an int in Python; TOML keeps them apart, so do we.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise config_error(path, text, table, key, f"expected {_type_name(spec.type)}, got {value!r}")
    if spec.check:
        problem = spec.check(value)
        if problem:
            raise config_error(path, text, table, key, f"{value!r} {problem}")
    return value


def _check_entries(path: Path, text: str, table: tuple[str, ...], value: Any, schema: dict[str, Field]) -> dict[str, dict[str, Any]]:
    """A table of named tables, each checked against ``schema`` (unknown keys are errors, defaults filled)."""
    if not isinstance(value, dict):
        raise config_error(path, text, table[:-1], table[-1], "must be a table of named tables, e.g. [" + ".".join(table) + ".NAME]")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in value.items():
        where = table + (name,)
        if not isinstance(entry, dict):
            raise config_error(path, text, table, name, "must be a table, e.g. [" + ".".join(where) + "]")
        checked: dict[str, Any] = {}
        for key, v in entry.items():
            if key not in schema:
                raise config_error(path, text, where, key, f"unknown key (known: {', '.join(schema)})")
            checked[key] = check_value(path, text, where, key, v, schema[key])
        for key, spec in schema.items():
            checked.setdefault(key, spec.default)
        out[name] = checked
    return out


def load_config(paths: Paths | None = None, env: dict[str, str] | None = None) -> Config:
    """Read, check and merge the configuration. Raises ConfigError with file:line."""
    from .providers import provider_schema  # late: providers import config types

    paths = paths or Paths.resolve()
    env = os.environ if env is None else env
    path = paths.config_file
    raw: dict[str, Any] = {}
    text = ""
    exists = path.exists()
    if exists:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", f"Save {path} as UTF-8.") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror})", "Check the file's permissions.") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            # tomllib's message ends with "(at line L, column C)"
            raise ConfigError(f"{path}: invalid TOML: {e}", f"Fix the syntax in {path}.") from None

    for top, value in raw.items():
        if top not in TOP_LEVEL:
            raise config_error(path, text, (), top, f"unknown key (known: {', '.join(sorted(TOP_LEVEL))})")
        if not isinstance(value, dict):
            raise config_error(path, text, (), top, "must be a table, e.g. [" + top + "]")

    values: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for section, fields in SCHEMA.items():
        given = raw.get(section, {})
        for key in given:
            if key not in fields:
                raise config_error(path, text, (section,), key, f"unknown key (known in [{section}]: {', '.join(fields)})")
        values[section] = {}
        for key, spec in fields.items():
            name = f"{section}.{key}"
            if key in given:
                values[section][key] = check_value(path, text, (section,), key, given[key], spec)
                sources[name] = f"{path}:{locate(text, (section,), key) or '?'}"
            else:
                values[section][key] = spec.default
                sources[name] = "default"
    for var, (section, key) in ENV_OVERRIDES.items():
        if env.get(var):
            spec = SCHEMA[section][key]
            problem = spec.check(env[var]) if spec.check else None
            if problem:
                raise ConfigError(f"environment {var}: {env[var]!r} {problem}",
                                  f"Set {var} to a valid value or unset it; it overrides [{section}] {key}.")
            values[section][key] = env[var]
            sources[f"{section}.{key}"] = f"environment {var}"
    if values["store"]["team_dir"] is None:
        values["store"]["team_dir"] = str(paths.default_team_dir)
        sources["store.team_dir"] = "default (data dir)"

    providers: dict[str, ProviderConfig] = {}
    given_providers = raw.get("providers", {})
    for name, opts in given_providers.items():
        if not isinstance(opts, dict):
            raise config_error(path, text, ("providers",), name, "must be a table, e.g. [providers." + name + "]")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise config_error(path, text, ("providers", name), None, "provider names use letters, digits, '-', '_' and '.'")
        ptype = opts.get("type", "local" if name == "local" else None)
        if ptype is None:
            raise config_error(path, text, ("providers", name), None, "missing `type`", f'Add type = "local" (or another provider type) under [providers.{name}].')
        schema = provider_schema(ptype)
        if schema is None:
            from .providers import PROVIDER_TYPES

            raise config_error(
                path, text, ("providers", name), "type",
                f"unknown provider type {ptype!r} (known: {', '.join(sorted(PROVIDER_TYPES))})",
            )
        options: dict[str, Any] = {}
        for key, value in opts.items():
            if key == "type":
                continue
            if key not in schema:
                raise config_error(path, text, ("providers", name), key, f"unknown key for a {ptype} provider (known: type, {', '.join(schema)})")
            options[key] = check_value(path, text, ("providers", name), key, value, schema[key])
        for key, spec in schema.items():
            options.setdefault(key, spec.default)
        providers[name] = ProviderConfig(name, ptype, options, f"{path}:{locate(text, ('providers', name), None) or '?'}")
    if "local" not in providers:
        schema = provider_schema("local")
        providers = {"local": ProviderConfig("local", "local", {k: f.default for k, f in schema.items()}, "default (embedded)"), **providers}

    keys: dict[str, str] = {}
    keys_lines: dict[str, int | None] = {}
    for binding_id, keyspec in raw.get("keys", {}).items():
        if not isinstance(keyspec, str) or not keyspec.strip():
            raise config_error(path, text, ("keys",), binding_id, "expected a key name such as \"ctrl+r\" or \"r,f5\"")
        keys[binding_id] = keyspec
        keys_lines[binding_id] = locate(text, ("keys",), binding_id)

    return Config(paths=paths, file=path, file_exists=exists, values=values, sources=sources,
                  providers=providers, keys=keys, keys_lines=keys_lines)
