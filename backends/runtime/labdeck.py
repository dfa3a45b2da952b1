"""labdeck's in-job API: log metrics, record parameters, declare the artifacts a run uses.

Inside a job that labdeck launched, ``import labdeck`` finds this file (it is
copied into the run directory's ``lib/``, which is on ``PYTHONPATH``)::

    import labdeck

    labdeck.config({"lr": 3e-4, "batch_size": 64})
    ckpt = labdeck.use("01J9Z3…", "ckpt/final.pt")   # -> <runs root>/01J9Z3…/ckpt/final.pt
    for step, batch in enumerate(loader):
        ...
        labdeck.log({"loss": loss.item(), "acc": acc}, step=step)

API
    ``log(metrics, step=None)``  record numeric metrics (a dict of name -> number).
        The call only appends to an in-memory buffer (well under a microsecond
        of work); a daemon thread writes the buffer to ``$LABDECK_METRICS_FILE``
        every 0.1 s, at once when more than ~10,000 points wait, and at exit.
        ``step`` defaults to one more than the previous step of this process
        (0 first), so explicit and implicit steps mix the way they do in wandb.
        Any thread may call it (no lock: threads that rely on automatic steps
        at the same moment can get the same step).
    ``config(params)``  record run parameters (one line per call; readers merge them in order) and
        return them. In a rerun with changes (``labdeck rerun RUN --set model.layers=12``, or ``R``
        in the TUI) the parameters that are not on the command line come in ``$LABDECK_PARAMS`` (a
        JSON object, dotted keys for nested dicts); ``config`` applies them to ``params`` in place
        (converted to the type of the value they replace) before recording, so use the dict you
        passed, or the one returned, after calling it.
    ``use(run_id, path)``  declare that this run loads ``path`` of run ``run_id`` (lineage)
        and return where that artifact lies on this instance:
        ``<runs root>/<run_id>/<path>``, the runs root being the parent of
        ``$LABDECK_RUN_DIR`` (an absolute ``path`` comes back unchanged).
    ``flush(timeout=5.0)``  write everything logged so far; True when all of it was written within ``timeout`` s.
    ``run_id()``  this run's id (``$LABDECK_RUN_ID``), or None outside labdeck.
    ``labdeck.dropped``  metric values dropped as non-numeric so far (reported once at exit).
    ``labdeck.lost``  lines that could not be written so far (reported when first seen and at exit).

The file: one JSON object per line, written with ``O_APPEND`` and one ``write``
per batch of whole lines (so processes that share it, such as forked DataLoader
workers, never interleave within a line)::

    {"t":1718000000.123,"s":12,"m":{"loss":0.31,"acc":0.9}}
    {"t":1718000000.456,"config":{"lr":0.0003,"batch_size":64}}
    {"t":1718000000.789,"use":{"run":"01J9Z3…","path":"ckpt/final.pt"}}

Values: ints and floats as they are; bools as 0/1; anything else through
``.item()`` (numpy and torch scalars) and ``float()``; NaN and ±inf as the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (so every line is strict
JSON). A value that is not a number is dropped and counted. Conversion happens
in the writer thread, up to 0.1 s after ``log()``: log plain numbers (``.item()``),
not tensors that are later changed in place or that hold an autograd graph.

It never blocks or crashes the training: ``log()`` does not raise; write
errors (disk full, file or directory gone) cost the points of that batch,
are counted and reported once on stderr, and the next batch is tried again.
Memory is bounded: past 1,000,000 waiting points (a job logging faster than
its points can be written, some 500,000 a second) ``log()`` yields 5 ms to the
writer per call while the writer makes progress, and drops the oldest half
(counted as lost) if the writer has been stuck for 2 s (a hung filesystem).
Outside labdeck (no ``$LABDECK_METRICS_FILE``) points are discarded after a
note on stderr, or written to ``./labdeck-metrics.jsonl`` with
``LABDECK_METRICS_FALLBACK=1``.

On exit (atexit, and multiprocessing's exit hooks in forked workers) and on
SIGTERM, SIGINT and SIGHUP the buffer is flushed (bounded wait). Signal
handlers are installed at the first ``log()``/``config()`` from the main
thread, only where the signal still has its default handler; after flushing,
the handler restores that default and raises the signal again, so the process
dies (or raises KeyboardInterrupt) as it would have. A process killed with
SIGKILL or leaving through ``os._exit`` loses at most its last 0.1 s. (Like
any Python signal handler, it runs when the main thread next executes Python
code: a main thread stuck inside a C call dies at labdeck's SIGKILL, 10 s
after the SIGTERM of a cancel, rather than at the SIGTERM.)

Inside a labdeck run, importing the module also records the job's Python (``sys.executable``,
its version and packages) in ``$LABDECK_RUN_DIR/environment.json``, from a daemon thread: what
labdeck serves, opens notebooks and exports with is the interpreter the job really ran.

Standard library only; Python 3.8+.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time

__all__ = ["log", "config", "use", "checkpoint", "resume_from", "flush", "run_id", "dropped", "lost",
           "Image", "Table", "Histogram", "Confusion", "Text", "media_dropped"]
__version__ = "1"

FLUSH_INTERVAL_S = 0.1  # the writer thread's period
HIGH_WATER = 10_000  # more points than this waiting: wake the writer at once
MAX_BUFFERED = 1_000_000  # more than this waiting: log() yields to the writer; if it is stuck, drop the oldest
STUCK_S = 2.0  # the writer made no progress for this long: it is stuck (a hung filesystem)
CHUNK = 20_000  # points per write() at most
_HIGH_LEN = 3 * HIGH_WATER  # the same, in list items (three per point)
_MAX_LEN = 3 * MAX_BUFFERED
SIGNAL_FLUSH_TIMEOUT_S = 2.0  # labdeck's cancel sends SIGKILL 10 s after SIGTERM
EXIT_FLUSH_TIMEOUT_S = 5.0
FALLBACK_FILE = "labdeck-metrics.jsonl"

dropped = 0  # non-numeric metric values dropped (this process)
lost = 0  # lines that could not be written (this process)

# ---- state -------------------------------------------------------------------
# The hot path (log) only extends _buf by one (time, step, metrics) triple: flat, so that
# a million waiting points are not a million tuples for the garbage collector to walk;
# list.extend is atomic under the GIL. The writer takes triples off its front under
# _take_lock (slice, then del of the same count: extends that race with it land behind).
_buf: list = []
_extend = _buf.extend
_time = time.time
_next_step = 0
_started = False  # writer thread, atexit and signal handlers set up (in this process)
_kicked = False  # the writer was woken for a full buffer and has not taken it yet

_path: str | None = None  # where lines go; None: discard
_thread: threading.Thread | None = None
_wake = threading.Event()
_io_lock = threading.Lock()  # one writer at a time: keeps lines in order
_io_owner: int | None = None
_take_lock = threading.Lock()  # held only to take items off the buffer's front (or to trim it)
_progress_at = 0.0  # time.monotonic() of the writer's last progress
_key_cache: dict = {}  # metric name -> its JSON encoding + ":"
_start_lock = threading.RLock()
_cv = threading.Condition(threading.RLock())  # flush() waits on it for the writer's rounds
_requested = 0  # flush rounds asked for
_done = 0  # flush rounds completed
_done_ok = True  # whether the last completed round wrote everything it took
_need_newline = False  # a partial write left a line unterminated
_first_drop: tuple | None = None
_lost_reported = False
_exit_reported = False
_atexit_registered = False
_exited = False  # the exit flush ran: later log() calls (other atexit hooks) write synchronously
_signals_tried = False
_prev_handlers: dict = {}

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


# ---- API -----------------------------------------------------------------------
def log(metrics, step=None):
    """Record ``metrics`` (name -> number) at ``step`` (default: the previous step + 1). Never raises."""
    global _next_step
    try:
        m = metrics.copy()
        if step is None:
            step = _next_step
        _next_step = step + 1
        _extend((_time(), step, m))
        if len(_buf) > _HIGH_LEN:
            _overflow()
        if not _started:
            _start()
    except Exception:
        _log_slow(metrics, step)


def _overrides():
    """The parameters a rerun changed off the command line: ``$LABDECK_PARAMS`` (a JSON object), else {}."""
    raw = os.environ.get("LABDECK_PARAMS", "")
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return obj if type(obj) is dict else {}


def _like(new, old):
    """``new`` as the type of the value it replaces, when it converts (3 → 3.0 for a float lr)."""
    if old is None or type(new) is type(old) or type(old) not in (int, float, str, bool):
        return new
    try:
        if type(old) is bool:
            return new if type(new) is bool else str(new).lower() in ("1", "true", "yes")
        return type(old)(new)
    except (TypeError, ValueError):
        return new


def config(params):
    """Record run parameters (a dict) and return it, with a rerun's changes (``$LABDECK_PARAMS``)
    applied in place first; written within milliseconds. Never raises."""
    try:
        if type(params) is dict:
            for key, value in _overrides().items():
                parts = str(key).split(".")
                node = params
                for p in parts[:-1]:  # a dotted key names a nested dict: model.layers
                    if type(node.get(p)) is not dict:
                        node = None
                        break
                    node = node[p]
                if node is None or (parts[-1] not in node and key in params):
                    node, parts = params, [key]  # a key that itself has dots
                node[parts[-1]] = _like(value, node.get(parts[-1]))
        _line({"t": _time(), "config": params})
    except Exception:
        pass
    return params


def checkpoint(path, step=None):
    """Declare ``path`` (relative to the run directory, or absolute) this run's latest checkpoint.

    labdeck copies it off the instance as the run goes, so a run whose spot instance is taken
    away can be relaunched from it (``resume_from()`` in the new run). Never raises."""
    try:
        p = os.path.abspath(os.fspath(path))
        _line({"t": _time(), "checkpoint": {"path": p, "step": step}})
        flush()
    except Exception:
        pass


def resume_from():
    """The checkpoint to resume from when this run relaunches a preempted one, else None."""
    return os.environ.get("LABDECK_RESUME_FROM") or None


def use(run_id, path):
    """Declare that this run loads ``path`` of run ``run_id``; return that artifact's path on this instance."""
    run = str(run_id)
    p = os.fspath(path)
    try:
        _line({"t": _time(), "use": {"run": run, "path": p}})
    except Exception:
        pass
    if os.path.isabs(p):
        return p
    run_dir = os.environ.get("LABDECK_RUN_DIR") or ""
    root = os.path.dirname(run_dir.rstrip("/" + os.sep)) if run_dir else ""
    return os.path.join(root, run, p) if root else os.path.join(run, p)


