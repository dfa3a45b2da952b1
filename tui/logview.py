"""A viewer for big, growing log files: `LogView`, a Line API widget.

The file is never loaded whole. A background thread indexes it:

* first the tail (the last :data:`TAIL_BYTES`, from the start of the line that
  holds their first byte), so the end of a 1 GB log is on screen in a few
  milliseconds, with line numbers relative to that tail;
* then the whole file from the start, in :data:`SCAN_CHUNK` reads, counting
  newlines per :data:`BLOCK`-byte block (``bytes.count``, C speed). When it
  reaches the tail, the index is swapped and the view renumbered in place;
* then it polls the file's size :data:`POLL_S` apart and indexes what was
  appended (``tail -f``); a file that shrinks or is replaced is indexed afresh.

The index is one integer per 64 KiB block (about 130 KB for 1 GB), not one per
line: the offset of line *n* is found by bisecting the per-block counts and
locating newlines inside one block (numpy), cached for a few blocks. Only the
visible lines are read (``os.pread``), decoded leniently, stripped of terminal
escapes and capped at :data:`CAP_CHARS` characters.

Search scans the raw bytes in a thread, chunk by chunk (case-insensitive for
ASCII), jumps to the first match, then counts matches in the background for the
"match i of M" status.

`textual` is imported here and in the rest of ``tui``, never in ``backends``.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from array import array
from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path
from collections.abc import Sequence
from typing import Callable, Iterator, overload

import numpy as np
from rich.cells import cell_len
from rich.text import Text
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Size
from textual.message import Message
from textual.reactive import var
from textual.scroll_view import ScrollView
from textual.strip import Strip

from backends.text import ESCAPE_STARTS, ESCAPES

__all__ = ["LineIndex", "LogView", "display_text", "BLOCK", "CAP_CHARS", "TAIL_BYTES", "SCAN_CHUNK", "POLL_S"]

BLOCK = 1 << 16  # index granularity in bytes (newline positions inside a block fit in uint16)
TAIL_BYTES = 4 << 20  # indexed first, so the end of the file shows at once
SCAN_CHUNK = 4 << 20  # one read of the indexer and of search
POLL_S = 0.25  # how often the file's size is checked
CAP_CHARS = 10_000  # longest line shown; the rest is cut with a marker
CAP_BYTES = CAP_CHARS * 4  # bytes read for one line (enough for CAP_CHARS characters of UTF-8)
INDEX_SLICE_S = 0.15  # the full scan looks at the file's growth this often

Reader = Callable[[int, int], bytes]  # (offset, length) -> bytes


# ---- text ------------------------------------------------------------------
_ESCAPES = ESCAPES  # one definition of what a terminal escape is: backends.text
# control characters made visible: C0 as control pictures (tab is expanded first), DEL, C1 as U+FFFD
_CONTROLS = {c: 0x2400 + c for c in range(0x20)} | {0x7F: 0x2421} | {c: 0xFFFD for c in range(0x80, 0xA0)}


def display_text(raw: bytes, full_length: int | None = None) -> tuple[str, bool]:
    """One line as shown: (text, cut). ``raw`` is the line's bytes (maybe only its start), without the newline.

    Decodes UTF-8 leniently, removes terminal escapes, keeps what a terminal
    would show of a carriage-return rewritten line (progress bars), expands
    tabs, makes other control characters visible and caps the length.
    """
    text = raw.decode("utf-8", "replace")
    if ESCAPE_STARTS.search(text):
        text = _ESCAPES.sub("", text)
    if "\r" in text:
        parts = [p for p in text.split("\r") if p]
        text = parts[-1] if parts else ""
    if "\t" in text:
        text = text.expandtabs(8)
    text = text.translate(_CONTROLS)
    cut = full_length is not None and full_length > len(raw)
    if len(text) > CAP_CHARS:
        text, cut = text[:CAP_CHARS], True
    return text, cut


def cut_marker(full_length: int) -> str:
    return f" … [line cut: {human_bytes(full_length)}, first {CAP_CHARS:,} characters shown]"


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---- index ----------------------------------------------------------------
class LineIndex:
    """Where the lines of ``[base, end)`` of a file start, as newline counts per ``block``-byte block.

    ``base`` is a line start (0 for a complete index). Line 0 starts at
    ``base``; line *n* > 0 starts after the *n*-th newline. A last line without
    a newline (a line still being written) counts as a line. Methods that need
    the bytes take a ``read(offset, length)`` callable, so one index serves
    readers on several threads (callers serialise access to one index).
    """

    __slots__ = ("base", "end", "block", "cum", "tail_newlines", "ends_with_newline", "_positions")

    def __init__(self, base: int = 0, *, block: int = BLOCK) -> None:
        if not 0 < block <= 1 << 16:
            raise ValueError("block must be in 1..65536 (positions are kept as uint16)")
        self.base = base
        self.end = base
        self.block = block
        self.cum = array("Q", [0])  # cum[i]: newlines in [base, base + i*block), one entry per complete block + 1
        self.tail_newlines = 0  # newlines in the incomplete last block
        self.ends_with_newline = True  # byte end-1 is a newline (or nothing indexed yet)
        self._positions: OrderedDict[int, np.ndarray] = OrderedDict()  # complete block -> newline offsets in it

    @property
    def complete(self) -> bool:
        return self.base == 0

    @property
    def newlines(self) -> int:
        return self.cum[-1] + self.tail_newlines

    @property
    def line_count(self) -> int:
        return self.newlines + (0 if self.ends_with_newline else 1)

    def feed(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Index ``data``, the file's bytes at ``offset`` (which must be ``end``)."""
        if offset != self.end:
            raise ValueError(f"feed at {offset}, index ends at {self.end}")
        n = len(data)
        if not n:
            return
        if isinstance(data, memoryview):
            data = bytes(data)
        block, pos = self.block, 0
        while pos < n:
            room = block - (self.end - self.base) % block
            take = min(room, n - pos)
            self.tail_newlines += data.count(b"\n", pos, pos + take)
            pos += take
            self.end += take
            if take == room:
                self.cum.append(self.cum[-1] + self.tail_newlines)
                self.tail_newlines = 0
        self.ends_with_newline = data[n - 1] == 10

    def _block_positions(self, b: int, read: Reader) -> np.ndarray:
        """Offsets (relative to the block's start) of the newlines in block ``b``."""
        complete = b < len(self.cum) - 1
        if complete:
            hit = self._positions.get(b)
            if hit is not None:
                self._positions.move_to_end(b)
                return hit
        start = self.base + b * self.block
        data = read(start, min(start + self.block, self.end) - start)
        positions = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10).astype(np.uint16)
        if complete:
            self._positions[b] = positions
            if len(self._positions) > 32:
                self._positions.popitem(last=False)
        return positions

    def newline_offset(self, k: int, read: Reader) -> int:
        """Absolute offset of the ``k``-th newline (0-based) of the indexed range."""
        if not 0 <= k < self.newlines:
            raise IndexError(k)
        b = bisect_right(self.cum, k) - 1
        positions = self._block_positions(b, read)
        i = k - self.cum[b]
        if i >= len(positions):  # the file changed under us (truncated or rewritten)
            raise IndexError(k)
        return self.base + b * self.block + int(positions[i])

    def line_span(self, n: int, read: Reader) -> tuple[int, int]:
        """(start, end) byte offsets of line ``n``, the newline excluded."""
        if not 0 <= n < self.line_count:
            raise IndexError(n)
        start = self.base if n == 0 else self.newline_offset(n - 1, read) + 1
        end = self.newline_offset(n, read) if n < self.newlines else self.end
        return start, end

    def line_of_offset(self, offset: int, read: Reader) -> int:
        """The line holding byte ``offset`` (clamped to the indexed lines)."""
        if not self.line_count:
            return 0
        return min(self.lines_before(offset, read), self.line_count - 1)

    def lines_before(self, offset: int, read: Reader) -> int:
        """How many newlines lie in ``[base, offset)``: the number of ``offset``'s line if it starts a line."""
        if offset <= self.base:
            return 0
        offset = min(offset, self.end)
        b = min((offset - self.base) // self.block, len(self.cum) - 1)
        rel = offset - (self.base + b * self.block)
        if rel == 0:
            return self.cum[b]
        positions = self._block_positions(b, read)
        return self.cum[b] + int(np.searchsorted(positions, rel, side="left"))


def line_start_before(read: Reader, offset: int, step: int = 1 << 20) -> int:
    """The start of the line holding byte ``offset``: just after the last newline before it, or 0."""
    pos = offset
    while pos > 0:
        lo = max(0, pos - step)
        i = read(lo, pos - lo).rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return 0


def signature(read: Reader, end: int, n: int = 64) -> bytes:
    """The first and the last ``n`` bytes of ``[0, end)``."""
    if end <= 2 * n:
        return read(0, end)
    return read(0, n) + read(end - n, n)


def fd_reader(fd: int) -> Reader:
    def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset) if length > 0 else b""
    return read


