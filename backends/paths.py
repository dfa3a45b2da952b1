"""Where labdeck keeps its files.

Everything comes from platformdirs, unless ``LABDECK_HOME`` is set, in which
case every path (config, data, cache, team directory) lives under it. Tests and
team set-ups use that to move the whole thing at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP = "labdeck"


@dataclass(frozen=True)
class Paths:
    config_file: Path
    data_dir: Path
    cache_dir: Path
    log_dir: Path
    default_team_dir: Path
    runs_dir: Path  # local run directories of jobs on the `local` instance

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None) -> "Paths":
        home = home if home is not None else os.environ.get("LABDECK_HOME")
        if home:
            root = Path(home).expanduser().absolute()
            config = root / "config.toml"
            data = root / "data"
            cache = root / "cache"
        else:
            config = Path(platformdirs.user_config_dir(APP)) / "config.toml"
            data = Path(platformdirs.user_data_dir(APP))
            cache = Path(platformdirs.user_cache_dir(APP))
        return cls(
            config_file=config,
            data_dir=data,
            cache_dir=cache,
            log_dir=cache / "logs",
            default_team_dir=data / "team",
            runs_dir=data / "runs",
        )