def flush(timeout=5.0):
    """Write everything logged so far; wait at most ``timeout`` seconds. True when all was written."""
    global _requested
    try:
        if _started and not _signals_tried:
            _install_signals()
        t = _thread
        if t is None or not t.is_alive() or t is threading.current_thread():
            return _flush_now(timeout)
        with _cv:
            _requested += 1
            mine = _requested
        _wake.set()
        deadline = time.monotonic() + timeout
        with _cv:
            while _done < mine:
                left = deadline - time.monotonic()
                if left <= 0 or not t.is_alive():
                    return False
                _cv.wait(min(left, 0.5))
            return _done_ok
    except Exception:
        return False


def run_id():
    """This run's id (``$LABDECK_RUN_ID``), or None outside labdeck."""
    return os.environ.get("LABDECK_RUN_ID") or None


# ---- slow paths of the API ----------------------------------------------------------
def _log_slow(metrics, step):
    """log() when the fast path failed: a mapping without .copy(), an odd step. Never raises."""
    global _next_step
    try:
        try:
            m = dict(metrics)
        except Exception:
            _count_drop("<log() argument>", metrics)
            return
        s = None if step is None else _number(step)
        if s is None or isinstance(s, str):  # no step, or not a finite number: the automatic one
            s = _next_step if isinstance(_next_step, (int, float)) else 0
        _next_step = s + 1
        _extend((_time(), s, m))
        if not _started:
            _start()
    except Exception:
        pass


