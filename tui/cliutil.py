"""What every `labdeck` command shares: the consoles, logging to the log file, tables that fit,
errors as one message (never a traceback), and opening the workstation."""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from backends.config import load_config
from backends.errors import LabdeckError
from backends.paths import Paths
from backends.workstation import Workstation

console = Console()
err_console = Console(stderr=True)


def _log_file(paths: Paths) -> Path:
    return paths.log_dir / "labdeck.log"


def _setup_logging(paths: Paths) -> None:
    try:
        paths.log_dir.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(_log_file(paths))
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("labdeck")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False  # never onto the terminal


def fit_table(t: Table, cols: tuple[str, ...], rows: list[tuple[str, ...]], flexible: set[str]) -> Table:
    """Columns not in ``flexible`` keep their full width; the flexible ones fold to fit the terminal."""
    for n, col in enumerate(cols):
        width = max([len(col)] + [len(Text.from_markup(r[n]).plain) for r in rows])
        t.add_column(col, min_width=None if col in flexible else width, overflow="fold")
    for r in rows:
        t.add_row(*r)
    return t


def friendly(fn):
    """Run a command; turn errors into a message and exit code 1 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LabdeckError as e:
            err_console.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False, markup=True)
            if e.hint:
                err_console.print(f"[dim]{escape(e.hint)}[/]", highlight=False)
            sys.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # a bug: one line for the user, the traceback for us
            paths = Paths.resolve()
            if not logging.getLogger("labdeck").handlers:
                _setup_logging(paths)
            logging.getLogger("labdeck").error("unexpected error\n%s", traceback.format_exc())
            err_console.print(f"[bold red]unexpected error:[/] {type(e).__name__}: {escape(str(e))}", highlight=False)
            err_console.print(f"[dim]Details are in {_log_file(paths)}. Please report it.[/]", highlight=False)
            sys.exit(2)

    return wrapper


def _workstation(*, starts_relaunches: bool = False) -> Workstation:
    """The Workstation of a command; only the TUI and `ls` start relaunches after a preemption (they let
    them finish), so other commands that list instances never begin one they would cancel on exit."""
    paths = Paths.resolve()
    _setup_logging(paths)
    ws = Workstation(load_config(paths))
    ws.starts_relaunches = starts_relaunches
    return ws


