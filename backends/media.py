"""A run's media (images, tables, histograms, confusion matrices, text), read on the workstation.

Two sources, one shape (:class:`MediaEntry`, by key and step):

* what ``labdeck.log({"k": labdeck.Image(...)})`` wrote inside the job (``backends/runtime/labdeck.py``):
  files ``<run dir>/media/<key dir>/<step>.png|jpg|gif|json|txt`` and an append-only
  ``<run dir>/media/index.jsonl``, one JSON object a line::

      {"key": "samples", "step": 3, "kind": "image", "file": "samples/3.png", "size": 2711,
       "t": 1718000000.1, "caption": "epoch 3", "w": 64, "h": 64}
      {"key": "samples", "step": 1, "file": "samples/1.png", "deleted": true}

  :class:`MediaIndex` parses it from byte chunks (it grows as the job runs). Everything in it is
  untrusted: lines are bounded, every field is checked, and ``file`` must have exactly the layout
  the in-job module writes (``<[A-Za-z0-9_%-]+>/<int>.<ext>``: no ``..``, no ``/`` at the start, no
  link followed); the cached copy is built with :func:`backends.localfiles.confined`.
  :class:`RunMedia` mirrors the index over the run's transport and fetches a file only when it
  is asked for (what is on screen), into a private local cache, bounded in size.

* TensorBoard event files (images, histograms, text), through
  :class:`backends.tbevents.TFEventsParser` with ``media=True``, from the local copies the
  monitor keeps: a TensorBoard-logging script needs no change. Their payloads come inline.

Decoders for what is drawn: :func:`decode_png` (stdlib zlib, bounded: 8-bit and 16-bit gray,
gray+alpha, RGB, RGBA and palette images, not interlaced), :func:`table_doc`,
:func:`histogram_doc`, :func:`confusion_doc` (validated, bounded JSON) and :func:`text_doc`.

Stdlib only.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import LabdeckError
from .localfiles import confined, private_dirs, run_cache_path, write_private

__all__ = ["KINDS", "MediaEntry", "MediaIndex", "RunMedia", "decode_png", "table_doc", "histogram_doc",
           "confusion_doc", "text_doc", "nearest_step", "tensorboard_media", "MediaError", "MAX_ITEM_BYTES",
           "ReportMedia", "report_item", "report_media", "parse_media_choice", "image_mime", "rebin_histogram",
           "load_run_media", "TensorBoardMedia"]

KINDS = ("image", "table", "histogram", "confusion", "text")
MAX_LINE = 64 << 10  # an index line longer than this is skipped
MAX_KEYS = 2000
MAX_STEPS_PER_KEY = 20_000
MAX_ENTRIES = 200_000  # entries in all (the SDK keeps at most 500 keys × 200 steps)
MAX_INDEX_BYTES = 256 << 20  # of media/index.jsonl mirrored and read; past that it is not followed
MAX_ITEM_BYTES = 16 << 20  # a media file larger than this is not fetched
MAX_PIXELS = 4096 * 4096
#: Pixel data (decompressed, filtered rows) a PNG may have to be decoded: the decoder is pure Python, so
#: this bounds its time (about 10 s for the costliest filters) and memory, whatever the file's size.
MAX_PNG_RAW = 32 << 20
MAX_CACHE_BYTES = 512 << 20  # the local cache of one run's media files
INGEST_SLICE = 128 << 10  # index bytes parsed by refresh between two turns of the event loop (~25 ms)
_FILE_RX = re.compile(r"([A-Za-z0-9_%-]{1,240})/(-?[0-9]{1,20})\.(png|jpg|gif|json|txt)\Z")
_EXT_KIND = {"png": "image", "jpg": "image", "gif": "image", "json": ("table", "histogram", "confusion"), "txt": "text"}


class MediaError(LabdeckError):
    """A media file that cannot be shown (malformed, too large, an unsupported format)."""


@dataclass(frozen=True, slots=True)
class MediaEntry:
    """One media item: ``key`` at ``step``. ``file``: its path under the run's ``media/`` (run
    media), or None with the payload in ``inline`` (TensorBoard media)."""

    key: str
    step: int
    kind: str
    file: str | None = None
    size: int = 0
    caption: str | None = None
    w: int | None = None
    h: int | None = None
    t: float | None = None
    source: str = "labdeck"  # or "tensorboard"
    inline: Any = field(default=None, compare=False, repr=False)


def _int(x: Any) -> int | None:
    return x if type(x) is int else None


class MediaIndex:
    """The entries of ``media/index.jsonl``, fed in byte chunks (a partial last line waits).

    ``keys()`` in order of first sight; ``steps(key)`` sorted; ``get(key, step)``. Never raises on
    bad input; skipped lines are counted in ``warnings`` by kind ("invalid JSON line", "line too
    long", "invalid entry", "invalid file", "too many keys", "too many steps")."""

    def __init__(self) -> None:
        self.warnings: Counter = Counter()
        self._by_key: dict[str, dict[int, MediaEntry]] = {}
        self._sorted: dict[str, list[int]] = {}
        self._buf = bytearray()
        self._skipping = False
        self._n = 0  # entries held

    def feed(self, data: bytes) -> int:
        """Parse the complete lines ``data`` finishes; returns the entries added or removed."""
        n = 0
        buf = self._buf
        start = 0
        while True:
            j = data.find(b"\n", start)
            if j < 0:
                rest = data[start:]
                if not self._skipping:
                    if len(buf) + len(rest) > MAX_LINE:
                        self.warnings["line too long"] += 1
                        buf.clear()
                        self._skipping = True
                    else:
                        buf += rest
                return n
            piece = data[start:j]
            start = j + 1
            if self._skipping:
                self._skipping = False
                continue
            if len(buf) + len(piece) > MAX_LINE:
                self.warnings["line too long"] += 1
                buf.clear()
                continue
            line = bytes(buf) + piece if buf else piece
            buf.clear()
            n += self._line(line)

    def _line(self, line: bytes) -> int:
        line = line.strip()
        if not line:
            return 0
        try:
            doc = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self.warnings["invalid JSON line"] += 1
            return 0
        if type(doc) is not dict:
            self.warnings["invalid entry"] += 1
            return 0
        key, step, rel = doc.get("key"), _int(doc.get("step")), doc.get("file")
        if type(key) is not str or not key or len(key) > 200 or step is None or not -2**63 <= step < 2**63:
            self.warnings["invalid entry"] += 1
            return 0
        m = _FILE_RX.match(rel) if type(rel) is str else None
        if m is None or int(m.group(2)) != step:
            self.warnings["invalid file"] += 1
            return 0
        steps = self._by_key.get(key)
        if doc.get("deleted") is True:
            if steps and steps.get(step) is not None and steps[step].file == rel:
                del steps[step]
                self._n -= 1
                self._sorted.pop(key, None)
                return 1
            return 0
        kind = doc.get("kind")
        want = _EXT_KIND[m.group(3)]
        if kind not in KINDS or (kind != want and kind not in want):
            self.warnings["invalid entry"] += 1
            return 0
        size = _int(doc.get("size"))
        if size is None or size < 0:
            self.warnings["invalid entry"] += 1
            return 0
        cap = doc.get("caption")
        cap = cap[:1000] if type(cap) is str else None
        t = doc.get("t")
        t = float(t) if type(t) in (int, float) and math.isfinite(t) else None
        w, h = _int(doc.get("w")), _int(doc.get("h"))
        return self._put(MediaEntry(key, step, kind, rel, size, cap, w if w and w > 0 else None,
                                    h if h and h > 0 else None, t))

    def add(self, entry: MediaEntry) -> None:
        """Add an entry from another source (TensorBoard), under the same caps."""
        self._put(entry)

    def _put(self, entry: MediaEntry) -> int:
        """Hold ``entry`` (replacing its key's entry at that step) unless a cap refuses it: 1 or 0."""
        steps = self._by_key.get(entry.key)
        if steps is None:
            if len(self._by_key) >= MAX_KEYS:
                self.warnings["too many keys"] += 1
                return 0
            steps = self._by_key[entry.key] = {}
        if entry.step not in steps:
            if len(steps) >= MAX_STEPS_PER_KEY:
                self.warnings["too many steps"] += 1
                return 0
            if self._n >= MAX_ENTRIES:
                self.warnings["too many entries"] += 1
                return 0
            self._n += 1
        steps[entry.step] = entry
        self._sorted.pop(entry.key, None)
        return 1

    def keys(self) -> list[str]:
        return [k for k, v in self._by_key.items() if v]

    def steps(self, key: str) -> list[int]:
        s = self._sorted.get(key)
        if s is None:
            s = self._sorted[key] = sorted(self._by_key.get(key, ()))
        return s

    def get(self, key: str, step: int) -> MediaEntry | None:
        return self._by_key.get(key, {}).get(step)

    def latest(self, key: str) -> MediaEntry | None:
        s = self.steps(key)
        return self.get(key, s[-1]) if s else None

    def nearest(self, key: str, step: int) -> MediaEntry | None:
        """The entry of ``key`` at ``step``, or at the step nearest to it (the earlier on a tie)."""
        s = nearest_step(self.steps(key), step)
        return None if s is None else self.get(key, s)

    def at_or_before(self, key: str, step: int) -> MediaEntry | None:
        """The entry of ``key`` at the latest step at or below ``step``; when every step of the key is
        above ``step``, its earliest one (the caller labels the item with the step it really has)."""
        import bisect

        s = self.steps(key)
        if not s:
            return None
        i = bisect.bisect_right(s, step)
        return self.get(key, s[i - 1] if i else s[0])

    def __len__(self) -> int:
        return self._n


def nearest_step(steps: list[int], step: int) -> int | None:
    """The element of the sorted ``steps`` nearest ``step`` (the smaller on a tie); None if empty."""
    if not steps:
        return None
    import bisect

    i = bisect.bisect_left(steps, step)
    if i == 0:
        return steps[0]
    if i == len(steps):
        return steps[-1]
    a, b = steps[i - 1], steps[i]
    return a if step - a <= b - step else b


# ---- TensorBoard ---------------------------------------------------------------------------
class TensorBoardMedia:
    """Follows local copies of event files for their media, reading only what each file gained since
    the last :meth:`update` (a parser per file). At most ``max_bytes`` of payloads in all: past that
    further items are left out and counted ("media dropped (over the cap)")."""

    def __init__(self, *, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.warnings: Counter = Counter()
        self._files: dict[str, tuple[int, Any]] = {}  # path -> (offset read, parser)

    def update(self, files: Iterable[tuple[Path, str]]) -> list[MediaEntry]:
        """The new media of ``files`` ((local path, TensorBoard run) pairs)."""
        from .tbevents import TFEventsParser

        out: list[MediaEntry] = []
        for path, run in files:
            key = str(path)
            offset, p = self._files.get(key, (0, None))
            if p is None:
                p = TFEventsParser(run=run, media=True, max_media_bytes=self.max_bytes)
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        offset += len(chunk)
                        p.feed(chunk)
            except OSError:
                self.warnings["event file unreadable"] += 1
                continue
            self._files[key] = (offset, p)
            for m in p.media or ():
                e = _tb_entry(m)
                if self.bytes + e.size > self.max_bytes:
                    self.warnings["media dropped (over the cap)"] += 1
                    continue
                self.bytes += e.size
                out.append(e)
            if p.media:
                p.media.clear()
                p.media_bytes = 0
        return out

    def parser_warnings(self) -> Counter:
        out = Counter(self.warnings)
        for _, p in self._files.values():
            out += p.warnings
        return out


def _tb_entry(m) -> MediaEntry:
    if m.kind == "image":
        enc = m.data["encoded"]
        return MediaEntry(m.name, m.step, "image", None, len(enc), None, m.data["w"] or None, m.data["h"] or None,
                          m.t, "tensorboard", enc)
    if m.kind == "histogram":
        return MediaEntry(m.name, m.step, "histogram", None, 64 * len(m.data["counts"]), None, None, None, m.t,
                          "tensorboard", m.data)
    return MediaEntry(m.name, m.step, "text", None, len(m.data["text"]), None, None, None, m.t, "tensorboard",
                      m.data["text"])


def tensorboard_media(files: Iterable[tuple[Path, str]], *, max_bytes: int = 256 << 20) -> tuple[list[MediaEntry], Counter]:
    """The media of local copies of event files: ``files`` are (local path, TensorBoard run) pairs.
    Keys are named as the scalars are (:func:`backends.tbevents.series_name`)."""
    tb = TensorBoardMedia(max_bytes=max_bytes)
    entries = tb.update(files)
    return entries, tb.parser_warnings()


# ---- fetching over the run's transport -------------------------------------------------------
class RunMedia:
    """One run's media: the index mirrored from the instance, files fetched on demand and cached.

    ``await refresh(transport)`` brings the index up to date (cheap when nothing changed);
    ``await load(transport, entry)`` returns the file's bytes (from the cache, or read over the
    transport in bounded chunks and cached 0600 under ``<cache root>/<user>/<RUN ID>/``)."""

    def __init__(self, run, cache_root: Path) -> None:
        self.run = run
        self.index = MediaIndex()
        base = run_cache_path(Path(cache_root), run.user, run.id, "")
        self.dir = base
        self.index_path = confined(base, "index.jsonl")
        self._read = 0  # bytes of the local index copy parsed
        self._mem: dict[tuple[str, int], bytes] = {}  # small in-memory cache of decoded-ready bytes
        self._mem_bytes = 0

    @property
    def remote_dir(self) -> str:
        return f"{self.run.run_dir.rstrip('/')}/media"

    async def refresh(self, transport) -> int:
        """Mirror ``media/index.jsonl`` and parse what is new; returns entries changed (0 if none yet)."""
        from .follow import MissingFile, mirror
        from .localfiles import RefusedFile

        try:
            await mirror(transport, f"{self.remote_dir}/index.jsonl", self.index_path, limit=MAX_INDEX_BYTES,
                         inside=self.run.run_dir)
        except (MissingFile, RefusedFile):
            return 0
        except LabdeckError as e:
            if "shrank" not in str(e):
                raise
            self.index_path.unlink(missing_ok=True)  # replaced: read it again from the start
            self.index = MediaIndex()
            self._read = 0
            await mirror(transport, f"{self.remote_dir}/index.jsonl", self.index_path, limit=MAX_INDEX_BYTES,
                         inside=self.run.run_dir)
        # a slice at a time, the event loop let run between slices: the TUI refreshes on its loop, and
        # an index of the SDK's most entries (~9 MB) took seconds to parse in one go (a teammate's may
        # be MAX_INDEX_BYTES). A cancel between slices leaves _read at what was fed: the next goes on.
        n = 0
        while True:
            before = self._read
            n += self.ingest_local(INGEST_SLICE)
            if self._read - before < INGEST_SLICE:
                return n
            await asyncio.sleep(0)

    def ingest_local(self, most: int = MAX_INDEX_BYTES) -> int:
        """Parse up to ``most`` more bytes of the local index copy; entries changed."""
        n = fed = 0
        try:
            with open(self.index_path, "rb") as f:
                f.seek(self._read)
                while self._read < MAX_INDEX_BYTES and fed < most:  # in chunks: the index is the job's, of any size
                    data = f.read(min(1 << 20, MAX_INDEX_BYTES - self._read, most - fed))
                    if not data:
                        break
                    self._read += len(data)
                    fed += len(data)
                    n += self.index.feed(data)
        except FileNotFoundError:
            return 0
        if self._read >= MAX_INDEX_BYTES and not self.index.warnings["index too large (not followed further)"]:
            self.index.warnings["index too large (not followed further)"] += 1
        return n

    def add_tensorboard(self, entries: Iterable[MediaEntry]) -> None:
        for e in entries:
            self.index.add(e)

    def cached(self, entry: MediaEntry) -> bytes | None:
        """The bytes of ``entry`` if they need no fetch (inline, in memory or in the local cache)."""
        if entry.inline is not None:
            return entry.inline if isinstance(entry.inline, bytes) else None
        got = self._mem.get((entry.key, entry.step))
        if got is not None:
            return got
        path = self._cache_path(entry)
        try:
            if path.stat().st_size == entry.size:
                data = path.read_bytes()
                self._remember(entry, data)
                return data
        except OSError:
            pass
        return None

    async def load(self, transport, entry: MediaEntry) -> bytes:
        """The bytes of ``entry``: cached, or fetched over ``transport`` (MediaError if too large)."""
        got = self.cached(entry)
        if got is not None:
            return got
        if entry.file is None:
            raise MediaError(f"No file for {entry.key!r} at step {entry.step}.")
        if entry.size > MAX_ITEM_BYTES:
            raise MediaError(f"{entry.key!r} at step {entry.step} is {entry.size:,} bytes: over the "
                             f"{MAX_ITEM_BYTES >> 20} MiB a media file may have.", "Copy it with labdeck fetch.")
        remote = f"{self.remote_dir}/{entry.file}"
        parts: list[bytes] = []
        offset = 0
        while True:
            chunk = await transport.read_file(remote, offset, 1 << 20, inside=self.run.run_dir)
            if chunk.size > MAX_ITEM_BYTES:
                raise MediaError(f"{entry.key!r} at step {entry.step} grew past {MAX_ITEM_BYTES >> 20} MiB.")
            if not chunk.data:
                break
            parts.append(chunk.data)
            offset += len(chunk.data)
            if offset >= chunk.size or offset > MAX_ITEM_BYTES:
                break
        data = b"".join(parts)
        self._store(entry, data)
        return data

    def _cache_path(self, entry: MediaEntry) -> Path:
        assert entry.file is not None
        kdir, name = entry.file.split("/")
        return confined(self.dir, kdir, name)

    def _store(self, entry: MediaEntry, data: bytes) -> None:
        self._remember(entry, data)
        path = self._cache_path(entry)
        private_dirs(path)
        path.parent.chmod(0o700)
        self._trim_cache(len(data))
        write_private(path, data)

    def _remember(self, entry: MediaEntry, data: bytes) -> None:
        if len(data) > 4 << 20:
            return
        self._mem[(entry.key, entry.step)] = data
        self._mem_bytes += len(data)
        while self._mem_bytes > 64 << 20 and self._mem:
            k = next(iter(self._mem))
            self._mem_bytes -= len(self._mem.pop(k))

    def _trim_cache(self, incoming: int) -> None:
        """Keep the run's cache under MAX_CACHE_BYTES: the least recently written files go first."""
        files = []
        total = incoming
        for p in self.dir.glob("*/*"):
            try:
                st = p.lstat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
            total += st.st_size
        files.sort()
        for _, size, p in files:
            if total <= MAX_CACHE_BYTES:
                break
            p.unlink(missing_ok=True)
            total -= size


# ---- decoding what is shown -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Pixels:
    """Decoded 8-bit RGB pixels: ``rgb`` holds ``h`` rows of ``w`` × 3 bytes (alpha composited on black)."""

    w: int
    h: int
    rgb: bytes


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def decode_png(data: bytes, *, max_pixels: int = MAX_PIXELS, max_raw: int = MAX_PNG_RAW) -> Pixels:
    """The pixels of a PNG (MediaError for anything malformed, interlaced, over ``max_pixels`` or
    over ``max_raw`` bytes of pixel data: a file of a few hundred KiB may hold gigabytes of zeros)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise MediaError("Not a PNG file.")
    i = 8
    n = len(data)
    ihdr = None
    plte = b""
    trns = b""
    idat = []
    while i + 8 <= n:
        length, tag = struct.unpack_from(">I4s", data, i)
        body = data[i + 8:i + 8 + length]
        if len(body) != length:
            raise MediaError("A truncated PNG.")
        i += 12 + length
        if tag == b"IHDR":
            ihdr = body
        elif tag == b"PLTE":
            plte = body
        elif tag == b"tRNS":
            trns = body
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    if ihdr is None or len(ihdr) != 13:
        raise MediaError("A PNG without its header.")
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    if not w or not h or w * h > max_pixels:
        raise MediaError(f"A PNG of {w}×{h} pixels: over the {max_pixels:,} shown.")
    if interlace:
        raise MediaError("An interlaced PNG: not shown here.")
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
    if channels is None or depth not in {0: (1, 2, 4, 8, 16), 3: (1, 2, 4, 8)}.get(color, (8, 16)):
        raise MediaError(f"A PNG of color type {color}, depth {depth}: not supported.")
    bits = channels * depth
    stride = (w * bits + 7) // 8
    bpp = max(1, bits // 8)
    want = (stride + 1) * h
    if want > max_raw:
        raise MediaError(f"A PNG of {w}×{h} pixels at {bits} bits a pixel: over the {max_raw >> 20} MiB of pixel "
                         "data drawn here.")
    d = zlib.decompressobj()
    try:
        raw = d.decompress(b"".join(idat), want + 1)
    except zlib.error as e:
        raise MediaError(f"A corrupt PNG ({e}).") from None
    if len(raw) < want:
        raise MediaError("A truncated PNG.")
    out = bytearray(stride * h)
    prev = bytearray(stride)
    pos = 0
    for y in range(h):
        f = raw[pos]
        line = bytearray(raw[pos + 1:pos + 1 + stride])
        pos += 1 + stride
        if f == 1:
            for x in range(bpp, stride):
                line[x] = (line[x] + line[x - bpp]) & 0xFF
        elif f == 2:
            for x in range(stride):
                line[x] = (line[x] + prev[x]) & 0xFF
        elif f == 3:
            for x in range(stride):
                left = line[x - bpp] if x >= bpp else 0
                line[x] = (line[x] + ((left + prev[x]) >> 1)) & 0xFF
        elif f == 4:
            for x in range(stride):
                left = line[x - bpp] if x >= bpp else 0
                ul = prev[x - bpp] if x >= bpp else 0
                line[x] = (line[x] + _paeth(left, prev[x], ul)) & 0xFF
        elif f != 0:
            raise MediaError(f"A PNG row with filter {f}.")
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return Pixels(w, h, bytes(_to_rgb(out, w, h, stride, depth, color, channels, plte, trns)))


def _samples(row: bytes, w: int, depth: int, n: int) -> list[int]:
    """``w × n`` samples of ``depth`` bits from one unfiltered row (16-bit: the high byte)."""
    if depth == 8:
        return list(row[:w * n])
    if depth == 16:
        return list(row[0:2 * w * n:2])
    per = 8 // depth
    mask = (1 << depth) - 1
    out = []
    for x in range(w * n):
        b = row[x // per]
        out.append((b >> (8 - depth * (x % per + 1))) & mask)
    return out


def _to_rgb(buf: bytes, w: int, h: int, stride: int, depth: int, color: int, ch: int, plte: bytes,
            trns: bytes) -> bytearray:
    out = bytearray(w * h * 3)
    o = 0
    scale = 255 // ((1 << depth) - 1) if depth < 8 else 1
    for y in range(h):
        s = _samples(buf[y * stride:(y + 1) * stride], w, depth, ch)
        if color == 3:
            for x in range(w):
                j = s[x] * 3
                r, g, b = (plte[j], plte[j + 1], plte[j + 2]) if j + 2 < len(plte) else (0, 0, 0)
                a = trns[s[x]] if s[x] < len(trns) else 255
                out[o:o + 3] = bytes(((r * a) // 255, (g * a) // 255, (b * a) // 255))
                o += 3
        elif color == 0:
            for x in range(w):
                v = s[x] * scale
                out[o:o + 3] = bytes((v, v, v))
                o += 3
        elif color == 4:
            for x in range(w):
                v = (s[2 * x] * s[2 * x + 1]) // 255
                out[o:o + 3] = bytes((v, v, v))
                o += 3
        elif color == 2:
            out[o:o + 3 * w] = bytes(s[:3 * w])
            o += 3 * w
        else:
            for x in range(w):
                a = s[4 * x + 3]
                out[o:o + 3] = bytes(((s[4 * x] * a) // 255, (s[4 * x + 1] * a) // 255, (s[4 * x + 2] * a) // 255))
                o += 3
    return out


def _json(data: bytes, what: str) -> dict:
    if len(data) > MAX_ITEM_BYTES:
        raise MediaError(f"A {what} of {len(data):,} bytes: too large to show.")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MediaError(f"A {what} file that is not valid JSON.") from None
    if type(doc) is not dict:
        raise MediaError(f"A {what} file that is not a JSON object.")
    return doc


def _scalar(x: Any) -> str | int | float | None:
    if x is None or type(x) in (int, float, bool):
        return x
    if type(x) is str:
        return x[:1000]
    return json.dumps(x)[:1000]


def table_doc(data: bytes) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of a table file: at most 200 columns and 10,000 rows, cells scalar."""
    doc = _json(data, "table")
    cols, rows = doc.get("columns"), doc.get("rows")
    if type(cols) is not list or type(rows) is not list:
        raise MediaError("A table without columns and rows.")
    cols = [str(c)[:200] for c in cols[:200]]
    out = []
    for r in rows[:10_000]:
        if type(r) is not list:
            continue
        r = [_scalar(x) for x in r[:len(cols)]]
        out.append(r + [None] * (len(cols) - len(r)))
    return cols, out


def _numbers(x: Any, n: int) -> list[float]:
    if type(x) is not list or len(x) > n:
        raise MediaError("A histogram with malformed or too many bins.")
    out = []
    for v in x:
        if type(v) not in (int, float) or not math.isfinite(v):
            raise MediaError("A histogram with a value that is not a finite number.")
        out.append(float(v))
    return out


def histogram_doc(data: bytes | dict) -> dict:
    """{"edges", "counts", "n"} of a histogram (file bytes, or TensorBoard's dict), validated."""
    doc = _json(data, "histogram") if isinstance(data, (bytes, bytearray)) else data
    counts = _numbers(doc.get("counts"), 100_000)
    edges = _numbers(doc.get("edges"), 100_001)
    if counts and len(edges) != len(counts) + 1:
        raise MediaError("A histogram whose edges do not match its counts.")
    return {"edges": edges, "counts": counts, "n": sum(counts)}


def confusion_doc(data: bytes) -> tuple[list[str], list[list[int]]]:
    """(labels, matrix) of a confusion-matrix file: square, at most 200 classes, counts ≥ 0."""
    doc = _json(data, "confusion matrix")
    labels, m = doc.get("labels"), doc.get("matrix")
    if type(labels) is not list or type(m) is not list or len(labels) > 200 or len(m) != len(labels):
        raise MediaError("A confusion matrix whose labels and rows do not match.")
    rows = []
    for r in m:
        if type(r) is not list or len(r) != len(labels) or any(type(v) is not int or v < 0 for v in r):
            raise MediaError("A confusion matrix with a malformed row.")
        rows.append(r)
    return [str(x)[:100] for x in labels], rows


def text_doc(data: bytes | str) -> str:
    """A text item as a str (at most 1 MiB shown)."""
    if isinstance(data, str):
        return data[:1 << 20]
    return data[:1 << 20].decode("utf-8", "replace")


def item_doc(kind: str, data: bytes | str) -> Any:
    """A table, histogram, confusion matrix or text item read from a run, checked and parsed (images
    are decoded by :func:`decode_png`). Views call it in a thread: a teammate's 16 MiB table takes
    about 0.8 s to check."""
    return {"table": table_doc, "histogram": histogram_doc, "confusion": confusion_doc}.get(kind, text_doc)(data)


# ---- for the stakeholder report ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReportMedia:
    """One media item as the report embeds it: ``data`` is the image file's bytes (PNG/JPEG/GIF),
    ``(columns, rows)`` of a table, ``(labels, matrix)`` of a confusion matrix, a histogram's
    ``{"edges", "counts", "n"}`` or a text's str (all validated by the ``*_doc`` functions)."""

    key: str
    step: int
    kind: str
    data: Any
    caption: str | None = None
    asked: int | None = None  # the step asked for (``--media KEY@STEP``) when it is not ``step``


def report_item(entry: MediaEntry, raw: Any, asked: int | None = None) -> ReportMedia:
    """A :class:`ReportMedia` from an entry and its bytes (MediaError if they do not validate);
    ``asked``: the step the report asked for, kept when the entry's step differs from it."""
    k = entry.kind
    if k == "image":
        if not isinstance(raw, bytes) or image_mime(raw) is None:
            raise MediaError("Not a PNG, JPEG or GIF image.")
        data: Any = raw
    else:
        data = item_doc(k, raw)
    return ReportMedia(entry.key, entry.step, k, data, entry.caption,
                       asked if asked is not None and asked != entry.step else None)


def image_mime(data: bytes) -> str | None:
    """The MIME type of an image from its first bytes (PNG, JPEG, GIF), else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def parse_media_choice(text: str) -> tuple[str, int | None]:
    """``KEY``, ``KEY@STEP`` or ``KEY@latest`` (as ``labdeck report --media`` takes it) as
    ``(key, step or None)``. The last ``@`` separates the step, so a key that itself holds an ``@``
    is written ``KEY@latest``. MediaError (saying what to write) for an empty key or a step that is
    not a whole number."""
    key, sep, tail = text.rpartition("@")
    if not sep:
        key, tail = text, None
    if not key:
        raise MediaError(f"{text!r} names no key: write KEY, KEY@STEP or KEY@latest.")
    if tail is None or tail == "latest":
        return key, None
    t = tail.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,19}", t) or not -2**63 <= int(t) < 2**63:
        raise MediaError(f"{text!r}: the step after '@' must be a whole number (or 'latest'); "
                         f"a key that holds an '@' is written {text + '@latest'!r}.")
    return key, int(t)


async def report_media(runs: Iterable, keys: Iterable, transport_of, cache_root: Path, *,
                       step: int | None = None) -> tuple[dict[str, list[ReportMedia]], list[str]]:
    """The chosen ``keys`` of each run, fetched over ``await transport_of(run)``:
    ``({run id: [ReportMedia]}, problems)``. A key is a name (its step: ``step``) or a pair
    ``(name, step or None)``. Without a step, each run's latest step of the key; with one, each
    run's latest step *at or below* it, or, when the run logged the key only later, its earliest
    step. Each item carries the step it really has (and the one asked for when they differ), so the
    report labels it truthfully. A run or item that cannot be read is left out and said in
    ``problems``; the report is written anyway."""
    out: dict[str, list[ReportMedia]] = {}
    problems: list[str] = []
    chosen = [(k, step) if isinstance(k, str) else (k[0], k[1]) for k in keys]
    for run in runs:
        try:
            transport = await transport_of(run)
            rm = RunMedia(run, cache_root)
            await rm.refresh(transport)
        except LabdeckError as e:
            problems.append(f"{run.display_name}: {e}")
            continue
        items = []
        for k, at in chosen:
            entry = rm.index.latest(k) if at is None else rm.index.at_or_before(k, at)
            if entry is None:
                continue
            try:
                items.append(report_item(entry, await rm.load(transport, entry), at))
            except LabdeckError as e:
                problems.append(f"{run.display_name} {k} step {entry.step}: {e}")
        if items:
            out[run.id] = items
    return out, problems


def rebin_histogram(doc: dict, bins: int) -> tuple[float, float, list[float]]:
    """(low, high, counts) of a histogram over at most ``bins`` equal bins of its occupied range
    (a bucket counts in the bin of its centre; TensorBoard's open-ended last limit, DBL_MAX, is
    clamped to the largest limit below it)."""
    edges, counts = doc["edges"], doc["counts"]
    occupied = [i for i, c in enumerate(counts) if c]
    if not occupied:
        return 0.0, 0.0, []
    finite_top = [e for e in edges if abs(e) < 1e300]
    cap_hi = max(finite_top) if finite_top else 0.0
    cap_lo = min(finite_top) if finite_top else 0.0

    def clamp(x: float) -> float:
        return min(max(x, cap_lo), cap_hi)

    lo = clamp(edges[occupied[0]])
    hi = clamp(edges[occupied[-1] + 1])
    if hi < lo:
        lo, hi = hi, lo
    n = max(1, min(bins, len(counts)))
    out = [0.0] * n
    width = (hi - lo) / n
    for i in occupied:
        mid = clamp(edges[i]) * 0.5 + clamp(edges[i + 1]) * 0.5
        k = int((mid - lo) / width) if width > 0 else 0
        out[min(max(k, 0), n - 1)] += counts[i]
    return lo, hi, out


async def load_run_media(monitor, run, transport, cache_root: Path) -> RunMedia:
    """A run's media from both sources, ready to list: the labdeck index (mirrored over
    ``transport``) and the TensorBoard media of its event files (mirrored by ``monitor``, which
    polls the run once if it has not followed it yet)."""
    from .tbevents import event_run

    rm = RunMedia(run, cache_root)
    await rm.refresh(transport)
    m = monitor.runs.get(run.id)
    if m is None:
        await monitor.poll_run(run, transport)
        m = monitor.runs.get(run.id)
    if m is not None and m.tb:
        files = [(local.path, event_run(remote, m.tb_base)) for remote, (local, _) in list(m.tb.items())]
        entries, _ = tensorboard_media(files)
        rm.add_tensorboard(entries)
    return rm