def _line(doc):
    """Queue one pre-encoded line (config/use) and have the writer write it now."""
    try:
        text = _encode(doc)
    except Exception:
        text = _encode(_jsonable(doc, 0))
    _extend((None, text, None))
    if not _started:
        _start()
    elif not _signals_tried:
        _install_signals()
    t = _thread
    if t is not None and t.is_alive():
        _wake.set()
    else:
        _flush_now(1.0)


def _overflow():
    """More than HIGH_WATER points wait: wake the writer. More than MAX_BUFFERED: log() is faster than
    the points can be written: yield to the writer while it makes progress, drop the oldest if it is stuck."""
    global _kicked, lost
    try:
        if _kicked and len(_buf) <= _MAX_LEN:
            return
        t = _thread
        alive = t is not None and t.is_alive() and t is not threading.current_thread()
        if alive:
            _kicked = True
            _wake.set()
        if len(_buf) <= _MAX_LEN:
            if not alive and _started:
                _flush_now(1.0)
            return
        if alive and time.monotonic() - _progress_at < STUCK_S:
            time.sleep(0.005)  # the writer runs meanwhile
            return
        with _take_lock:
            k = len(_buf) // 6 * 3
            del _buf[:k]
        k //= 3
        lost += k
        _note_lost("the writer is stuck")
    except Exception:
        pass


# ---- the writer -----------------------------------------------------------------------
def _start():
    """First log()/config() of this process: pick the file, start the writer, hook exit and signals."""
    global _started, _path, _atexit_registered
    if _exited:
        _flush_now(1.0)
        return
    if not _start_lock.acquire(timeout=1.0):
        return
    try:
        if _started:
            return
        _started = True
        _path = _metrics_path()
        _start_thread()
        if not _atexit_registered:
            _atexit_registered = True
            atexit.register(_at_exit)
        _install_signals()
        _hook_multiprocessing_exit()
    except Exception:
        pass
    finally:
        _start_lock.release()


def _metrics_path():
    path = os.environ.get("LABDECK_METRICS_FILE")
    if path:
        return path
    if os.environ.get("LABDECK_METRICS_FALLBACK") == "1":
        return os.path.abspath(FALLBACK_FILE)
    _note("labdeck: LABDECK_METRICS_FILE is not set (not running under labdeck): metric points are discarded; "
          f"set LABDECK_METRICS_FALLBACK=1 to write them to ./{FALLBACK_FILE}")
    return None


def _start_thread():
    global _thread
    t = threading.Thread(target=_writer, name="labdeck-writer", daemon=True)
    t.start()
    _thread = t


def _writer():
    global _done, _done_ok, _progress_at
    while True:
        try:
            _progress_at = time.monotonic()
            _wake.wait(FLUSH_INTERVAL_S)
            _wake.clear()
            with _cv:
                asked = _requested
            ok = _flush_now(None)
            with _cv:
                if asked > _done:
                    _done = asked
                    _done_ok = ok
                _cv.notify_all()
        except Exception:
            time.sleep(FLUSH_INTERVAL_S)


def _flush_now(timeout):
    """Take what is buffered, encode it and append it to the file, in the calling thread
    (in chunks; only what was there when it began). True when all of that was written."""
    global _io_owner, _kicked, _progress_at
    me = threading.get_ident()
    if _io_owner == me:  # a signal handler interrupted this thread's own flush
        return False
    if not _io_lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
        return False
    _io_owner = me
    ok = True
    try:
        budget = len(_buf)
        while budget > 0:
            with _take_lock:
                n = min(len(_buf), budget, 3 * CHUNK) // 3 * 3
                items = _buf[:n]
                del _buf[:n]
            if not n:
                break
            budget -= n
            _kicked = False
            _progress_at = time.monotonic()
            if _path is not None:
                data, lines = _encode_batch(items)
                del items
                if data and not _write(data, lines):
                    ok = False
                _progress_at = time.monotonic()
        return ok
    except Exception:
        return False
    finally:
        _io_owner = None
        _io_lock.release()


