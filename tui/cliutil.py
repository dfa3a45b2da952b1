"""What every `labdeck` command shares: the consoles, logging to the log file, tables that fit,
errors as one message (never a traceback), and opening the workstation.

Text from outside (teammates' stores, hosts, logs, providers) reaches the terminal as text: a value
put into markup goes through :func:`esc` (escaped, and stripped of control characters and escape
sequences by :func:`backends.text.plain`), and both consoles replace any control character left in
what they print (a render hook), so no OSC 52, clear-screen or alternate-screen sequence gets out.
``--raw`` (:func:`raw_output`) lets outside text through as it is (markup is still never parsed).

Output that is not a terminal (a pipe, a file) is never wrapped: one table row is one line, so
``labdeck ps -a | grep x`` and ``| less -S`` work; scripts take ``--json`` (:func:`print_json`). A
reader that goes away early (``labdeck logs X | head``) ends the command quietly (:func:`pipe_closed`)."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console, ConsoleDimensions, RenderHook
from rich.markup import escape
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from backends.errors import LabdeckError
from backends.paths import Paths
from backends.text import plain, plain_line

if TYPE_CHECKING:
    from backends.workstation import Workstation

UNWRAPPED_WIDTH = 10_000  # the width of output that is not a terminal: no line is wrapped below this


class _Console(Console):
    """A console that wraps only on a terminal. Rich otherwise takes the width of whatever terminal
    stdin or stderr is (or $COLUMNS, else 80) for a pipe too, and folds a table's last column into
    rows many lines tall."""

    def _size(self) -> ConsoleDimensions:
        if not self.is_terminal:
            return ConsoleDimensions(UNWRAPPED_WIDTH, 25)
        return Console.size.fget(self)

    size = property(_size, Console.size.fset)

    def on_broken_pipe(self) -> None:
        """Rich's own handling exits 1; a closed pipe ends every command the same way."""
        self.quiet = True
        pipe_closed()


console = _Console()
err_console = _Console(stderr=True)

_raw = False  # --raw: outside text is printed as it is


def raw_output(raw: bool) -> None:
    """Let control characters and escape sequences in outside text through (``--raw``), or not."""
    global _raw
    _raw = raw


def esc(value, *, lines: bool = False) -> str:
    """Outside text for a markup string: never parsed as markup, and (unless ``--raw``) one line of plain
    text (``lines``: newlines kept) with no control characters or escape sequences."""
    if _raw:  # as it is, but for lone surrogates (from JSON "\udcff"): no terminal can be sent those
        return escape(_SURROGATES.sub("\ufffd", value if isinstance(value, str) else str(value)))
    return escape(plain(value) if lines else plain_line(value))


_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")
_SURROGATES = re.compile("[\ud800-\udfff]")


class _Sanitized:
    """A renderable whose text segments carry no control character (Rich's own control segments, such
    as cursor moves of a live display, pass)."""

    def __init__(self, renderable, unsafe: re.Pattern = _UNSAFE) -> None:
        self.renderable = renderable
        self.unsafe = unsafe

    def __rich_console__(self, console: Console, options):
        for seg in console.render(self.renderable, options):
            if seg.control or not seg.text or self.unsafe.search(seg.text) is None:
                yield seg
            else:
                yield Segment(self.unsafe.sub("\ufffd", seg.text), seg.style, seg.control)


class _PlainOutput(RenderHook):
    """The last line of defence: whatever a command prints, no escape sequence from outside text gets out."""

    def process_renderables(self, renderables):
        return [_Sanitized(r, _SURROGATES if _raw else _UNSAFE) for r in renderables]


console.push_render_hook(_PlainOutput())
err_console.push_render_hook(_PlainOutput())


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


PIPE_CLOSED_STATUS = 141  # 128 + SIGPIPE: what `yes | head` or `git log | head` leave behind


def pipe_closed() -> NoReturn:
    """The reader of our output went away (``labdeck ps -a | head -1``): not an error, nothing to say.

    What is still buffered, and anything written on the way out, goes to /dev/null (so the flush at
    exit cannot fail again and print "Exception ignored"), and the exit status is the one a program
    killed by SIGPIPE has, as every other tool in that pipeline would leave (``set -o pipefail``
    scripts see the same as with ``git log | head``)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            for stream in (sys.stdout, sys.stderr):
                try:
                    os.dup2(devnull, stream.fileno())
                except (OSError, ValueError, AttributeError):  # not a real file (a test's capture)
                    pass
        finally:
            os.close(devnull)
    except OSError:
        pass
    sys.exit(PIPE_CLOSED_STATUS)


def _is_pipe_closed(e: BaseException) -> bool:
    import errno

    return isinstance(e, BrokenPipeError) or (isinstance(e, OSError) and e.errno == errno.EPIPE)


def friendly(fn):
    """Run a command; turn errors into a message and exit code 1 instead of a traceback; a closed
    pipe on the output into a quiet exit (:func:`pipe_closed`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a reader that went away shows here, not in the flush at exit
            return result
        except LabdeckError as e:
            err_console.print(f"[bold red]error:[/] {esc(e.message, lines=True)}", highlight=False, markup=True)
            if e.hint:
                err_console.print(f"[dim]{esc(e.hint, lines=True)}[/]", highlight=False)
            sys.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # a bug: one line for the user, the traceback for us
            if _is_pipe_closed(e):
                pipe_closed()
            _unexpected(e)

    return wrapper


def _unexpected(e: Exception) -> NoReturn:
    paths = Paths.resolve()
    if not logging.getLogger("labdeck").handlers:
        _setup_logging(paths)
    logging.getLogger("labdeck").error("unexpected error\n%s", traceback.format_exc())
    err_console.print(f"[bold red]unexpected error:[/] {type(e).__name__}: {esc(str(e), lines=True)}", highlight=False)
    err_console.print(f"[dim]Details are in {_log_file(paths)}. Please report it.[/]", highlight=False)
    sys.exit(2)


def print_json(doc: Any) -> None:
    """One JSON document on stdout: no Rich, no colour, no wrapping. Text from outside is data here:
    ``json.dumps`` escapes every control character (and, ASCII-only, everything past U+007F, so no
    C1 control or bidi override reaches a terminal that shows it); a number that is not finite
    (NaN, inf: not JSON) is null."""
    sys.stdout.write(json.dumps(_finite(doc), indent=2, ensure_ascii=True, default=str) + "\n")


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _store():
    """The team store alone, for a command that only reads records (`runs`, `models`): it starts
    without the Workstation's providers, transports and monitor (and their imports)."""
    from backends.config import load_config
    from backends.store import Store

    paths = Paths.resolve()
    _setup_logging(paths)
    return Store.from_config(load_config(paths))


def _workstation(*, starts_relaunches: bool = False) -> Workstation:
    """The Workstation of a command; only the TUI and `ls` start relaunches after a preemption (they let
    them finish), so other commands that list instances never begin one they would cancel on exit."""
    from backends.config import load_config
    from backends.workstation import Workstation

    paths = Paths.resolve()
    _setup_logging(paths)
    ws = Workstation(load_config(paths))
    ws.starts_relaunches = starts_relaunches
    return ws


