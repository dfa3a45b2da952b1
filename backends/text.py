"""Text from outside (a teammate's store, a host, a log, a provider) made safe to show on a terminal.

One sanitizer for the TUI and the CLI: :func:`plain` removes terminal escape
sequences (CSI, OSC such as OSC 52 clipboard writes, DCS/SOS/PM/APC, in their
7-bit and 8-bit forms), keeps what a terminal would show of a carriage-return
rewritten line (progress bars), and replaces every other control character
(C0 but newline and tab, DEL, C1), lone surrogates (JSON ``"\\udc80"``) and
bidirectional overrides with U+FFFD, so nothing a value holds can move the
cursor, clear the screen, write the clipboard or reorder what is around it.
Markup is a separate concern: the TUI wraps the result in ``rich.text.Text``
and the CLI escapes it, so ``[`` is never parsed.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["ESCAPES", "ESCAPE_STARTS", "plain", "plain_line"]

ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI (colours, cursor moves, clear screen, alternate screen)
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]{0,4096}(?:\x07|\x1b\\|\x9c)?"  # OSC (titles, hyperlinks, clipboard)
    r"|(?:\x1b[PX^_]|[\x90\x98\x9e\x9f])[^\x1b\x9c]{0,4096}(?:\x1b\\|\x9c)?"  # DCS, SOS, PM, APC
    r"|\x1b[ -/]*[0-~]"  # other escape sequences
    r"|\x1b"  # a lone ESC
)
ESCAPE_STARTS = re.compile("[\x1b\x90\x98\x9b\x9d\x9e\x9f]")
# what is left after escapes are gone and that a terminal must not get: C0 but \t \n, DEL, C1,
# lone surrogates, bidi embeddings/overrides/isolates (they reorder the text around them)
_BAD = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")
_SUSPECT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069\n\t]")


def _text(s: Any) -> str:
    if isinstance(s, str):
        return s
    if isinstance(s, (bytes, bytearray)):
        return bytes(s).decode("utf-8", "replace")
    return "" if s is None else str(s)


def plain(s: Any) -> str:
    """``s`` (str, bytes or anything with a str) as text safe to show: newlines and tabs kept."""
    t = _text(s)
    if _SUSPECT.search(t) is None:  # the common case: nothing to do
        return t
    if ESCAPE_STARTS.search(t):
        t = ESCAPES.sub("", t)
    if "\r" in t:
        t = t.replace("\r\n", "\n")
        if "\r" in t:  # a rewritten line shows its last non-empty part, as on a terminal
            t = "\n".join((([p for p in line.split("\r") if p] or [""])[-1]) for line in t.split("\n"))
    return _BAD.sub("\ufffd", t)


def plain_line(s: Any) -> str:
    """:func:`plain` for one line (a table cell, a title): newlines and tabs become spaces."""
    t = plain(s)
    if "\n" in t or "\t" in t:
        t = t.replace("\n", " ").replace("\t", " ")
    return t