def _encode_batch(items):
    """(bytes of whole lines, how many lines). Plain str -> int/float dicts take the fast path."""
    out = []
    keys = _key_cache
    it = iter(items)
    for t, s, m in zip(it, it, it):
        if t is None:  # config/use: encoded already
            out.append(s)
            continue
        try:
            c = s.__class__
            if c is int:
                step = repr(s)
            elif s is None:
                step = "null"
            elif c is float and s - s == 0:
                step = repr(s)
            else:
                raise TypeError
            parts = []
            for k, v in m.items():
                c = v.__class__
                if c is not float and c is not int:
                    raise TypeError
                r = repr(v)
                if "n" in r:  # nan, inf, -inf
                    raise ValueError
                ek = keys.get(k)
                if ek is None:
                    ek = _encode_key(k)
                parts.append(ek + r)
            line = '{"t":' + repr(t) + ',"s":' + step + ',"m":{' + ",".join(parts) + "}}"
        except Exception:  # odd values, keys or step; NaN/inf; not a dict
            line = _encode_slow(t, s, m)
            if line is None:
                continue
        out.append(line)
    if not out:
        return b"", 0
    out.append("")
    return "\n".join(out).encode("utf-8"), len(out) - 1


def _encode_key(k):
    if k.__class__ is not str:
        raise TypeError
    ek = _encode(k) + ":"
    if len(_key_cache) < 10_000:
        _key_cache[k] = ek
    return ek


def _encode_slow(t, s, m):
    """One point with odd values: convert them (numbers, 0/1, NaN strings), drop what is not a number."""
    try:
        try:
            pairs = list(m.items())
        except Exception:
            pairs = list(dict(m).items())
    except Exception:
        _count_drop("<log() argument>", m)
        return None
    clean = {}
    for k, v in pairs:
        if isinstance(v, _Media):  # encoded and written beside the metrics (media/), never a metric
            _media_put(k, s, v, t)
            continue
        x = _number(v)
        if x is None:
            _count_drop(k, v)
            continue
        clean[k if isinstance(k, str) else str(k)] = x
    if not clean:
        return None
    step = None if s is None else _number(s)
    if isinstance(step, str):  # NaN/inf step: none
        step = None
    try:
        t = float(t)
        return _encode({"t": t, "s": step, "m": clean})
    except Exception:
        return None


def _number(v):
    """int/float for a numeric value (bools 0/1; NaN/inf as strings); None when it is not a number."""
    c = v.__class__
    if c is int:
        return v
    if c is not float:
        if c is bool:
            return int(v)
        try:
            item = getattr(v, "item", None)
            if item is not None and callable(item):
                v = item()
            if isinstance(v, bool):
                return int(v)
            if isinstance(v, int):
                return int(v)
            v = float(v)
        except Exception:
            return None
    if v - v == 0:  # finite
        return v
    return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")


def _jsonable(obj, depth):
    """``obj`` as something json can encode strictly (for config/use; cycles and odd objects as strings)."""
    try:
        if obj is None or isinstance(obj, (str, bool, int)):
            return obj
        if isinstance(obj, float):
            return _number(obj)
        if depth > 32:
            return repr(obj)[:200]
        if isinstance(obj, dict):
            return {(k if isinstance(k, str) else str(k)): _jsonable(v, depth + 1) for k, v in obj.items()}
        if isinstance(obj, (list, tuple, set, frozenset)):
            return [_jsonable(v, depth + 1) for v in obj]
        if hasattr(obj, "__fspath__"):
            return os.fspath(obj)
        item = getattr(obj, "item", None)
        if item is not None and callable(item):
            try:
                return _jsonable(item(), depth + 1)
            except Exception:
                pass
        return str(obj)
    except Exception:
        return "<unrepresentable>"


def _write(data, lines):
    """Append ``data`` (whole lines) with one write (O_APPEND); on an error count the lines as lost. True if written."""
    global lost, _need_newline
    path = _path
    written = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            if _need_newline:
                data = b"\n" + data
                _need_newline = False
            view = memoryview(data)
            while written < len(data):
                n = os.write(fd, view[written:])
                if n <= 0:
                    raise OSError(f"wrote {n} bytes")
                written += n
        finally:
            os.close(fd)
        return True
    except Exception as e:
        if written:
            _need_newline = not data[:written].endswith(b"\n")
        gone = lines - data[:written].count(b"\n")
        lost += gone
        _note_lost(f"cannot write to {path} ({getattr(e, 'strerror', None) or e})")
        return False


# ---- reporting ------------------------------------------------------------------------
def _note(text):
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def _note_lost(why):
    global _lost_reported
    if not _lost_reported:
        _lost_reported = True
        _note(f"labdeck: {why}: {lost} metric point(s) lost so far; training continues "
              "(labdeck retries at the next flush, this is reported once)")


def _count_drop(key, value):
    global dropped, _first_drop
    dropped += 1
    if _first_drop is None:
        _first_drop = (key, type(value).__name__)


def _report():
    """Once per process: what was dropped or lost."""
    global _exit_reported
    if _exit_reported:
        return
    _exit_reported = True
    if dropped:
        key, kind = _first_drop or ("?", "?")
        _note(f"labdeck: dropped {dropped} non-numeric metric values (first: key={key}, a {kind})")
    if lost:
        _note(f"labdeck: {lost} metric point(s) could not be written to {_path}")
    if media_dropped:
        _note(f"labdeck: {media_dropped} media item(s) were dropped")