# ---- search ----------------------------------------------------------------
def find_forward(read: Reader, needle: bytes, lo: int, hi: int, size: int, alive: Callable[[], bool],
                 chunk: int = SCAN_CHUNK) -> int | None:
    """First offset in ``[lo, hi)`` where ``needle`` (lower-case) starts, ignoring ASCII case; the match may end past ``hi``."""
    over = len(needle) - 1
    s = lo
    while s < hi:
        if not alive():
            return None
        data = read(s, min(s + chunk + over, size) - s).lower()
        i = data.find(needle)
        if i >= 0:
            return s + i if s + i < hi else None
        s += chunk
    return None


def find_backward(read: Reader, needle: bytes, lo: int, hi: int, size: int, alive: Callable[[], bool],
                  chunk: int = SCAN_CHUNK) -> int | None:
    """Last offset in ``[lo, hi)`` where ``needle`` starts, ignoring ASCII case."""
    over = len(needle) - 1
    e = hi
    while e > lo:
        if not alive():
            return None
        s = max(lo, e - chunk)
        data = read(s, min(e + over, size) - s).lower()
        i = data.rfind(needle, 0, e - s + over)
        if i >= 0:
            return s + i
        e = s
    return None


def count_matches(read: Reader, needle: bytes, lo: int, hi: int, size: int, alive: Callable[[], bool],
                  chunk: int = SCAN_CHUNK) -> int | None:
    """Non-overlapping matches starting in ``[lo, hi)`` (None if cancelled)."""
    over = len(needle) - 1
    total, s = 0, lo
    while s < hi:
        if not alive():
            return None
        e = min(s + chunk, hi)
        total += read(s, min(e + over, size) - s).lower().count(needle)
        s = e
    return total


