"""Sortable ids, unique across users and hosts (ULID: 48-bit ms time + 80 random bits).

Within one process, ids made in the same millisecond still sort in creation
order (the random part is incremented, as the ULID spec's monotonic mode does).
"""

from __future__ import annotations

import os
import re
import threading

from . import clock

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        value, r = divmod(value, 32)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def new_id(now_ms: int | None = None) -> str:
    """A 26-character ULID string."""
    global _last_ms, _last_rand
    ms = int(clock.wall() * 1000) if now_ms is None else now_ms
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            _last_rand = (_last_rand + 1) & ((1 << 80) - 1)
        else:
            _last_ms = ms
            _last_rand = int.from_bytes(os.urandom(10), "big")
        rand = _last_rand
    return _encode(ms, 10) + _encode(rand, 16)


def id_time_ms(ulid: str) -> int:
    """The millisecond timestamp inside an id."""
    value = 0
    for ch in ulid[:10].upper():
        value = value * 32 + _ALPHABET.index(ch)
    return value


def is_id(text: object) -> bool:
    """A ULID in any case (what a user types)."""
    return isinstance(text, str) and len(text) == 26 and all(c in _ALPHABET for c in text.upper())


# What a record read from someone else's files may hold, checked in one place. Both end up in
# paths (a run's log and metrics cache, its blob), in shell commands and on screen, so the grammar
# is strict: stored ids are canonical (upper-case) ULIDs; user names are POSIX-portable login names
# (letters, digits, ``_``, ``.``, ``-``; not starting with ``-`` or ``.``, so never ``..``; at most 32).
_STORED_ID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


def is_stored_id(text: object) -> bool:
    """An id as labdeck writes it: 26 upper-case Crockford characters that fit 128 bits."""
    return isinstance(text, str) and _STORED_ID.fullmatch(text) is not None


def is_user_name(text: object) -> bool:
    """A user name that is safe as a path component and as plain text."""
    return isinstance(text, str) and _USER_NAME.fullmatch(text) is not None


def describe(text: object, limit: int = 40) -> str:
    """Something read from outside, for an error message: printable ASCII only (no control sequences,
    no brackets a console would take for markup), quoted, cut short."""
    s = ascii(text).replace("[", "\\x5b").replace("]", "\\x5d") if isinstance(text, str) else f"a {type(text).__name__}"
    return s if len(s) <= limit else s[: limit - 1] + "…"