def _at_exit():
    global _exited, _started
    try:
        _exited = True
        flush(EXIT_FLUSH_TIMEOUT_S)
        _started = False  # from now on log() goes through _start(), which writes at once
        _report()
    except Exception:
        pass


# ---- signals, fork, multiprocessing ------------------------------------------------------
def _install_signals():
    """Flush on SIGTERM/SIGINT/SIGHUP where the signal still has Python's default handler (main thread only)."""
    global _signals_tried
    if threading.current_thread() is not threading.main_thread():
        return  # tried again from the main thread (config, use, flush)
    _signals_tried = True
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            prev = signal.getsignal(sig)
            if prev is signal.SIG_DFL or prev is signal.default_int_handler:
                signal.signal(sig, _on_signal)
                _prev_handlers[sig] = prev
        except (ValueError, OSError, RuntimeError, TypeError):
            pass


def _on_signal(signum, frame):
    """Flush, put the previous handler back, raise the signal again: the process ends as it would have."""
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    try:
        flush(SIGNAL_FLUSH_TIMEOUT_S)
        if prev is signal.SIG_DFL:  # the process dies right after: no atexit
            _report()
    except Exception:
        pass
    try:
        signal.signal(signum, prev)
    except Exception:
        pass
    if hasattr(signal, "raise_signal"):
        signal.raise_signal(signum)
    else:  # pragma: no cover (Python < 3.8)
        os.kill(os.getpid(), signum)


def _hook_multiprocessing_exit():
    """multiprocessing children end with os._exit (no atexit) but run its finalizers first."""
    util = sys.modules.get("multiprocessing.util")
    if util is None:
        return
    try:
        util.Finalize(None, _at_exit, exitpriority=100)
    except Exception:
        pass


def _after_fork_in_child():
    """A forked child starts clean: no parent points (the parent writes them), its own writer on first log()."""
    global _thread, _started, _kicked, _io_lock, _io_owner, _take_lock, _start_lock, _cv, _wake, _requested, _done
    global dropped, lost, _first_drop, _lost_reported, _exit_reported, _done_ok
    del _buf[:]
    _thread = None
    _started = False
    _kicked = False
    _wake = threading.Event()
    _io_lock = threading.Lock()
    _io_owner = None
    _take_lock = threading.Lock()
    _start_lock = threading.RLock()
    _cv = threading.Condition(threading.RLock())
    _requested = _done = 0
    _done_ok = True
    dropped = lost = 0
    _first_drop = None
    global _media_pending
    _media_pending = 0
    _lost_reported = _exit_reported = False


# ---- media: images, tables, histograms, confusion matrices, text ------------------------
# labdeck.log({"samples": labdeck.Image(arr, caption="epoch 3"), "per_class": labdeck.Table(cols, rows),
#              "weights": labdeck.Histogram(values), "confusion": labdeck.Confusion(y_true, y_pred, labels),
#              "notes": labdeck.Text("...")}, step=3)
# A media value costs log() no more than a number: its constructor keeps a reference (a copy of
# a numpy array), and the writer thread encodes it (PNG with zlib + struct; JSON; text) into
#     <run dir>/media/<key, percent-encoded>/<step>.png|json|txt
# and appends one line to <run dir>/media/index.jsonl:
#     {"key": "samples", "step": 3, "kind": "image", "file": "samples/3.png", "size": 2711,
#      "t": 1718000000.1, "caption": "epoch 3", "w": 64, "h": 64}
# Bounded: a key keeps at most MEDIA_MAX_PER_KEY steps and MEDIA_MAX_KEY_BYTES bytes (past either,
# every other of its older half is deleted, an {"key", "step", "deleted": true} line is appended,
# and the log says so once); an item over MEDIA_MAX_ITEM_BYTES, keys past MEDIA_MAX_KEYS and media
# past MEDIA_MAX_PENDING waiting for the writer are dropped and counted (media_dropped).
MEDIA_MAX_PER_KEY = 200
MEDIA_MAX_KEY_BYTES = 64 << 20
MEDIA_MAX_ITEM_BYTES = 16 << 20
MEDIA_MAX_KEYS = 500
MEDIA_MAX_PENDING = 2000
MEDIA_MAX_SIDE = 2048  # larger images are subsampled (every k-th pixel) to fit
MEDIA_MAX_ROWS = 10_000
MEDIA_MAX_COLS = 200
MEDIA_MAX_LABELS = 200
MEDIA_MAX_TEXT = 1 << 20
media_dropped = 0  # media values dropped (this process)
_media_pending = 0
_media_state = {}  # key -> [dir name, [(step, file, size)], total bytes]
_media_noted = set()
_media_dir_cache = [None, False]  # media directory, resolved


class _Media(object):
    kind = "media"
    __slots__ = ("caption", "_ok")

    def _admit(self):
        global _media_pending, media_dropped
        if _media_pending >= MEDIA_MAX_PENDING:
            media_dropped += 1
            self._ok = False
            _media_note("pending", "labdeck: media are logged faster than they can be written: some are dropped")
            return False
        _media_pending += 1
        self._ok = True
        return True


def _snapshot(x):
    """A copy of a numpy array (cheap; the caller may change theirs in place); anything else as it is."""
    try:
        if x.__class__.__module__ == "numpy" and hasattr(x, "copy"):
            return x.copy()
    except Exception:
        pass
    return x


