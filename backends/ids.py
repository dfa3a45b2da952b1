"""Sortable ids, unique across users and hosts (ULID: 48-bit ms time + 80 random bits).

Within one process, ids made in the same millisecond still sort in creation
order (the random part is incremented, as the ULID spec's monotonic mode does).
"""

from __future__ import annotations

import os
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


def is_id(text: str) -> bool:
    return len(text) == 26 and all(c in _ALPHABET for c in text.upper())