# ---- the widget -------------------------------------------------------------
class LogView(ScrollView, can_focus=True, inherit_bindings=False):
    """A local, possibly growing, possibly huge log file, rendered line by line.

    Follows the end while scrolled to it (``following``); scrolling up pauses
    that; :meth:`scroll_to_end` resumes it. Search with :meth:`search`,
    :meth:`search_next` and :meth:`search_previous`. Posts
    :class:`LogView.StatusChanged` whenever :attr:`status` changes.
    """

    BINDINGS = [
        Binding("up,k", "scroll_up", "Up", show=False),
        Binding("down,j", "scroll_down", "Down", show=False),
        Binding("left,h", "scroll_left", "Pan", key_display="←→", id="log.left", tooltip="Scroll long lines left (without wrap)"),
        Binding("right,l", "scroll_right", "Right", show=False, id="log.right", tooltip="Scroll long lines right (without wrap)"),
        Binding("pageup,b", "page_up", "Page up", show=False),
        Binding("pagedown,space", "page_down", "Page down", show=False),
        Binding("ctrl+pageup", "page_left", "Page left", show=False),
        Binding("ctrl+pagedown", "page_right", "Page right", show=False),
    ]  # home/end (g/G) belong to the screen: they also switch following

    DEFAULT_CSS = """
    LogView {
        background: $surface;
        color: $text;
        overflow: auto auto;
        height: 1fr;
        & > .logview--match-line {
            background: $accent 35%;
        }
        & > .logview--match {
            background: $warning;
            color: $background;
            text-style: bold;
        }
        & > .logview--cut {
            color: $text-muted;
            text-style: italic;
        }
    }
    """
    COMPONENT_CLASSES = {"logview--match-line", "logview--match", "logview--cut"}

    following: var[bool] = var(True)
    wrap: var[bool] = var(False)
    """Long lines continue on the next rows instead of running off to the right (no horizontal scroll then)."""

    class StatusChanged(Message):
        """The status line (position, following, search) changed."""

        def __init__(self, view: "LogView", status: Text) -> None:
            super().__init__()
            self.view = view
            self.status = status

        @property
        def control(self) -> "LogView":
            return self.view

    class _Indexed(Message):
        """The indexer published something (internal)."""

    class _SearchDone(Message):
        def __init__(self, gen: int, offset: int | None, wrapped: bool) -> None:
            super().__init__()
            self.gen, self.offset, self.wrapped = gen, offset, wrapped

    class _SearchCounted(Message):
        def __init__(self, gen: int, ordinal: int, total: int) -> None:
            super().__init__()
            self.gen, self.ordinal, self.total = gen, ordinal, total

    def __init__(self, path: str | Path, *, tail_bytes: int = TAIL_BYTES, poll_interval: float = POLL_S,
                 name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.path = Path(path)
        self.tail_bytes = tail_bytes
        self.poll_interval = poll_interval
        # shared with the indexer thread (under _lock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._complete = threading.Event()
        self._index: LineIndex | None = None
        self._pending_shift = 0
        self._pending_reset = False
        self._progress: float | None = None  # share of the full scan done while only the tail is indexed
        self._error = ""
        # UI thread only
        self._fd = -1
        self._read: Reader = lambda offset, length: b""
        self._line_count = 0
        self._indexed = False
        self._max_width = 0
        self._width_pending = False
        self._lines: LRUCache[int, tuple[str, str, bool]] = LRUCache(2048)  # n -> (text, cut marker, settled)
        self._strips: LRUCache[tuple, Strip] = LRUCache(512)
        self._programmatic = 0
        self._status_plain = ""
        self._thread: threading.Thread | None = None
        # search
        self._search_gen = 0
        self.search_query = ""
        self.search_state = ""  # "", "waiting", "searching", "found", "not found"
        self.match_offset: int | None = None
        self.match_line: int | None = None
        self.match_ordinal: int | None = None
        self.match_total: int | None = None
        self.match_wrapped = False
        self.first_paint: float | None = None  # perf_counter() of the first rendered line of text (benchmarks)
        self._layout: list[tuple[int, int]] | None = None  # with wrap: screen row -> (line, first cell), per paint
        self._layout_key: tuple = ()

    # ---- public state ----------------------------------------------------
    @property
    def line_count(self) -> int:
        """Lines known to the view (the tail's only, until :attr:`indexed`)."""
        return self._line_count

    @property
    def indexed(self) -> bool:
        """The whole file is indexed and the view shows it: line numbers are absolute."""
        return self._indexed

    @property
    def index_progress(self) -> float | None:
        """Share of the file indexed while the full scan runs, else None."""
        return None if self.indexed else self._progress

    @property
    def top_line(self) -> int:
        return int(self.scroll_y)

    @property
    def lines(self) -> "LogLines":
        """The lines as shown (a lazy sequence: each item is read from the file when asked for)."""
        return LogLines(self)

    def get_line(self, n: int) -> str:
        """Line ``n`` as shown (escapes removed, cut lines with their marker)."""
        text, marker, _ = self._line(n)
        return text + marker

    # ---- lifecycle ---------------------------------------------------------
    def on_mount(self) -> None:
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=ctx.run, args=(self._index_loop,), name=f"logview-index:{self.path.name}",
                                        daemon=True)
        self._thread.start()
        self._update_status()

    def on_unmount(self) -> None:
        self._stop.set()
        self._search_gen += 1
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1
        self._read = lambda offset, length: b""

    def _open_fd(self) -> None:
        self._close_fd()
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        self._read = fd_reader(self._fd)

    def _post(self, message: Message) -> None:
        try:
            self.post_message(message)
        except RuntimeError:  # the app's loop is gone
            self._stop.set()

    # ---- the indexer thread ---------------------------------------------------
    def _publish(self, index: LineIndex | None, *, reset: bool = False, shift: int = 0,
                 progress: float | None = None, error: str = "") -> None:
        with self._lock:
            self._index = index
            self._pending_reset |= reset
            self._pending_shift += shift
            self._progress = progress
            self._error = error
        if reset or index is None or not index.complete:
            self._complete.clear()
        self._post(self._Indexed())  # first, so the view has the index before a search's answer arrives
        if index is not None and index.complete:
            self._complete.set()

    def _index_loop(self) -> None:
        stop, lock, path = self._stop, self._lock, self.path
        fd, inode = -1, None
        idx: LineIndex | None = None  # the published index
        full: LineIndex | None = None  # the whole-file index being built while idx holds only the tail
        read: Reader = lambda offset, length: b""
        sig = b""  # the indexed part's first and last bytes: a file rewritten in place no longer has them
        error = ""
        try:
            while not stop.is_set():
                if fd < 0:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except OSError as e:
                        msg = f"waiting for {path}" if isinstance(e, FileNotFoundError) else f"cannot read {path}: {e.strerror}"
                        if msg != error:
                            error = msg
                            self._publish(None, reset=True, error=msg)
                        stop.wait(self.poll_interval)
                        continue
                    inode, read, error = os.fstat(fd).st_ino, fd_reader(fd), ""
                try:
                    st = os.stat(path)
                except OSError:
                    st = None  # removed: keep showing what was read
                if st is not None and st.st_ino != inode:  # replaced (log rotation, a fresh copy)
                    os.close(fd)
                    fd, idx, full = -1, None, None
                    continue
                size = os.fstat(fd).st_size
                if idx is not None and (size < idx.end or signature(read, idx.end) != sig):
                    idx, full = None, None  # truncated or rewritten in place: start again
                if idx is None:
                    base = line_start_before(read, size - self.tail_bytes) if size > self.tail_bytes else 0
                    idx = LineIndex(base)
                    self._feed(idx, read, size, lock, stop)
                    sig = signature(read, idx.end)
                    full = None if idx.complete else LineIndex(0)
                    self._publish(idx, reset=True, progress=None if full is None else 0.0)
                    continue
                if size > idx.end:
                    self._feed(idx, read, size, lock, stop, publish=full is None)
                    sig = signature(read, idx.end)
                    if full is None:
                        continue
                if full is not None:
                    deadline = time.monotonic() + INDEX_SLICE_S
                    while full.end < idx.end and time.monotonic() < deadline and not stop.is_set():
                        n = min(SCAN_CHUNK, idx.end - full.end)
                        full.feed(read(full.end, n), full.end)
                    if full.end >= idx.end:
                        shift = full.lines_before(idx.base, read)
                        idx, full = full, None
                        self._publish(idx, shift=shift)
                    else:
                        self._publish(idx, progress=full.end / max(1, idx.base))
                    continue
                stop.wait(self.poll_interval)
        except Exception as e:  # never let the thread die silently
            self._publish(idx, error=f"indexing stopped: {type(e).__name__}: {e}")
        finally:
            if fd >= 0:
                os.close(fd)

    def _feed(self, idx: LineIndex, read: Reader, size: int, lock: threading.Lock, stop: threading.Event,
              publish: bool = False) -> None:
        """Index ``[idx.end, size)`` chunk by chunk (publishing between chunks if asked)."""
        while idx.end < size and not stop.is_set():
            data = read(idx.end, min(SCAN_CHUNK, size - idx.end))
            if not data:
                break
            with lock:
                idx.feed(data, idx.end)
            if publish:
                self._publish(idx)

    # ---- the UI side of the index -------------------------------------------------
    def on_log_view__indexed(self, message: Message) -> None:
        message.stop()
        self._sync()

    def _sync(self) -> None:
        with self._lock:
            idx = self._index
            count = idx.line_count if idx is not None else 0
            self._indexed = idx is not None and idx.complete
            shift, self._pending_shift = self._pending_shift, 0
            reset, self._pending_reset = self._pending_reset, False
        if reset:
            self._open_fd()
            self._lines.clear()
            self._strips.clear()
            self._max_width = 0
            self._search_gen += 1  # a running search refers to the old file
            self._clear_match()
            self.search_state = ""
            self.following = True
        elif shift:
            self._lines.clear()
            self._strips.clear()
            if self.match_line is not None:
                self.match_line += shift
        old_y = self.scroll_y
        self._line_count = count
        self.virtual_size = Size(self._virtual_width(), count)
        if self.following:
            self._scroll_end()
        elif shift:
            self._set_scroll(y=old_y + shift)
        self.refresh()
        self._update_status()

    # ---- scrolling and following -----------------------------------------------------
    def _set_scroll(self, x: float | None = None, y: float | None = None) -> None:
        self._programmatic += 1
        try:
            self.scroll_to(x=x, y=y, animate=False, force=True)
        finally:
            self._programmatic -= 1

    def _scroll_end(self) -> None:
        self._set_scroll(y=self.max_scroll_y)

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if not self._programmatic:
            if new_value < old_value and new_value < self.max_scroll_y:
                self.following = False  # the user scrolled up
            elif new_value > old_value and new_value >= self.max_scroll_y:
                self.following = True  # ... and back down to the end
        self._update_status()

    def watch_following(self) -> None:
        self._update_status()
        if self.wrap:
            self.refresh()

    def watch_scroll_x(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_x(old_value, new_value)
        self._update_status()

    def on_resize(self) -> None:
        self.call_after_refresh(self._keep_following)

    def _keep_following(self) -> None:
        if self.following:
            self._scroll_end()

    def scroll_to_end(self) -> None:
        """Jump to the last line and follow the file."""
        self.following = True
        self._scroll_end()

    def scroll_to_top(self) -> None:
        """Jump to the first line (following stops)."""
        self.following = False
        self._set_scroll(y=0)

    def go_to_line(self, n: int) -> None:
        """Show line ``n`` (about a third down the view unless already visible); following stops."""
        self.following = False
        height = max(1, self.scrollable_content_region.height)
        if not self.scroll_y <= n < self.scroll_y + height:
            self._set_scroll(y=max(0, n - height // 3))

    # ---- rendering ----------------------------------------------------------------
    def _line(self, n: int) -> tuple[str, str, bool]:
        """(text, cut marker, settled) of line ``n``; a last line still being written is not settled."""
        hit = self._lines.get(n)
        if hit is not None:
            return hit
        with self._lock:
            idx = self._index
            if idx is None or not 0 <= n < idx.line_count:
                return "", "", False
            try:
                start, end = idx.line_span(n, self._read)
            except (IndexError, OSError):
                return "", "", False
            settled = n < idx.newlines
        length = end - start
        try:
            raw = self._read(start, min(length, CAP_BYTES))
        except OSError:
            return "", "", False
        text, cut = display_text(raw, length)
        line = (text, cut_marker(length) if cut else "", settled)
        if settled:
            self._lines.set(n, line)
        width = cell_len(text) + len(line[1])
        if width > self._max_width:
            self._max_width = width
            if not self._width_pending:
                self._width_pending = True
                self.call_later(self._apply_width)
        return line

    def _virtual_width(self) -> int:
        return 0 if self.wrap else self._max_width

    def _apply_width(self) -> None:
        self._width_pending = False
        self.virtual_size = Size(self._virtual_width(), self._line_count)

    def watch_wrap(self, wrap: bool) -> None:
        self.virtual_size = Size(self._virtual_width(), self._line_count)
        if wrap:
            self._set_scroll(x=0)
        if self.following:
            self._scroll_end()
        self.refresh()
        self._update_status()

    def render_lines(self, crop):
        self._layout = None  # with wrap, laid out once per paint (from the top line, or up from the end)
        return super().render_lines(crop)

    def _wrap_layout(self) -> list[tuple[int, int]]:
        """(line, first cell) of each screen row with wrap on: from the top line down; while following the end,
        from the last line up, so that the end is on screen however long the last lines are."""
        region = self.scrollable_content_region  # without the scrollbar: no text hides under it
        width = max(1, region.width)
        height = max(1, region.height)
        count = self._line_count
        top = int(self.scroll_y)

        def rows_of(n: int) -> list[tuple[int, int]]:
            text, marker, _ = self._line(n)
            cells = cell_len(text) + len(marker)
            return [(n, x) for x in range(0, max(cells, 1), width)]

        rows: list[tuple[int, int]] = []
        if count and self.following:
            n = count - 1
            while n >= 0 and len(rows) < height:
                rows[:0] = rows_of(n)
                n -= 1
            return rows[-height:]
        n = top
        while n < count and len(rows) < height:
            rows.extend(rows_of(n))
            n += 1
        return rows[:height]

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        n = scroll_y + y
        width = self.size.width
        base_style = self.rich_style
        if self.wrap:
            layout_key = (scroll_y, self.scrollable_content_region.size, self._line_count, self.following)
            if self._layout is None or layout_key != self._layout_key:
                self._layout, self._layout_key = self._wrap_layout(), layout_key
            if y >= len(self._layout):
                return Strip.blank(width, base_style)
            n, scroll_x = self._layout[y]
        if n >= self._line_count:
            return Strip.blank(width, base_style)
        key = (n, n == self.match_line, self.search_query if self.search_state == "found" else "")
        strip = self._strips.get(key)
        if strip is None:
            text, marker, settled = self._line(n)
            rich_text = Text(text, no_wrap=True, end="")
            rich_text.stylize(base_style)
            if key[1]:
                rich_text.stylize(self.get_component_rich_style("logview--match-line"))
            if key[2]:
                match_style = self.get_component_rich_style("logview--match")
                lower, q = text.lower(), key[2].lower()
                i = lower.find(q)
                while i >= 0 and q:
                    rich_text.stylize(match_style, i, i + len(q))
                    i = lower.find(q, i + len(q))
            if marker:
                rich_text.append(marker, self.get_component_rich_style("logview--cut"))
            strip = Strip(rich_text.render(self.app.console), rich_text.cell_len)
            if settled:
                self._strips.set(key, strip)
            if self.first_paint is None and text:
                self.first_paint = time.perf_counter()
        pad = self.get_component_rich_style("logview--match-line") if key[1] else base_style
        return strip.crop_extend(scroll_x, scroll_x + width, pad)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()

    # ---- search -------------------------------------------------------------------
    def _current_offset(self) -> int:
        """Byte offset of the first visible line (where a new search starts)."""
        with self._lock:
            idx = self._index
            if idx is None or not idx.line_count:
                return 0
            try:
                return idx.line_span(min(self.top_line, idx.line_count - 1), self._read)[0]
            except (IndexError, OSError):
                return 0

    def search(self, query: str, *, backward: bool = False) -> None:
        """Find ``query`` (ignoring ASCII case) from the first visible line on, wrapping around the file."""
        self.search_query = query
        self._clear_match()
        if not query:
            self._search_gen += 1
            self.search_state = ""
            self._update_status()
            return
        self._start_search(self._current_offset(), backward)

    def search_next(self) -> None:
        """The match after the current one (or the first from the view's top)."""
        if not self.search_query:
            return
        start = self.match_offset + 1 if self.match_offset is not None else self._current_offset()
        self._start_search(start, backward=False)

    def search_previous(self) -> None:
        if not self.search_query:
            return
        start = self.match_offset if self.match_offset is not None else self._current_offset()
        self._start_search(start, backward=True)

    def _clear_match(self) -> None:
        self.match_offset = self.match_line = self.match_ordinal = self.match_total = None
        self.match_wrapped = False
        self._strips.clear()

    def _start_search(self, start: int, backward: bool) -> None:
        self._search_gen += 1
        gen = self._search_gen
        self.search_state = "searching" if self.indexed else "waiting"
        self._update_status()
        ctx = contextvars.copy_context()
        threading.Thread(target=ctx.run, args=(self._search_thread, gen, self.search_query, start, backward),
                         name="logview-search", daemon=True).start()

    def _search_thread(self, gen: int, query: str, start: int, backward: bool) -> None:
        def alive() -> bool:
            return gen == self._search_gen and not self._stop.is_set()

        while not self._complete.wait(0.05):  # offsets become line numbers with the whole file indexed
            if not alive():
                return
        with self._lock:
            size = self._index.end if self._index is not None else 0
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            self._post(self._SearchDone(gen, None, False))
            return
        try:
            read = fd_reader(fd)
            needle = query.encode("utf-8", "replace").lower()
            start = min(start, size)
            wrapped = False
            if backward:
                found = find_backward(read, needle, 0, start, size, alive)
                if found is None and alive():
                    found, wrapped = find_backward(read, needle, start, size, size, alive), True
            else:
                found = find_forward(read, needle, start, size, size, alive)
                if found is None and alive():
                    found, wrapped = find_forward(read, needle, 0, start, size, alive), True
            if not alive():
                return
            self._post(self._SearchDone(gen, found, wrapped))
            if found is None:
                return
            before = count_matches(read, needle, 0, found, size, alive)
            after = count_matches(read, needle, found, size, size, alive) if before is not None else None
            if before is not None and after is not None:
                self._post(self._SearchCounted(gen, before + 1, before + max(after, 1)))
        finally:
            os.close(fd)

    def on_log_view__search_done(self, message: "LogView._SearchDone") -> None:
        message.stop()
        if message.gen != self._search_gen:
            return
        self._clear_match()
        if message.offset is None:
            self.search_state = "not found"
        else:
            with self._lock:
                idx = self._index
                line = idx.line_of_offset(message.offset, self._read) if idx is not None else 0
            self.search_state = "found"
            self.match_offset, self.match_line, self.match_wrapped = message.offset, line, message.wrapped
            self.go_to_line(line)
        self.refresh()
        self._update_status()

    def on_log_view__search_counted(self, message: "LogView._SearchCounted") -> None:
        message.stop()
        if message.gen == self._search_gen:
            self.match_ordinal, self.match_total = message.ordinal, message.total
            self._update_status()

    # ---- status ---------------------------------------------------------------------
    @property
    def status(self) -> Text:
        """One line: where the view is, following or paused, the search."""
        with self._lock:
            error = self._error
            progress = self._progress
            has_index = self._index is not None
        parts: list[Text] = []
        if not has_index:
            return Text(error or f"opening {self.path} …", style="italic")
        count = self._line_count
        if not count:
            parts.append(Text("empty file"))
        else:
            height = max(1, self.scrollable_content_region.height)
            current = self.top_line
            if self.match_line is not None and self.top_line <= self.match_line < self.top_line + height:
                current = self.match_line
            if self.indexed:
                parts.append(Text(f"line {current + 1:,} of {count:,}"))
            else:
                pct = f" · indexing {progress:.0%}" if progress is not None else " · indexing"
                parts.append(Text(f"line {current + 1:,} of the last {count:,}{pct}"))
        parts.append(Text("following", style="bold green") if self.following else Text("paused", style="bold yellow"))
        if self.wrap:
            parts.append(Text("wrap"))
        elif self.scroll_x:
            parts.append(Text(f"column {int(self.scroll_x) + 1:,}"))
        q = self.search_query
        if self.search_state == "waiting":
            parts.append(Text(f"“{q}”: waiting for the index …"))
        elif self.search_state == "searching":
            parts.append(Text(f"searching “{q}” …"))
        elif self.search_state == "not found":
            parts.append(Text(f"“{q}” not found", style="bold red"))
        elif self.search_state == "found":
            if self.match_ordinal is not None:
                found = f"match {self.match_ordinal:,} of {self.match_total:,}"
            else:
                found = "match (counting …)"
            parts.append(Text(f"{found} · “{q}”" + (" (wrapped)" if self.match_wrapped else "")))
        if error:
            parts.append(Text(error, style="bold red"))
        return Text(" · ").join(parts)

    def _update_status(self) -> None:
        if not self.is_mounted:
            return
        status = self.status
        if status.plain != self._status_plain:
            self._status_plain = status.plain
            self.post_message(self.StatusChanged(self, status))


class LogLines(Sequence[str]):
    """The lines of a :class:`LogView` as a sequence, read lazily from its file."""

    def __init__(self, view: LogView) -> None:
        self._view = view

    def __len__(self) -> int:
        return self._view.line_count

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._view.get_line(i)

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self._view.get_line(i)