class Image(_Media):
    """An image: a numpy array (H×W, H×W×1/3/4, or 1/3/4×H×W; uint8, or floats in 0..1), a PIL
    image, nested lists of the same shapes, or the path of a PNG (or JPEG/GIF) file."""
    kind = "image"
    __slots__ = ("data",)

    def __init__(self, data, caption=None):
        self.caption = None if caption is None else str(caption)[:1000]
        self.data = _snapshot(data) if self._admit() else None


class Table(_Media):
    """A table: column names and rows (lists of values; numbers, strings, None)."""
    kind = "table"
    __slots__ = ("columns", "rows")

    def __init__(self, columns, rows, caption=None):
        self.caption = None if caption is None else str(caption)[:1000]
        ok = self._admit()
        self.columns = list(columns)[:MEDIA_MAX_COLS] if ok else []
        self.rows = [list(r) for r in list(rows)[:MEDIA_MAX_ROWS]] if ok else []


class Histogram(_Media):
    """A histogram of ``values`` (a numpy array or a list of numbers) in ``bins`` equal bins."""
    kind = "histogram"
    __slots__ = ("values", "bins")

    def __init__(self, values, bins=64, caption=None):
        self.caption = None if caption is None else str(caption)[:1000]
        self.values = _snapshot(values) if self._admit() else None
        self.bins = max(1, min(int(bins), 512))


class Confusion(_Media):
    """A confusion matrix from true and predicted labels (``labels``: their order and names)."""
    kind = "confusion"
    __slots__ = ("y_true", "y_pred", "labels")

    def __init__(self, y_true, y_pred, labels=None, caption=None):
        self.caption = None if caption is None else str(caption)[:1000]
        ok = self._admit()
        self.y_true = _snapshot(y_true) if ok else None
        self.y_pred = _snapshot(y_pred) if ok else None
        self.labels = None if labels is None else list(labels)


class Text(_Media):
    """A piece of text (Markdown is shown as plain text)."""
    kind = "text"
    __slots__ = ("text",)

    def __init__(self, text, caption=None):
        self.caption = None if caption is None else str(caption)[:1000]
        self.text = str(text) if self._admit() else ""


def _media_note(what, text):
    if what not in _media_noted:
        _media_noted.add(what)
        _note(text)


def _media_dir():
    if not _media_dir_cache[1]:
        _media_dir_cache[1] = True
        run_dir = os.environ.get("LABDECK_RUN_DIR")
        if not run_dir and _path:
            run_dir = os.path.dirname(os.path.abspath(_path))
        _media_dir_cache[0] = os.path.join(run_dir, "media") if run_dir else None
    return _media_dir_cache[0]


def _key_dir(key):
    """A key as one safe file name: [A-Za-z0-9_-] kept, everything else (dots and slashes included) %XX."""
    out = []
    for ch in key:
        if ch.isascii() and (ch.isalnum() or ch in "_-"):
            out.append(ch)
        else:
            out.append("".join("%%%02X" % b for b in ch.encode("utf-8")))
    return "".join(out)[:240]


def _media_put(key, step, value, t):
    """Encode one media value and write it (the writer thread). Never raises."""
    global _media_pending, media_dropped
    if getattr(value, "_ok", False):
        _media_pending = max(0, _media_pending - 1)
    else:
        return
    base = _media_dir()
    if base is None:
        _media_note("nowhere", "labdeck: not running under labdeck: media are discarded")
        return
    try:
        key = key if isinstance(key, str) else str(key)
        st = _media_state.get(key)
        if st is None:
            if len(_media_state) >= MEDIA_MAX_KEYS or not key or len(key) > 200:
                media_dropped += 1
                _media_note("keys", "labdeck: too many media keys (or an empty/overlong one): such media are dropped")
                return
            st = _media_state[key] = [_key_dir(key), [], 0]
        step = step if isinstance(step, int) else (int(step) if isinstance(step, float) and step == step
                                                    and abs(step) < 2**63 else 0)
        data, ext, extra = _media_encode(value)
        if len(data) > MEDIA_MAX_ITEM_BYTES:
            media_dropped += 1
            _media_note("big", "labdeck: a media item over %d MiB was dropped (key %r)" % (MEDIA_MAX_ITEM_BYTES >> 20, key))
            return
        d = os.path.join(base, st[0])
        os.makedirs(d, exist_ok=True)
        rel = "%s/%d.%s" % (st[0], step, ext)
        tmp = os.path.join(d, ".%d.tmp" % os.getpid())
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(base, rel))
        doc = {"key": key, "step": step, "kind": value.kind, "file": rel, "size": len(data), "t": t}
        if value.caption is not None:
            doc["caption"] = value.caption
        doc.update(extra)
        lines = [doc]
        st[1].append((step, rel, len(data)))
        st[2] += len(data)
        if len(st[1]) > MEDIA_MAX_PER_KEY or st[2] > MEDIA_MAX_KEY_BYTES:
            lines += _media_thin(key, st, base)
        _media_index(base, lines)
    except Exception as e:
        media_dropped += 1
        _media_note("error", "labdeck: a media item could not be written (%s: %s); training continues"
                    % (type(e).__name__, str(e)[:200]))


