"""Config: strict TOML, errors naming file, line and key; LABDECK_HOME moves everything."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.config import load_config
from backends.errors import ConfigError
from backends.paths import Paths


def write(home: Path, text: str) -> Path:
    p = home / "config.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file(home: Path) -> None:
    cfg = load_config(Paths.resolve())
    assert cfg.file == home / "config.toml" and not cfg.file_exists
    assert cfg.team_dir == home / "data" / "team"
    assert list(cfg.providers) == ["local"] and cfg.providers["local"].source == "default (embedded)"
    assert cfg.get("ui", "refresh_seconds") == 2.0
    assert cfg.sources["ui.refresh_seconds"] == "default"


def test_labdeck_home_moves_every_path(tmp_path: Path) -> None:
    p = Paths.resolve(tmp_path / "h")
    for path in (p.config_file, p.data_dir, p.cache_dir, p.log_dir, p.default_team_dir, p.runs_dir):
        assert str(path).startswith(str(tmp_path / "h"))


def test_values_and_sources(home: Path) -> None:
    f = write(home, '[ui]\nrefresh_seconds = 0.5\nstart_tab = "jobs"\n\n[store]\nteam_dir = "/srv/team"\n\n'
                    '[providers.local]\nprice_per_hour = 1.25\n')
    cfg = load_config(Paths.resolve())
    assert cfg.get("ui", "refresh_seconds") == 0.5
    assert cfg.sources["ui.refresh_seconds"] == f"{f}:2"
    assert cfg.sources["store.team_dir"] == f"{f}:6"
    assert cfg.team_dir == Path("/srv/team")
    assert cfg.providers["local"].options["price_per_hour"] == 1.25
    rows = {k: (v, s) for k, v, s in cfg.explain()}
    assert rows["ui.start_tab"] == ("jobs", f"{f}:3")
    assert rows["providers.local.price_per_hour"][0] == "1.25"


def test_environment_override_is_reported(home: Path) -> None:
    cfg = load_config(Paths.resolve(), env={"LABDECK_TEAM_DIR": "/team/x"})
    assert cfg.team_dir == Path("/team/x")
    assert cfg.sources["store.team_dir"] == "environment LABDECK_TEAM_DIR"


@pytest.mark.parametrize("text, line, needle", [
    ('[ui]\nrefresh_secs = 1\n', 2, "ui.refresh_secs: unknown key"),
    ('colour = "red"\n', 1, "colour: unknown key"),
    ('[ui]\nrefresh_seconds = "fast"\n', 2, "ui.refresh_seconds: expected a number"),
    ('[ui]\n\nrefresh_seconds = -1\n', 3, "must be greater than 0"),
    ('[ui]\nstart_tab = "home"\n', 2, "must be one of: instances, jobs"),
    ('[store]\nfsync = 1\n', 2, "expected true/false"),
    ('[providers.gpu1]\ntype = "kubernetes"\n', 2, "unknown provider type 'kubernetes'"),
    ('[providers.gpu1]\nhost = "x"\n', 1, "missing `type`"),
    ('[providers.local]\nprice = 3\n', 2, "providers.local.price: unknown key"),
    ('[keys]\n"app.quit" = 3\n', 2, "keys.app.quit"),
])
def test_bad_config_names_file_line_and_key(home: Path, text: str, line: int, needle: str) -> None:
    f = write(home, text)
    with pytest.raises(ConfigError) as err:
        load_config(Paths.resolve())
    msg = str(err.value)
    assert msg.startswith(f"{f}:{line}: "), msg
    assert needle in msg, msg
    assert err.value.hint


def test_invalid_toml_says_where(home: Path) -> None:
    f = write(home, '[ui]\nrefresh_seconds = = 2\n')
    with pytest.raises(ConfigError) as err:
        load_config(Paths.resolve())
    assert str(f) in str(err.value) and "line 2" in str(err.value)


def test_not_utf8(home: Path) -> None:
    (home / "config.toml").write_bytes(b"[ui]\nx = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(Paths.resolve())