def _media_thin(key, st, base):
    """Delete every other item of the older half of a key (its newest steps stay whole)."""
    _media_note("thin:" + key, "labdeck: media key %r passed its cap (%d steps / %d MiB): older steps are thinned"
                % (key, MEDIA_MAX_PER_KEY, MEDIA_MAX_KEY_BYTES >> 20))
    items = st[1]
    half = len(items) // 2
    gone = items[1:half:2]
    keep = [it for i, it in enumerate(items) if not (i < half and i % 2 == 1)]
    st[1] = keep
    out = []
    for step, rel, size in gone:
        st[2] -= size
        try:
            os.unlink(os.path.join(base, rel))
        except OSError:
            pass
        out.append({"key": key, "step": step, "file": rel, "deleted": True})
    return out


def _media_index(base, docs):
    text = "".join(_encode(_jsonable(d, 0)) + "\n" for d in docs).encode("utf-8")
    fd = os.open(os.path.join(base, "index.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)


def _media_encode(v):
    """(bytes, file extension, extra index fields) of a media value."""
    k = v.kind
    if k == "image":
        return _image_encode(v.data)
    if k == "table":
        cols = [str(c)[:200] for c in v.columns]
        rows = [[_cell(x) for x in r[:len(cols) or MEDIA_MAX_COLS]] for r in v.rows]
        return _encode({"columns": cols, "rows": rows}).encode("utf-8"), "json", {"rows": len(rows), "cols": len(cols)}
    if k == "histogram":
        return _histogram_encode(v.values, v.bins)
    if k == "confusion":
        return _confusion_encode(v.y_true, v.y_pred, v.labels)
    if k == "text":
        b = v.text.encode("utf-8", "replace")[:MEDIA_MAX_TEXT]
        return b, "txt", {"chars": len(v.text)}
    raise TypeError("not a media value")


def _cell(x):
    x = _jsonable(x, 30)
    if isinstance(x, (dict, list)):
        x = _encode(x)
    if isinstance(x, str) and len(x) > 1000:
        x = x[:1000] + "…"
    return x


def _flat_numbers(values):
    """A list of finite floats from a numpy array, a (nested) list or an iterable of numbers."""
    try:
        tolist = values.tolist
    except AttributeError:
        tolist = None
    if tolist is not None:
        values = tolist()
    out = []
    stack = [values]
    while stack:
        x = stack.pop()
        if isinstance(x, (list, tuple)):
            stack.extend(reversed(x))
            continue
        n = _number(x)
        if isinstance(n, (int, float)) and not isinstance(n, bool):
            out.append(float(n))
        if len(out) > 50_000_000:
            break
    return out


def _histogram_encode(values, bins):
    xs = _flat_numbers(values)
    if not xs:
        doc = {"edges": [], "counts": [], "n": 0}
    else:
        lo, hi = min(xs), max(xs)
        if hi == lo:
            edges = [lo - 0.5, lo + 0.5]
            counts = [len(xs)]
        else:
            w = (hi - lo) / bins
            edges = [lo + i * w for i in range(bins)] + [hi]
            counts = [0] * bins
            for x in xs:
                i = int((x - lo) / w)
                counts[i if i < bins else bins - 1] += 1
        doc = {"edges": edges, "counts": counts, "n": len(xs), "min": lo, "max": hi, "sum": sum(xs)}
    return _encode(doc).encode("utf-8"), "json", {"n": doc["n"]}


def _label_list(x):
    try:
        x = x.tolist()
    except AttributeError:
        x = list(x)
    return [(_number(v) if not isinstance(v, str) else v) for v in x]


def _confusion_encode(y_true, y_pred, labels):
    t, p = _label_list(y_true), _label_list(y_pred)
    if len(t) != len(p):
        raise ValueError("y_true has %d labels but y_pred %d" % (len(t), len(p)))
    if labels is None:
        seen = sorted(set(t) | set(p), key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))
        labels = seen
        index = {v: i for i, v in enumerate(seen)}
    else:
        # labels name the classes: y values are indices into them, or the names themselves
        index = {}
        for i, name in enumerate(labels):
            index[name] = i
            index.setdefault(i, i)
    labels = labels[:MEDIA_MAX_LABELS]
    n = len(labels)
    m = [[0] * n for _ in range(n)]
    other = 0
    for a, b in zip(t, p):
        i, j = index.get(a), index.get(b)
        if i is None or j is None or i >= n or j >= n:
            other += 1
            continue
        m[i][j] += 1
    doc = {"labels": [str(x)[:100] for x in labels], "matrix": m, "unlabelled": other}
    return _encode(doc).encode("utf-8"), "json", {"classes": n}


# ---- PNG, written with zlib and struct -------------------------------------------------------
def _png(width, height, channels, raw_rows):
    """A PNG of 8-bit grayscale (1), gray+alpha (2), RGB (3) or RGBA (4) pixels: ``raw_rows`` is the
    concatenation of the rows, each one filter byte (0) and width×channels bytes."""
    import struct
    import zlib

    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(raw_rows), 6)) + chunk(b"IEND", b""))


def _image_encode(data):
    # a file: PNG as it is; JPEG/GIF as they are (or as PNG where PIL can convert them)
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        with open(data, "rb") as f:
            b = f.read(MEDIA_MAX_ITEM_BYTES + 1)
        if b[:8] == b"\x89PNG\r\n\x1a\n":
            w, h = _png_size(b)
            return b, "png", {"w": w, "h": h}
        ext = "jpg" if b[:3] == b"\xff\xd8\xff" else "gif" if b[:4] == b"GIF8" else None
        if ext is None:
            raise ValueError("not a PNG, JPEG or GIF file")
        try:  # Pillow where the job has it (looked up at run time: the module itself is stdlib only)
            import importlib
            import io

            data = importlib.import_module("PIL.Image").open(io.BytesIO(b))
            data.load()
        except Exception:
            return b, ext, {}
    # a PIL image
    if hasattr(data, "convert") and hasattr(data, "tobytes") and hasattr(data, "size"):
        mode = data.mode
        img = data if mode in ("L", "LA", "RGB", "RGBA") else data.convert("RGBA" if "A" in mode else "RGB")
        img = _pil_fit(img)
        w, h = img.size
        ch = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[img.mode]
        px = img.tobytes()
        stride = w * ch
        rows = bytearray()
        for y in range(h):
            rows.append(0)
            rows += px[y * stride:(y + 1) * stride]
        return _png(w, h, ch, rows), "png", {"w": w, "h": h}
    # a numpy array (or anything with .tolist) or nested lists
    np = sys.modules.get("numpy")
    if np is not None and isinstance(data, np.ndarray):
        return _numpy_png(np, data)
    rows = data.tolist() if hasattr(data, "tolist") else data
    return _list_png(rows)


def _pil_fit(img):
    w, h = img.size
    k = max(1, -(-max(w, h) // MEDIA_MAX_SIDE))
    return img.resize((max(1, w // k), max(1, h // k))) if k > 1 else img


def _png_size(b):
    import struct

    if len(b) >= 24 and b[12:16] == b"IHDR":
        return struct.unpack(">II", b[16:24])
    return 0, 0


def _numpy_png(np, a):
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW (PyTorch, TensorBoard's default) to HWC
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or not a.shape[0] or not a.shape[1]:
        raise ValueError("an image array must be H×W, H×W×C or C×H×W (C = 1, 3, 4), not %r" % (a.shape,))
    k = max(1, -(-max(a.shape[0], a.shape[1]) // MEDIA_MAX_SIDE))
    if k > 1:
        a = a[::k, ::k]
    if a.dtype != np.uint8:
        f = a.astype(np.float64)
        f = np.nan_to_num(f, nan=0.0, posinf=1.0, neginf=0.0)
        if a.dtype.kind == "f" or a.dtype == np.bool_:
            f = f * 255.0
        a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    h, w, ch = a.shape
    rows = np.zeros((h, w * ch + 1), dtype=np.uint8)
    rows[:, 1:] = a.reshape(h, w * ch)
    return _png(w, h, ch, rows.tobytes()), "png", {"w": w, "h": h}


def _list_png(rows):
    rows = list(rows)
    if not rows:
        raise ValueError("an empty image")
    first = list(rows[0])
    ch = len(first[0]) if first and isinstance(first[0], (list, tuple)) else 1
    if ch not in (1, 2, 3, 4):
        raise ValueError("a pixel must have 1, 3 or 4 channels")
    h = len(rows)
    w = len(first)
    if h > MEDIA_MAX_SIDE or w > MEDIA_MAX_SIDE:
        raise ValueError("an image given as lists may be at most %d pixels a side" % MEDIA_MAX_SIDE)
    flat = []
    for r in rows:
        r = list(r)
        if len(r) != w:
            raise ValueError("the rows of an image must have the same length")
        for p in r:
            flat.extend(p if ch > 1 else (p,))
    scale = 255.0 if all(isinstance(x, float) for x in flat) and max(flat, default=0) <= 1.0 else 1.0
    out = bytearray()
    per = w * ch
    for y in range(h):
        out.append(0)
        for x in flat[y * per:(y + 1) * per]:
            x = float(x) * scale
            out.append(0 if not x > 0 else 255 if x >= 255 else int(round(x)))
    return _png(w, h, ch, out), "png", {"w": w, "h": h}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- the interpreter the job runs, for the record ---------------------------------------
def _record_environment(run_dir):
    """Write ``<run dir>/environment.json`` as this process sees it: the interpreter the job really
    runs (``sys.executable``: a venv's, whatever the command line or PATH said), its version and
    its packages. The wrapper's own guess (the command's first word) is only linked in where this
    has not written first; a later importer of the same run (a subprocess) leaves the first one's."""
    target = os.path.join(run_dir, "environment.json")
    tmp = os.path.join(run_dir, "lib", ".environment.json.%d" % os.getpid())
    try:
        try:
            with open(target, encoding="utf-8") as f:
                if json.load(f).get("recorded_by") == "job":
                    return
        except Exception:
            pass
        import platform

        try:
            import importlib.metadata as md

            pk = sorted({"%s==%s" % (d.metadata["Name"], d.version) for d in md.distributions() if d.metadata["Name"]})
        except Exception:
            pk = []
        doc = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
               "packages": pk[:3000], "recorded_by": "job"}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, target)
    except Exception:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _start_environment_record():
    """At import, inside a labdeck run (its run directory has the ``lib/`` this file came in): record
    the environment in a daemon thread, off the job's main thread."""
    run_dir = os.environ.get("LABDECK_RUN_DIR")
    if not run_dir or not sys.executable or not os.path.isdir(os.path.join(run_dir, "lib")):
        return
    try:
        threading.Thread(target=_record_environment, args=(run_dir,), name="labdeck-environment", daemon=True).start()
    except Exception:
        pass


_start_environment_record()
